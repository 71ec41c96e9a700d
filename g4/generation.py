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
from torch import Tensor

from g4.config import Config
from g4.fn import forward, init_cache
from g4.memory import no_mlock, page_on_demand
from g4.params import Params


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


class PteModel:
    """A .pte that follows ExecuTorch's LLM-runner conventions: `forward(tokens [1, T], input_pos [1])`.

    Its lookup tables stay on disk, paged in by the rows a token reads (`g4.memory`); `lock=True`
    loads it as ExecuTorch does by default, which for a privileged process locks them all in RAM.
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
        self.method = prog.load_method("forward")

    def step(self, tokens: Sequence[int], start: int) -> Tensor:
        """Logits `[V]` after feeding `tokens` at positions `start...` (in chunks the .pte accepts)."""
        logits = None
        for i in range(0, len(tokens), self.max_chunk):
            chunk = torch.tensor([list(tokens[i : i + self.max_chunk])], dtype=torch.int64)
            logits = self.method([chunk, torch.tensor([start + i], dtype=torch.int64)])[0]
        assert logits is not None
        return logits.reshape(-1, logits.shape[-1])[-1]


class EagerModel:
    """`g4.forward` with a cache, behind the same `step` interface as `PteModel`."""

    def __init__(self, cfg: Config, params: Params, max_context: int = 1024, eos_ids: Sequence[int] = ()):
        self.cfg, self.params, self.max_context = cfg, params, max_context
        self.vocab_size, self.bos_id = cfg.vocab_size, cfg.bos_token_id
        self.eos_ids = tuple(eos_ids) or cfg.eos_token_id
        self.cache = init_cache(cfg, max_seq_len=max_context, dtype=params.norm.dtype)

    def step(self, tokens: Sequence[int], start: int) -> Tensor:
        """Logits `[V]` (fp32) after feeding `tokens` at positions `start...`."""
        if start == 0:
            self.cache = init_cache(self.cfg, max_seq_len=self.max_context, dtype=self.params.norm.dtype)
        t = torch.tensor([list(tokens)], dtype=torch.int64)
        with torch.no_grad():
            logits, cache = forward(
                self.params, self.cfg, t, torch.arange(start, start + len(tokens)), self.cache, last_only=True
            )
        assert cache is not None
        self.cache = cache
        return logits[0, -1].float()


Model = PteModel | EagerModel


@attrs.frozen
class Sampler:
    """Greedy at temperature 0; otherwise temperature, then top-k, then top-p (nucleus), seeded."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def make(self) -> Callable[[Tensor], int]:
        """A sampling function with its own generator (same seed, same tokens)."""
        gen = torch.Generator().manual_seed(self.seed)

        def sample(logits: Tensor) -> int:
            if self.temperature <= 0:
                return int(logits.argmax())
            x = logits.float() / self.temperature
            if self.top_k > 0:
                kth = torch.topk(x, min(self.top_k, x.numel())).values[-1]
                x = x.masked_fill(x < kth, float("-inf"))
            if self.top_p < 1.0:
                p, idx = torch.sort(torch.softmax(x, -1), descending=True)
                drop = torch.cumsum(p, -1) - p > self.top_p  # keep the smallest prefix reaching top_p
                x[idx[drop]] = float("-inf")
            return int(torch.multinomial(torch.softmax(x, -1), 1, generator=gen))

        return sample


@attrs.frozen
class Generation:
    """Generated ids, per-step logits (optional) and timings."""

    ids: tuple[int, ...]
    logits: tuple[Tensor, ...]
    prompt_tokens: int
    ttft_s: float
    prefill_s: float
    decode_s: float

    @property
    def stats(self) -> str:
        """One line: TTFT, prefill and decode tokens/s, tokens generated, peak RSS."""
        n = len(self.ids)
        dec = (n - 1) / self.decode_s if n > 1 and self.decode_s > 0 else float("nan")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return (
            f"ttft {self.ttft_s * 1000:.0f} ms | prefill {self.prompt_tokens / self.prefill_s:.1f} tok/s | "
            f"decode {dec:.1f} tok/s | {n} tokens | peak RSS {rss:.0f} MiB"
        )


def generate(
    model: Model,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampler: Sampler = Sampler(),
    stop: Sequence[int] | None = None,
    on_token: Callable[[int], None] | None = None,
    keep_logits: bool = False,
    start: int = 0,
) -> Generation:
    """Prefill `prompt` at positions `start...` (0: a new sequence; more: after what the model's cache
    holds), then sample up to `max_new_tokens`, stopping after a token in `stop` (default: the model's)."""
    if not prompt:
        raise GenerateError("prompt is empty")
    if start + len(prompt) >= model.max_context:
        raise GenerateError(
            f"prompt is {start + len(prompt)} tokens; the model's context is {model.max_context} tokens"
        )
    if max(prompt) >= model.vocab_size or min(prompt) < 0:
        raise GenerateError(f"prompt token ids must be in [0, {model.vocab_size})")
    stop = tuple(model.eos_ids if stop is None else stop)
    sample = sampler.make()
    t0 = time.perf_counter()
    logits = model.step(prompt, start)
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
    return Generation(tuple(ids), tuple(kept), len(prompt), t_first - t0, t_first - t0, t_end - t_first)
