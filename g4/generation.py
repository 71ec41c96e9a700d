"""Token generation over a .pte or over the pure forward, with the same loop and sampler."""

from __future__ import annotations

import contextlib
import functools
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from g4.audio import encoder_frames
from g4.config import AssistantConfig, Config, VisionConfig
from g4.fn import cache as kv
from g4.fn import init_cache
from g4.fn.draft import draft_ring, draft_step, target_kv
from g4.fn.model import embed, head, hidden_states
from g4.fn.multimodal import audio_features, image_features, is_any, merge, spread
from g4.image import SOFT_TOKENS
from g4.memory import no_mlock, page_on_demand
from g4.params import Assistant, Params


class GenerateError(ValueError):
    """Bad input to generation (missing file, wrong program, too long a prompt): one clear line."""


@functools.cache
def runtime() -> Any:
    """ExecuTorch's runtime bindings (`executorch.extension.pybindings._C`), with the `llama::` and
    quantized kernels that g4 programs call.

    The bindings' Python wrapper (`portable_lib`, which `executorch.runtime` imports) first imports
    `executorch.exir` for a warning class: the exporter's whole stack, in RSS and start-up time, in a
    process that only runs a .pte (README, Run-time memory). The kernels' libraries are loaded as
    `executorch.extension.llm.custom_ops` and `executorch.kernels.quantized` load them.
    """
    import executorch
    from executorch.extension.pybindings import _C

    for lib in ("extension/llm/custom_ops/libcustom_ops_aot_lib.so", "kernels/quantized/libquantized_ops_aot_lib.so"):
        torch.ops.load_library(Path(executorch.__path__[0]) / lib)  # dlopen: once per process
    return _C


def set_threads(n: int) -> None:
    """XNNPACK's and the kernels' thread pool size for this process (ExecuTorch sizes it from the CPU
    at start: its performance cores, as cpuinfo counts them)."""
    if n < 1:
        raise GenerateError(f"threads must be >= 1, got {n}")
    runtime()._unsafe_reset_threadpool(n)


@attrs.frozen
class Vision:
    """What a model with a vision tower takes: patches of `config`'s size, up to `max_soft_tokens` soft
    tokens an image, each image written as `boi`, one `image_token_id` per soft token, `eoi`."""

    config: VisionConfig
    max_soft_tokens: int
    image_token_id: int
    boi_token_id: int
    eoi_token_id: int
    bidirectional: bool = False  # an image's soft tokens attend both ways: each image goes into one call

    def placeholders(self, n: int) -> list[int]:
        """The prompt ids of an image with `n` soft tokens."""
        return [self.boi_token_id, *[self.image_token_id] * n, self.eoi_token_id]


# What a runner needs of a vision program to cut images and lay out prompts (`get_` constant methods).
VISION_META = ("max_soft_tokens", "image_token_id", "boi_token_id", "eoi_token_id", "patch_size", "pooling_kernel_size")


@attrs.frozen
class Audio:
    """What a model with an audio tower takes: 16 kHz clips of up to 30 s, each written as `boa`, one
    `audio_token_id` per soft token, `eoa`; its encoder attends in blocks of `audio_chunk_size` frames."""

    audio_token_id: int
    boa_token_id: int
    eoa_token_id: int
    audio_chunk_size: int

    def placeholders(self, n: int) -> list[int]:
        """The prompt ids of a clip with `n` soft tokens."""
        return [self.boa_token_id, *[self.audio_token_id] * n, self.eoa_token_id]


AUDIO_META = tuple(f.name for f in attrs.fields(Audio))  # the `get_` constant methods of an audio program


def calls(tokens: Sequence[int], size: int, whole: int | None = None) -> list[tuple[int, int]]:
    """Spans `[i, j)` of at most `size` tokens covering `tokens`; with `whole`, none splits a run of that id
    (an image whose soft tokens attend both ways is fed in one call)."""
    spans, i = [], 0
    while i < len(tokens):
        j = min(i + size, len(tokens))
        if whole is not None and j < len(tokens) and tokens[j - 1] == tokens[j] == whole:
            k = j
            while k > i and tokens[k - 1] == whole:
                k -= 1
            if k == i:
                raise GenerateError(f"an image of more than {size} soft tokens does not fit one call of {size} tokens")
            j = k
        spans.append((i, j))
        i = j
    return spans


def soft_ids(model: PteModel | EagerModel) -> tuple[int, ...]:
    """The placeholder ids soft tokens replace in `model`'s prompts: its image token, its audio token."""
    v, a = model.vision, model.audio
    return (*(() if v is None else (v.image_token_id,)), *(() if a is None else (a.audio_token_id,)))


class PteModel:
    """A .pte that follows ExecuTorch's LLM-runner conventions: `forward(tokens [1, T], input_pos [1])`.

    Its lookup tables stay on disk, paged in by the rows a token reads (`g4.memory`); `lock=True`
    loads it as ExecuTorch does by default, which for a privileged process locks them all in RAM.
    A program exported with an assistant (`draft_tokens` > 0) also drafts (`PteDrafter`).
    """

    def __init__(self, path: str | Path, lock: bool = False, threads: int | None = None):
        path = Path(path)
        if not path.is_file():
            raise GenerateError(f"{path}: no such file")
        if threads is not None:
            set_threads(threads)
        with contextlib.nullcontext() if lock else no_mlock():
            self._load(path)
        if not lock:
            page_on_demand(path)

    def _load(self, path: Path) -> None:
        et = runtime()
        try:
            prog = et._load_program(str(path), program_verification=et.Verification.InternalConsistency)
        except Exception as e:
            raise GenerateError(f"{path}: not an ExecuTorch program ({e})") from None
        names = {prog.get_method_name(i) for i in range(prog.num_methods())}
        need = {"forward", "get_vocab_size", "get_max_context_len", "get_eos_ids"}
        if missing := need - names:
            raise GenerateError(f"{path}: not an LLM-runner program (no {', '.join(sorted(missing))} method)")

        def const(name: str, default: int | None = None) -> list[int]:
            if name not in names:
                return [default] if default is not None else []
            return [int(x) for x in prog.load_method(name)([])]

        self.path = path
        self.vocab_size = const("get_vocab_size")[0]
        self.max_context = const("get_max_context_len")[0]
        self.max_chunk = const("get_max_seq_len", self.max_context)[0]
        self.bos_id = const("get_bos_id", 2)[0]
        self.eos_ids = tuple(const("get_eos_ids"))
        self.draft_tokens = const("get_draft_tokens", 0)[0]
        self.method = prog.load_method("forward")
        self._draft = prog.load_method("draft") if self.draft_tokens else None
        self.vision: Vision | None = None  # how images are cut and laid out, if the program has a vision tower
        self.audio: Audio | None = None  # how clips are laid out, if the program has an audio tower

        def meta(method: str, names_: tuple[str, ...]) -> dict[str, int]:
            got = {n: const(f"get_{n}") for n in names_}
            if absent := [f"get_{n}" for n, v in got.items() if not v]:
                raise GenerateError(f"{path}: {method} without {', '.join(absent)} (export it again)")
            return {n: v[0] for n, v in got.items()}

        if "vision_encoder" in names:
            m = meta("a vision_encoder", VISION_META)
            v = VisionConfig(patch_size=m.pop("patch_size"), pooling_kernel_size=m.pop("pooling_kernel_size"))
            self.vision = Vision(v, **m, bidirectional=bool(const("get_bidirectional_vision", 0)[0]))
        if "audio_encoder" in names:
            self.audio = Audio(**meta("an audio_encoder", AUDIO_META))
        self._prog = prog
        self._methods: dict[str, Any] = {}

    def _method(self, name: str) -> Any:
        if name not in self._methods:  # loaded on first use: a text-only run never packs the tower's weights
            self._methods[name] = self._prog.load_method(name)
        return self._methods[name]

    def encode(self, pixel_values: Tensor, positions: Tensor) -> Tensor:
        """The soft tokens `[n, H]` of one image (`pixel_values [1, N, 3 * patch**2]`, `positions [1, N, 2]`)."""
        emb, real = self._method("vision_encoder")([pixel_values.contiguous(), positions.contiguous()])
        return emb[0][real[0]]

    def encode_audio(self, features: Tensor, mask: Tensor) -> Tensor:
        """The real soft tokens `[n, H]` of one clip (`features [1, F, mel]`, `mask [1, F]`), its frames padded
        to the encoder's grid (`g4.audio.encoder_frames`)."""
        assert self.audio is not None
        pad = encoder_frames(self.audio.audio_chunk_size, features.shape[1]) - features.shape[1]
        args = [F.pad(features, (0, 0, 0, pad)).contiguous(), F.pad(mask, (0, pad)).contiguous()]
        emb, real = self._method("audio_encoder")(args)
        return emb[0][real[0]]

    def verify(self, tokens: Sequence[int], start: int, last: int | None = None, soft: Tensor | None = None) -> Tensor:
        """Logits `[K, V]` of the last tokens fed at positions `start...` (in chunks the .pte accepts):
        K = 1, or with a drafter min(T, 1 + N) of the last chunk's T (`last` is the program's own). `soft`:
        soft tokens `[n, H]` for the image and audio placeholders among `tokens`, in order (`text_decoder`)."""
        logits = None
        embeds = None if soft is None else self._embeds(tokens, soft)
        whole = self.vision.image_token_id if soft is not None and self.vision and self.vision.bidirectional else None
        for i, j in calls(tokens, self.max_chunk, whole):
            chunk = torch.tensor([list(tokens[i:j])], dtype=torch.int64)
            if embeds is None:
                logits = self.method([chunk, torch.tensor([start + i], dtype=torch.int64)])[0]
            else:
                pos = torch.arange(start + i, start + j)
                logits = self._method("text_decoder")([chunk, pos, embeds[:, i:j].contiguous()])[0]
        assert logits is not None
        return logits.reshape(-1, logits.shape[-1])

    def _embeds(self, tokens: Sequence[int], soft: Tensor) -> Tensor:
        """`[1, T, H]`: the soft tokens at the placeholders, zeros elsewhere (the text_decoder's input)."""
        return spread(is_any(torch.tensor([list(tokens)]), soft_ids(self)), soft)

    def step(self, tokens: Sequence[int], start: int) -> Tensor:
        """Logits `[V]` after feeding `tokens` at positions `start...`."""
        return self.verify(tokens, start)[-1]

    def draft(self, token: int, position: int, row: int | None) -> int:
        """The program's drafter: the token after `token` at `position`, from hidden state `row` of the
        last `verify`'s logits (`None`: the drafter's own last)."""
        assert self._draft is not None
        i = self.draft_tokens + 1 if row is None else row
        args = [torch.tensor([[token]]), torch.tensor([position]), torch.tensor([i])]
        return int(self._draft(args)[0][0])


class EagerModel:
    """`g4.forward` with a cache, behind the same `step` interface as `PteModel`.

    `ring`: sliding-layer ring slots, at least the window's (speculative decoding needs more: `Drafter.ring`).
    """

    def __init__(
        self, cfg: Config, params: Params, max_context: int = 1024, eos_ids: Sequence[int] = (), ring: int = 0
    ):
        self.cfg, self.params, self.max_context, self.ring = cfg, params, max_context, ring
        self.vocab_size, self.bos_id = cfg.vocab_size, cfg.bos_token_id
        self.eos_ids = tuple(eos_ids) or cfg.eos_token_id
        self.cache = self._empty()
        t = cfg.towers
        self.vision: Vision | None = None
        self.audio: Audio | None = None
        if t is not None and t.vision is not None and params.vision_tower is not None:
            self.vision = Vision(
                t.vision, max(SOFT_TOKENS), t.image_token_id, t.boi_token_id, t.eoi_token_id, t.bidirectional_vision
            )
        if t is not None and t.audio is not None and params.audio_tower is not None:
            self.audio = Audio(t.audio_token_id, t.boa_token_id, t.eoa_token_id, t.audio.attention_chunk_size)

    def _empty(self) -> kv.Cache:
        dtype = self.params.norm.dtype
        return init_cache(self.cfg, max_seq_len=self.max_context, dtype=dtype, max_chunk=self.ring)

    def encode(self, pixel_values: Tensor, positions: Tensor) -> Tensor:
        """The soft tokens `[n, H]` of the images (`pixel_values [B, N, 3 * patch**2]`, `positions [B, N, 2]`)."""
        with torch.no_grad():
            return image_features(self.params, self.cfg, pixel_values, positions)

    def encode_audio(self, features: Tensor, mask: Tensor) -> Tensor:
        """The real soft tokens `[n, H]` of the clips (`features [B, F, mel]`, `mask [B, F]`)."""
        with torch.no_grad():
            return audio_features(self.params, self.cfg, features, mask)

    def verify(self, tokens: Sequence[int], start: int, last: int | None = None, soft: Tensor | None = None) -> Tensor:
        """Logits `[K, V]` (fp32) of the last K = min(T, `last`) tokens fed at `start...` (all T without
        `last`); their final hidden states stay in `hidden` `[K, H]` for a drafter. A call forgets what
        the cache held from `start` on (rejected drafts). `soft`: the soft tokens of the image and audio
        placeholders among `tokens`, in order."""
        if start == 0:
            self.cache = self._empty()
        t, positions = torch.tensor([list(tokens)], dtype=torch.int64), torch.arange(start, start + len(tokens))
        pair = blocks = None
        if soft is not None:
            t, pair, blocks = merge(self.cfg, t, soft)
        with torch.no_grad():
            h, cache = hidden_states(
                self.params, self.cfg, t, positions, self.cache, last=last, soft=pair, blocks=blocks
            )
            logits = head(self.params, self.cfg, h)
        assert cache is not None
        self.cache, self.hidden = cache, h[0]
        return logits[0].float()

    def step(self, tokens: Sequence[int], start: int) -> Tensor:
        """Logits `[V]` (fp32) after feeding `tokens` at positions `start...`."""
        return self.verify(tokens, start, last=1)[-1]


Model = PteModel | EagerModel


class Drafter:
    """An assistant drafter (`g4.fn.draft`) proposing tokens from an `EagerModel` target's cache and hidden state."""

    def __init__(self, acfg: AssistantConfig, params: Assistant, tokens: int | None = None):
        self.acfg, self.params = acfg, params
        self.tokens = acfg.draft_tokens if tokens is None else tokens
        if self.tokens < 1:
            raise GenerateError(f"draft tokens must be >= 1, got {self.tokens}")

    def ring(self, cfg: Config) -> int:
        """Ring slots a target needs (`g4.fn.draft.draft_ring`)."""
        return draft_ring(cfg, self.tokens)

    def propose(self, target: Model, token: int, row: int, position: int, n: int) -> list[int]:
        """`n` draft tokens after `token` (not yet fed, at `position`), from the target's final hidden
        state `row` of its last `verify` (the position before: the one that chose `token`)."""
        if not isinstance(target, EagerModel):
            raise GenerateError("an eager drafter drafts for an eager target (--eager)")
        cfg, keys, pos = target.cfg, target_kv(target.cfg, target.cache), torch.tensor([position])
        h, ids = target.hidden[row].view(1, 1, -1), []
        with torch.no_grad():
            for _ in range(n):
                e = embed(target.params.embed_tokens, torch.tensor([[token]]), cfg.hidden_size**0.5)
                logits, h = draft_step(self.params, self.acfg, torch.cat([e, h], -1), pos, keys)
                token = int(logits[0, -1].argmax())  # drafted greedily, as HF's MTP candidate generator
                ids.append(token)
        return ids


class PteDrafter:
    """The drafter inside a .pte (its `draft` method), behind `Drafter.propose`."""

    def __init__(self, model: PteModel, tokens: int | None = None):
        self.tokens = model.draft_tokens if tokens is None else tokens
        if not 1 <= self.tokens <= model.draft_tokens:
            raise GenerateError(
                f"draft tokens must be in [1, {model.draft_tokens}] for {model.path}, got {self.tokens}"
            )

    def propose(self, target: Model, token: int, row: int, position: int, n: int) -> list[int]:
        """`n` draft tokens after `token` at `position`, from `row` of the target's last `verify`."""
        assert isinstance(target, PteModel)
        ids: list[int] = []
        src: int | None = row
        for _ in range(n):
            token, src = target.draft(token, position, src), None
            ids.append(token)
        return ids


AnyDrafter = Drafter | PteDrafter


@attrs.frozen
class Sampler:
    """Greedy at temperature 0; otherwise temperature, then top-k, then top-p (nucleus), seeded."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def probs(self, logits: Tensor) -> Tensor:
        """The distribution tokens are drawn from (temperature > 0)."""
        x = logits.float() / self.temperature
        if self.top_k > 0:
            kth = torch.topk(x, min(self.top_k, x.numel())).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p < 1.0:
            p, idx = torch.sort(torch.softmax(x, -1), descending=True)
            drop = torch.cumsum(p, -1) - p > self.top_p  # keep the smallest prefix reaching top_p
            x[idx[drop]] = float("-inf")
        return torch.softmax(x, -1)

    def make(self) -> Callable[[Tensor], int]:
        """A sampling function with its own generator (same seed, same tokens)."""
        gen = torch.Generator().manual_seed(self.seed)

        def sample(logits: Tensor) -> int:
            if self.temperature <= 0:
                return int(logits.argmax())
            return int(torch.multinomial(self.probs(logits), 1, generator=gen))

        return sample

    def make_verifier(self) -> Callable[[Tensor, int], tuple[bool, int]]:
        """`(target logits, draft token) -> (accepted, token)`, with its own generator.

        Speculative sampling for a draft proposed with certainty (the drafter's argmax): accept it with
        the target's probability p(d); otherwise draw from p without d, renormalized. The token's
        distribution is exactly p (greedy: accepted iff it is the argmax, else the argmax).
        """
        gen = torch.Generator().manual_seed(self.seed + 1)

        def verify(logits: Tensor, draft: int) -> tuple[bool, int]:
            if self.temperature <= 0:
                best = int(logits.argmax())
                return best == draft, best
            p = self.probs(logits)
            if float(torch.rand((), generator=gen)) < float(p[draft]):
                return True, draft
            rest = p.clone()
            rest[draft] = 0.0
            return False, int(torch.multinomial(rest, 1, generator=gen))  # multinomial renormalizes

        return verify


@attrs.frozen
class Generation:
    """Generated ids, per-step logits (optional) and timings."""

    ids: tuple[int, ...]
    logits: tuple[Tensor, ...]
    prompt_tokens: int
    ttft_s: float
    prefill_s: float
    decode_s: float
    drafted: int = 0  # speculative decoding: draft tokens proposed
    accepted: int = 0  # ... and accepted by the target
    target_steps: int = 0  # target calls after the prefill (plain decoding: one per token after the first)

    @property
    def stats(self) -> str:
        """One line: TTFT, prefill and decode tokens/s, tokens generated, peak RSS."""
        n = len(self.ids)
        dec = (n - 1) / self.decode_s if n > 1 and self.decode_s > 0 else float("nan")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        line = (
            f"ttft {self.ttft_s * 1000:.0f} ms | prefill {self.prompt_tokens / self.prefill_s:.1f} tok/s | "
            f"decode {dec:.1f} tok/s | {n} tokens | peak RSS {rss:.0f} MiB"
        )
        if self.drafted:
            per = self.target_steps / max(n - 1, 1)
            line += f" | accepted {self.accepted}/{self.drafted} | {per:.2f} target steps per token"
        return line


def check_prompt(model: Model, prompt: Sequence[int], start: int, soft: Tensor | None = None) -> None:
    """Raises GenerateError if `prompt` is empty, does not fit the context after `start`, has bad ids, or
    image / audio placeholders other than `soft`'s rows."""
    if not prompt:
        raise GenerateError("prompt is empty")
    if start + len(prompt) >= model.max_context:
        raise GenerateError(
            f"prompt is {start + len(prompt)} tokens; the model's context is {model.max_context} tokens"
        )
    if max(prompt) >= model.vocab_size or min(prompt) < 0:
        raise GenerateError(f"prompt token ids must be in [0, {model.vocab_size})")
    ids = soft_ids(model)
    if not ids:
        if soft is not None:
            raise GenerateError("images / audio: this model has no towers (export with --vision, --audio)")
        return
    n, want = sum(prompt.count(i) for i in ids), 0 if soft is None else soft.shape[0]
    if n != want:
        raise GenerateError(f"prompt has {n} image / audio placeholder tokens for {want} soft tokens")


def generate(
    model: Model,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampler: Sampler = Sampler(),
    stop: Sequence[int] | None = None,
    on_token: Callable[[int], None] | None = None,
    keep_logits: bool = False,
    start: int = 0,
    drafter: AnyDrafter | None = None,
    soft: Tensor | None = None,
) -> Generation:
    """Prefill `prompt` at positions `start...` (0: a new sequence; more: after what the model's cache
    holds), then sample up to `max_new_tokens`, stopping after a token in `stop` (default: the model's).
    With a `drafter`, decoding is speculative (`speculate`): the same tokens greedily, the same
    distribution when sampling. `soft`: the soft tokens `[n, H]` of the images whose placeholders are in
    `prompt` (`model.encode`)."""
    if drafter is not None:
        if keep_logits:
            raise GenerateError("drafting keeps no logits")
        return speculate(model, drafter, prompt, max_new_tokens, sampler, stop, on_token, start, soft)
    check_prompt(model, prompt, start, soft)
    stop = tuple(model.eos_ids if stop is None else stop)
    sample = sampler.make()
    t0 = time.perf_counter()
    logits = model.verify(prompt, start, last=1, soft=soft)[-1]
    ids: list[int] = []
    kept: list[Tensor] = []
    t_first = time.perf_counter()
    pos = start + len(prompt)
    while len(ids) < max_new_tokens:
        if keep_logits:
            kept.append(logits)
        ids.append(sample(logits))
        if on_token:
            on_token(ids[-1])
        if ids[-1] in stop or pos >= model.max_context or len(ids) == max_new_tokens:
            break
        logits = model.step([ids[-1]], pos)
        pos += 1
    t_end = time.perf_counter()
    return Generation(
        tuple(ids),
        tuple(kept),
        len(prompt),
        t_first - t0,
        t_first - t0,
        t_end - t_first,
        target_steps=max(len(ids) - 1, 0),
    )


def speculate(
    model: Model,
    drafter: AnyDrafter,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampler: Sampler = Sampler(),
    stop: Sequence[int] | None = None,
    on_token: Callable[[int], None] | None = None,
    start: int = 0,
    soft: Tensor | None = None,
) -> Generation:
    """`generate` with draft rounds: the drafter proposes N tokens, the target feeds the last token and
    the N drafts in one call, keeps the drafts it agrees with (`Sampler.make_verifier`) and adds its own
    next token; the next call forgets the rejected drafts."""
    check_prompt(model, prompt, start, soft)
    if isinstance(model, EagerModel) and model.ring < (need := draft_ring(model.cfg, drafter.tokens)):
        raise GenerateError(f"the target's cache needs ring={need} for drafting, has {model.ring}")
    stop = tuple(model.eos_ids if stop is None else stop)
    sample, verify = sampler.make(), sampler.make_verifier()
    ids: list[int] = []

    def emit(token: int) -> bool:
        """Appends a token; whether generation is over."""
        ids.append(token)
        if on_token:
            on_token(token)
        return token in stop or len(ids) >= max_new_tokens

    t0 = time.perf_counter()
    logits = model.verify(prompt, start, last=1, soft=soft)  # the prompt's last logits (and hidden state)
    t_first = time.perf_counter()
    pos = start + len(prompt)
    drafted = accepted = steps = 0
    over = emit(sample(logits[-1]))
    row = len(logits) - 1  # the hidden state that chose the last token, in the target's last call
    while not over and pos < model.max_context:
        n = max(0, min(drafter.tokens, max_new_tokens - len(ids) - 1, model.max_context - pos - 1))
        drafts = drafter.propose(model, ids[-1], row, pos, n)
        logits = model.verify([ids[-1], *drafts], pos, last=n + 1)
        steps, drafted = steps + 1, drafted + n
        k, nxt = 0, None
        for d in drafts:
            ok, tok = verify(logits[k], d)
            if not ok:
                nxt = tok
                break
            k += 1
            if over := emit(d):
                break
        accepted += k
        if not over:
            over = emit(sample(logits[k]) if nxt is None else nxt)
        row, pos = len(logits) - 1 - n + k, pos + 1 + k
    t_end = time.perf_counter()
    return Generation(
        tuple(ids), (), len(prompt), t_first - t0, t_first - t0, t_end - t_first, drafted, accepted, target_steps=steps
    )
