"""`python -m g4.run OUT.pte --prompt "..."`: generate text from a .pte or from the pure forward."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from g4.checkpoint import CheckpointError, load_checkpoint
from g4.config import CONFIGS
from g4.generation import EagerModel, GenerateError, PteModel, Sampler, generate
from g4.params import init_params

TINY_TOKENIZER = Path(__file__).parent / "assets" / "tiny_tokenizer.json"
# Gemma 4's single-turn layout, used when the tokenizer folder carries no chat template.
GEMMA4_TURN = "<bos><|turn>user\n{prompt}<turn|>\n<|turn>model\n"


def chat_template(tokenizer_path: Path) -> str | None:
    """The Jinja chat template next to the tokenizer (chat_template.jinja or tokenizer_config.json)."""
    folder = tokenizer_path.parent
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        t = json.loads(cfg.read_text()).get("chat_template")
        return t if isinstance(t, str) else None
    return None


def render_chat(messages: list[dict[str, str]], template: str | None, bos: str = "<bos>") -> str:
    """The prompt text for a conversation, ending with the model's turn opener; GenerateError if it fails."""
    if template is None:
        if len(messages) != 1:
            raise GenerateError("multi-turn chat needs the checkpoint's chat template")
        return GEMMA4_TURN.format(prompt=messages[0]["content"])
    import jinja2

    def raise_exception(message: str) -> None:  # as transformers' template environment
        raise jinja2.TemplateError(message)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos)
    except jinja2.TemplateError as e:
        raise GenerateError(f"chat template does not render: {type(e).__name__}: {e}") from None


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
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="text prompt")
    g.add_argument("--tokens", help="raw prompt token ids, e.g. 2,17,42")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in Gemma 4's chat turn format")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eager", action="store_true", help="run g4.forward instead of a .pte")
    ap.add_argument("--checkpoint", help="weights for --eager / --compare (Hugging Face folder)")
    ap.add_argument("--size", help="named size with seeded random weights for --eager / --compare (e.g. tiny)")
    ap.add_argument("--max-seq-len", type=int, default=1024, help="eager cache length")
    ap.add_argument("--compare", action="store_true", help="run the .pte and the eager forward side by side")
    return ap.parse_args(argv)


def eager_model(a: argparse.Namespace, max_context: int) -> EagerModel:
    """The pure forward with --checkpoint or --size weights."""
    if a.checkpoint:
        try:
            cfg, params = load_checkpoint(a.checkpoint)
        except CheckpointError as e:
            raise GenerateError(str(e)) from None
    elif a.size in CONFIGS:
        cfg, params = CONFIGS[a.size], init_params(CONFIGS[a.size], seed=0)
    else:
        raise GenerateError("--eager/--compare need --checkpoint DIR or --size NAME (e.g. --size tiny)")
    return EagerModel(cfg, params, max_context)


def check_args(a: argparse.Namespace) -> None:
    """Raises GenerateError naming the first bad argument, before anything is loaded."""
    bad = [
        (a.max_new_tokens < 1, f"--max-new-tokens must be >= 1, got {a.max_new_tokens}"),
        (a.max_seq_len < 2, f"--max-seq-len must be >= 2, got {a.max_seq_len}"),
        (not a.temperature >= 0, f"--temperature must be >= 0, got {a.temperature}"),
        (a.top_k < 0, f"--top-k must be >= 0, got {a.top_k}"),
        (not 0 < a.top_p <= 1, f"--top-p must be in (0, 1], got {a.top_p}"),
        (a.size is not None and a.size not in CONFIGS, f"--size {a.size} is not one of {', '.join(CONFIGS)}"),
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
    pte = PteModel(a.pte) if a.pte and (a.compare or not a.eager) else None
    eager = eager_model(a, pte.max_context if pte else a.max_seq_len) if (a.eager or a.compare) else None
    model = pte or eager
    assert model is not None
    if a.tokenizer:
        tok_path = Path(a.tokenizer)
    elif pte is not None:
        tok_path = pte.path.parent / "tokenizer.json"
    elif a.checkpoint:
        tok_path = Path(a.checkpoint) / "tokenizer.json"
    else:
        tok_path = TINY_TOKENIZER
    tok = None if a.tokens is not None else load_tokenizer(tok_path, model.vocab_size)
    if a.tokens is not None:
        try:
            prompt = [int(t) for t in a.tokens.split(",")]
        except ValueError:
            raise GenerateError(f"--tokens must be comma-separated integers, got {a.tokens!r}") from None
    else:
        assert tok is not None
        if a.chat:
            try:
                text = render_chat([{"role": "user", "content": a.prompt}], chat_template(tok_path))
            except GenerateError as e:
                raise GenerateError(f"{tok_path.parent}: {e}") from None
            prompt = tok.encode(text, add_special_tokens=False).ids
        else:
            prompt = [model.bos_id, *tok.encode(a.prompt, add_special_tokens=False).ids]
    if pte is not None and eager is not None:
        if pte.vocab_size != eager.vocab_size:
            raise GenerateError(
                f"--compare: {pte.path} has a vocabulary of {pte.vocab_size} tokens, the eager model {eager.vocab_size}"
            )
        return compare(pte, eager, prompt, a)

    printed = ""
    ids: list[int] = []

    def stream(i: int) -> None:
        nonlocal printed
        ids.append(i)
        if tok is None:
            print(i, end=" ", flush=True)
            return
        text = tok.decode(ids)
        if not text.endswith("\ufffd"):  # hold back a partial UTF-8 character
            print(text[len(printed) :], end="", flush=True)
            printed = text

    sampler = Sampler(a.temperature, a.top_k, a.top_p, a.seed)
    gen = generate(model, prompt, a.max_new_tokens, sampler, on_token=stream)
    print()
    print(gen.stats, file=sys.stderr)
    return 0


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
