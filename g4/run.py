"""`python -m g4.run OUT.pte --prompt "..."`: generate text from a .pte or from the pure forward."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import attrs
import torch

from g4 import chat
from g4.audio import SAMPLE_RATE, features, load_wav
from g4.checkpoint import CheckpointError, load_assistant, load_checkpoint
from g4.config import CONFIGS, TOWERS, ConfigError
from g4.generation import AnyDrafter, Drafter, EagerModel, GenerateError, PteDrafter, PteModel, Sampler, generate
from g4.image import DEFAULT_SOFT_TOKENS, SOFT_TOKENS, load_image, preprocess
from g4.params import init_params

TINY = Path(__file__).parent / "assets" / "tiny"  # the tiny model's tokenizer folder (Gemma 4-shaped)


def load_tokenizer(path: Path, vocab_size: int):  # noqa: ANN201 (tokenizers.Tokenizer)
    """A Hugging Face tokenizer.json, checked against the model's vocabulary."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise GenerateError(f"{path}: no such tokenizer file (pass --tokenizer)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise GenerateError(f"{path}: not a tokenizer.json ({e})") from None
    if tok.get_vocab_size() > vocab_size:
        raise GenerateError(f"{path}: tokenizer has {tok.get_vocab_size()} tokens, the model only {vocab_size}")
    return tok


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(prog="python -m g4.run", description=__doc__)
    ap.add_argument("pte", nargs="?", help=".pte to run (omit with --eager)")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: the one next to the .pte)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="text prompt (<bos> is put first)")
    g.add_argument("--tokens", help="raw prompt token ids, e.g. 2,17,42 (fed as they are)")
    c = ap.add_argument_group("chat (the tokenizer folder's chat template, else Gemma 4's)")
    c.add_argument(
        "--chat", action="store_true", help="chat: --prompt is one user turn; without it, a turn per stdin line"
    )
    c.add_argument("--system", help="system prompt (implies --chat)")
    c.add_argument("--messages", help="JSON file: a conversation (role/content messages) to reply to (implies --chat)")
    c.add_argument("--think", action="store_true", help="turn thinking on (enable_thinking; implies --chat)")
    c.add_argument("--show-thinking", action="store_true", help="print the thought too, between [thought] marks")
    ap.add_argument(
        "--render",
        action="store_true",
        help="print the prompt text the model would be given (for other runners) and exit",
    )
    ap.add_argument(
        "--image", action="append", help="image file to put before the prompt (repeatable; a .pte exported --vision)"
    )
    ap.add_argument(
        "--audio",
        action="append",
        help="16 kHz WAV file to put before the prompt, after any images (repeatable; a .pte exported --audio)",
    )
    ap.add_argument(
        "--max-soft-tokens",
        type=int,
        help="soft tokens an image may take (70..1120; default 280, or the .pte's most)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="the .pte's thread pool size (default: ExecuTorch's, from the CPU)")
    ap.add_argument("--eager", action="store_true", help="run g4.forward instead of a .pte")
    ap.add_argument("--checkpoint", help="weights for --eager / --compare (Hugging Face folder)")
    ap.add_argument("--size", help="named size with seeded random weights for --eager / --compare (e.g. tiny)")
    ap.add_argument("--max-seq-len", type=int, default=1024, help="eager cache length")
    ap.add_argument("--compare", action="store_true", help="run the .pte and the eager forward side by side")
    d = ap.add_argument_group("speculative decoding (Gemma 4's assistant drafter)")
    d.add_argument("--assistant", help="assistant checkpoint folder (gemma4_assistant) to draft with, with --eager")
    d.add_argument(
        "--draft-tokens", type=int, help="tokens drafted per round (default: the assistant's, or the .pte's most)"
    )
    d.add_argument("--no-draft", action="store_true", help="decode without drafting (a .pte with a drafter drafts)")
    return ap.parse_args(argv)


def eager_model(a: argparse.Namespace, max_context: int) -> tuple[EagerModel, Drafter | None]:
    """The pure forward with --checkpoint or --size weights, and the --assistant drafter."""
    try:
        if a.checkpoint:
            cfg, params = load_checkpoint(a.checkpoint, towers=("vision",) * bool(a.image) + ("audio",) * bool(a.audio))
        elif a.size in CONFIGS:
            cfg = CONFIGS[a.size]
            if a.image or a.audio:
                if a.size not in TOWERS:
                    raise GenerateError(f"--{'image' if a.image else 'audio'}: no towers for --size {a.size}")
                cfg = attrs.evolve(cfg, towers=TOWERS[a.size])
            params = init_params(cfg, seed=0)
        else:
            raise GenerateError("--eager/--compare need --checkpoint DIR or --size NAME (e.g. --size tiny)")
        drafter = None
        if a.assistant and not a.no_draft:
            acfg, assistant = load_assistant(a.assistant, dtype=params.norm.dtype)
            acfg.check_target(cfg)
            drafter = Drafter(acfg, assistant, a.draft_tokens)
    except (CheckpointError, ConfigError) as e:
        where = f"--assistant {a.assistant}: " if isinstance(e, ConfigError) else ""
        raise GenerateError(f"{where}{e}") from None
    return EagerModel(cfg, params, max_context, ring=drafter.ring(cfg) if drafter else 0), drafter


def pte_drafter(pte: PteModel | None, a: argparse.Namespace) -> PteDrafter | None:
    """The .pte's own drafter, unless --no-draft (or --compare, which does not draft)."""
    if pte is None or a.no_draft or a.compare:
        return None
    if not pte.draft_tokens:
        if a.draft_tokens is not None:
            raise GenerateError(f"--draft-tokens: {pte.path} has no drafter (export it with --assistant)")
        return None
    return PteDrafter(pte, a.draft_tokens)


def check_args(a: argparse.Namespace) -> None:
    """Raises GenerateError naming the first bad argument, before anything is loaded."""
    bad = [
        (a.max_new_tokens < 1, f"--max-new-tokens must be >= 1, got {a.max_new_tokens}"),
        (a.max_seq_len < 2, f"--max-seq-len must be >= 2, got {a.max_seq_len}"),
        (not a.temperature >= 0, f"--temperature must be >= 0, got {a.temperature}"),
        (a.top_k < 0, f"--top-k must be >= 0, got {a.top_k}"),
        (not 0 < a.top_p <= 1, f"--top-p must be in (0, 1], got {a.top_p}"),
        (a.size is not None and a.size not in CONFIGS, f"--size {a.size} is not one of {', '.join(CONFIGS)}"),
        (a.threads is not None and a.threads < 1, f"--threads must be >= 1, got {a.threads}"),
        (a.draft_tokens is not None and a.draft_tokens < 1, f"--draft-tokens must be >= 1, got {a.draft_tokens}"),
        (
            bool(a.assistant) and not a.no_draft and (not a.eager or a.compare),
            "--assistant drafts with --eager; a .pte drafts with the drafter exported into it (g4.export --assistant)",
        ),
        (
            bool(a.image or a.audio) and (a.tokens is not None or a.compare or a.render),
            f"--{'image' if a.image else 'audio'} goes with --prompt or --chat (not --tokens, --compare or --render)",
        ),
    ]
    for is_bad, message in bad:
        if is_bad:
            raise GenerateError(message)


def run(a: argparse.Namespace) -> int:
    """Generates (or compares) and prints text, then a stats line.

    Modes: a .pte (default); `--eager`: the pure forward; `--compare`: the .pte, checked against the
    pure forward. Each model is loaded once.
    """
    check_args(a)
    if not a.pte and (a.compare or not a.eager):
        raise GenerateError(
            "--compare needs a .pte" if a.compare else "give a .pte, or --eager with --checkpoint/--size"
        )
    a.chat = a.chat or bool(a.system or a.messages or a.think)
    if a.chat and a.tokens is not None:
        raise GenerateError("--tokens are fed as they are; give --prompt (or stdin turns) for --chat")
    if not a.chat and a.prompt is None and a.tokens is None:
        raise GenerateError("give --prompt or --tokens, or --chat to read turns from stdin")
    if a.render and (a.tokens is not None or (a.prompt is None and not a.messages)):
        raise GenerateError("--render prints the text of a --prompt or --messages conversation")
    pte = PteModel(a.pte, threads=a.threads) if a.pte and (a.compare or not a.eager) else None
    drafter: AnyDrafter | None = pte_drafter(pte, a)
    eager = None
    if a.eager or a.compare:
        eager, drafter = eager_model(a, pte.max_context if pte else a.max_seq_len)
    model = pte or eager
    assert model is not None
    if a.tokenizer:
        tok_path = Path(a.tokenizer)
    elif pte is not None:
        tok_path = pte.path.parent / "tokenizer.json"
    elif a.checkpoint:
        tok_path = Path(a.checkpoint) / "tokenizer.json"
    else:
        tok_path = TINY / "tokenizer.json"
    if eager is not None:  # a .pte carries its stop ids; the eager model takes the tokenizer folder's
        eager.eos_ids = chat.stop_ids(tok_path.parent if tok_path.is_file() else None, eager.cfg.eos_token_id)
    if pte is not None and eager is not None and pte.vocab_size != eager.vocab_size:
        raise GenerateError(
            f"--compare: {pte.path} has a vocabulary of {pte.vocab_size} tokens, the eager model {eager.vocab_size}"
        )
    if a.tokens is not None:
        try:
            prompt = [int(t) for t in a.tokens.split(",")]
        except ValueError:
            raise GenerateError(f"--tokens must be comma-separated integers, got {a.tokens!r}") from None
        return compare(pte, eager, prompt, a) if pte and eager else complete(model, prompt, None, a, drafter)
    tok = load_tokenizer(tok_path, model.vocab_size)
    convo = read_messages(a.messages)
    replied = last_user_turn(convo, a.messages) if (a.image or a.audio) and a.prompt is None and a.messages else -1
    seen, media = images(model, a.image or [], a.max_soft_tokens)
    heard, audio_ids = clips(model, a.audio or [])
    media += audio_ids  # the images' placeholders, then the clips', open the prompt
    parts = [x for x in (seen, heard) if x is not None]
    soft = torch.cat(parts) if parts else None
    if not a.chat:
        if a.render:
            print(tok.id_to_token(model.bos_id) + a.prompt, end="")
            return 0
        prompt = [model.bos_id, *media, *tok.encode(a.prompt, add_special_tokens=False).ids]
        if pte and eager:
            return compare(pte, eager, prompt, a)
        return complete(model, prompt, tok, a, drafter, soft)
    folder = tok_path.parent
    session = chat.Chat(
        model, tok, chat.template(folder), chat.special_tokens(folder), enable_thinking=a.think, drafter=drafter
    )
    pictures = "".join(tok.id_to_token(i) for i in media)  # the images and clips open the user turn replied to
    if replied >= 0:
        convo[replied] = {**convo[replied], "content": pictures + convo[replied]["content"]}
    first = ([{"role": "system", "content": a.system}] if a.system else []) + convo
    if a.prompt is not None or a.messages:
        first += [{"role": "user", "content": pictures + a.prompt}] if a.prompt is not None else []
        if a.render:
            session.messages = first
            print(session.text(), end="")
            return 0
        if pte and eager:
            session.messages = first
            return compare(pte, eager, session.prompt(), a)
        return turn(session, first, tok, a, soft)
    for line in sys.stdin:  # one user turn per line; the cache is kept between turns
        turn(session, [*first, {"role": "user", "content": pictures + line.rstrip("\n")}], tok, a, soft)
        first, pictures, soft = [], "", None
    return 0


def clips(model: EagerModel | PteModel, paths: list[str]) -> tuple[torch.Tensor | None, list[int]]:
    """The soft tokens `[n, H]` of the --audio files, and their placeholder ids."""
    if not paths:
        return None, []
    au = model.audio
    if au is None:
        raise GenerateError(
            f"--audio: {getattr(model, 'path', 'the model')} has no audio tower (export it with --audio)"
        )
    try:
        samples = [load_wav(p) for p in paths]
        feats = [features([s]) for s in samples]
    except ValueError as e:
        raise GenerateError(f"--audio {e}") from None
    t = time.perf_counter()
    soft = [model.encode_audio(x, m) for x, m in feats]
    seconds = sum(s.size for s in samples) / SAMPLE_RATE
    ms = (time.perf_counter() - t) * 1000 / seconds
    n = sum(x.shape[0] for x in soft)
    print(f"audio: {len(paths)} clip(s), {seconds:.1f} s, {n} soft tokens, {ms:.1f} ms per second", file=sys.stderr)
    return torch.cat(soft), [i for x in soft for i in au.placeholders(x.shape[0])]


def images(model: EagerModel | PteModel, paths: list[str], budget: int | None) -> tuple[torch.Tensor | None, list[int]]:
    """The soft tokens `[n, H]` of the --image files (at most `budget` each), and their placeholder ids."""
    if not paths:
        return None, []
    v = model.vision
    if v is None:  # (an eager model without one stopped at loading)
        raise GenerateError(
            f"--image: {getattr(model, 'path', 'the model')} has no vision tower (export it with --vision)"
        )
    budget = min(v.max_soft_tokens, DEFAULT_SOFT_TOKENS) if budget is None else budget
    allowed = [n for n in SOFT_TOKENS if n <= v.max_soft_tokens]
    if budget not in allowed:
        raise GenerateError(f"--max-soft-tokens must be one of {allowed} for this model, got {budget}")
    try:
        pixels, positions, counts = preprocess([load_image(p) for p in paths], v.config, budget)
    except ValueError as e:
        raise GenerateError(f"--image {e}") from None
    t0 = time.perf_counter()
    soft = torch.cat([model.encode(pixels[i : i + 1], positions[i : i + 1]) for i in range(len(paths))])
    ms = (time.perf_counter() - t0) * 1e3 / len(paths)
    print(f"vision: {len(paths)} image(s), {soft.shape[0]} soft tokens, {ms:.1f} ms per image", file=sys.stderr)
    return soft, [i for n in counts for i in v.placeholders(n)]


def read_messages(path: str | None) -> list[chat.Message]:
    """The conversation in a --messages JSON file (a list of role/content objects)."""
    if path is None:
        return []
    try:
        msgs = json.loads(Path(path).read_text())
    except OSError as e:
        raise GenerateError(f"--messages {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise GenerateError(f"--messages {path}: not JSON ({e})") from None
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
        raise GenerateError(f'--messages {path}: must be a JSON list of {{"role": ..., "content": ...}} objects')
    return msgs


def last_user_turn(messages: list[chat.Message], path: str) -> int:
    """Index of the turn `--image`/`--audio` open when replying to a --messages file: its last user turn."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users or not isinstance(messages[users[-1]].get("content"), str):
        raise GenerateError(
            f"--messages {path}: --image/--audio go at the start of the last user turn, "
            "and the conversation has none, or its content is not text"
        )
    return users[-1]


class Printer:
    """Streams decoded text; a thought (<|channel>...<channel|>) is hidden, or shown between marks."""

    def __init__(self, tok, show_thinking: bool):  # noqa: ANN001 (tokenizers.Tokenizer or None: print ids)
        self.tok, self.show = tok, show_thinking
        marks = [tok.token_to_id(m) if tok else None for m in (chat.THOUGHT_OPEN, chat.THOUGHT_CLOSE)]
        self.open: int | None = marks[0]
        self.close: int | None = marks[1]
        self.ids: list[int] = []
        self.printed, self.thinking = "", False

    def __call__(self, i: int) -> None:
        """Prints what token `i` adds to the text."""
        if self.tok is None:
            print(i, end=" ", flush=True)
            return
        if i in (self.open, self.close):
            self.thinking = i == self.open
            self.ids, self.printed = [], ""
            if self.show:
                print("[thought] " if self.thinking else " [/thought]\n", end="", flush=True)
            return
        self.ids.append(i)
        text = self.tok.decode(self.ids)
        if (self.show or not self.thinking) and not text.endswith("\ufffd"):  # hold back a partial character
            print(text[len(self.printed) :], end="", flush=True)
            self.printed = text


def complete(  # noqa: ANN001 (tok: tokenizers.Tokenizer or None)
    model: EagerModel | PteModel,
    prompt: list[int],
    tok,
    a: argparse.Namespace,
    drafter: AnyDrafter | None = None,
    soft: torch.Tensor | None = None,
) -> int:
    """Generates from prompt ids and prints the text (the ids without a tokenizer), then a stats line."""
    printer = Printer(tok, a.show_thinking)
    g = generate(model, prompt, a.max_new_tokens, sampler(a), on_token=printer, drafter=drafter, soft=soft)
    print()
    print(g.stats, file=sys.stderr)
    return 0


def turn(  # noqa: ANN001 (tok: tokenizers.Tokenizer)
    session: chat.Chat, messages: list[chat.Message], tok, a: argparse.Namespace, soft: torch.Tensor | None = None
) -> int:
    """One chat turn: the reply streamed, then a stats line with how many cached tokens were reused."""
    g = session.reply(messages, a.max_new_tokens, sampler(a), Printer(tok, a.show_thinking), soft)
    reused = len(session.cached) - (len(g.ids) - 1) - g.prompt_tokens
    print()
    print(f"{g.stats} | {reused} cached tokens reused", file=sys.stderr)
    return 0


def sampler(a: argparse.Namespace) -> Sampler:
    """The sampler the flags ask for."""
    return Sampler(a.temperature, a.top_k, a.top_p, a.seed)


def compare(pte: PteModel, eager: EagerModel, prompt: list[int], a: argparse.Namespace) -> int:
    """Greedy on the .pte, teacher-forced eager on the same tokens: first differing step, max |logit diff|."""
    g = generate(pte, prompt, a.max_new_tokens, Sampler(), stop=(), keep_logits=True)
    want = [eager.step(prompt, 0)]
    for i, t in enumerate(g.ids[:-1]):
        want.append(eager.step([t], len(prompt) + i))
    diffs = [float((p - e).abs().max()) for p, e in zip(g.logits, want, strict=True)]
    first = next((i for i, (p, e) in enumerate(zip(g.logits, want, strict=True)) if p.argmax() != e.argmax()), None)
    print(
        f"compared {len(g.ids)} greedy steps: "
        + ("no difference in tokens" if first is None else f"first differing token at step {first}")
        + f"; max |logit diff| {max(diffs):.3g}"
    )
    return 0 if first is None else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input exits with status 2 and one line on stderr."""
    a = parse(argv)
    try:
        return run(a)
    except (GenerateError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
