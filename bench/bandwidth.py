"""Decode speed as a fraction of the memory-bandwidth limit of this machine.

    python bench/bandwidth.py OUT.pte --size e2b [--layers N] [--hidden H] [--vocab V] --quantize 8da4w
        --embedding-quantize 8 [--group-size 32] [--pos 128]

1. Measures this machine's memory bandwidth, best of 5, on all threads: a STREAM-like copy of a
   1 GiB buffer (bytes read + written per second) and a read-only pass (a sum over 1 GiB, which is
   what a decode step mostly does); the bound uses the higher of the two.
2. Computes the bytes one decode step must read for the exported configuration: every linear weight
   (with its scales), the LM head, one row of each embedding table, and the KV cache each layer reads
   at position `--pos`.
3. Runs the .pte for 32 decode steps at `--pos` and prints tok/s against the bound.
4. The kernel's own limit: a .pte holding only one linear of the model's largest shape (the LM head)
   with the same quantization, lowered to XNNPACK the same way, run for one token at a time. The
   weight bytes it reads per second are what XNNPACK's GEMV reaches on this machine; a whole decode
   step cannot read faster than that.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import torch

from g4.export.quant import EMBEDDING_TABLES
from g4.params import param_shapes

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from pte_vs_et import bench_config  # noqa: E402

import g4  # noqa: E402


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Bytes moved per second (read + write) by a large tensor copy."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def read_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Bytes read per second by a reduction over a large buffer (torch's parallel sum)."""
    src = torch.ones(nbytes // 4)
    src.sum()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def kernel_bandwidth(rows: int, cols: int, quantize: str, group: int, reps: int = 20) -> float:
    """Weight bytes per second XNNPACK's one-token linear reads: a .pte of one `[rows, cols]` linear."""
    return linear_bytes(rows * cols, rows, quantize, group) / linear_seconds(rows, cols, quantize, group, reps)


def linear_seconds(rows: int, cols: int, quantize: str, group: int, reps: int = 20) -> float:
    """Best time of one token through a .pte holding one `[rows, cols]` linear, lowered to XNNPACK."""
    return best_seconds(*linear_program(rows, cols, quantize, group), reps=reps)


def linear_program(rows: int, cols: int, quantize: str, group: int) -> tuple[Any, torch.Tensor]:
    """A loaded .pte holding one `[rows, cols]` linear (lowered to XNNPACK as the export lowers it), and an input."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from g4.export.quant import quantize_linear

    lin = torch.nn.Linear(cols, rows, bias=False)
    w = torch.randn(rows, cols) * cols**-0.5
    lin.weight = torch.nn.Parameter(quantize_linear(w, quantize, group), requires_grad=False)
    del w
    x = torch.randn(1, 1, cols)
    with torch.no_grad():
        ep = torch.export.export(lin, (x,))
    buf = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
    del lin, ep
    prog = Runtime.get().load_program(buf)
    m = prog.load_method("forward")
    m.keep = (prog, buf)  # the method runs on both: they live as long as it does
    m.execute([x])
    return m, x


def best_seconds(m: Any, x: torch.Tensor, reps: int = 20) -> float:
    """Best of `reps` calls of method `m` on `x`."""
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        m.execute([x])
        best = min(best, time.perf_counter() - t)
    return best


def linear_bytes(n: int, rows: int, quantize: str, group: int) -> float:
    """Bytes of an `n`-element linear weight with its scales."""
    if quantize == "8da4w":
        return n * 0.5 + (n / group) * 2  # int4 + a bf16 scale per group (as the .pte holds them for XNNPACK)
    if quantize == "8da8w":
        return n + rows * 4
    return n * 4


def bytes_per_token(cfg: g4.Config, quantize: str, emb_bits: int, group: int, pos: int, ring: int) -> dict:
    """What one decode step reads, by part."""

    parts = {"linear": 0.0, "lm_head": 0.0, "embedding_rows": 0.0, "kv_cache": 0.0}
    for path, shape in param_shapes(cfg).items():
        n = math.prod(shape)
        if path in EMBEDDING_TABLES:
            parts["embedding_rows"] += shape[1] * (emb_bits / 8 if emb_bits else 4)
            if path == "embed_tokens":
                parts["lm_head"] += linear_bytes(n, shape[0], quantize, group)
        elif len(shape) == 2:
            parts["linear"] += linear_bytes(n, shape[0], quantize, group)
        else:
            parts["linear"] += n * 4
    for s in cfg.layers[: cfg.first_shared]:
        slots = (ring if s.is_sliding else pos) + 1
        parts["kv_cache"] += 2 * slots * s.num_kv_heads * s.head_dim * 4
    parts["kv_cache"] *= 1  # consumers reuse the donors' K/V already read (same cache lines, assumed cached)
    return parts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pte")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--size", help="a named size instead of --hidden/--layers/--vocab")
    ap.add_argument("--quantize", default="8da4w")
    ap.add_argument("--embedding-quantize", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--pos", type=int, default=128)
    a = ap.parse_args()
    cfg = g4.CONFIGS[a.size] if a.size else bench_config(a.hidden, a.layers, a.vocab)
    copy_bw, read_bw = copy_bandwidth(), read_bandwidth()
    bw = max(copy_bw, read_bw)
    model = g4.PteModel(a.pte)
    ring = max(cfg.sliding_window, model.max_chunk)
    parts = bytes_per_token(cfg, a.quantize, a.embedding_quantize, a.group_size, a.pos, ring)
    total = sum(parts.values())
    model.step(list(range(3, 3 + min(a.pos, model.max_chunk))), 0)
    start = min(a.pos, model.max_chunk)
    for i in range(start, a.pos, model.max_chunk):
        model.step(list(range(3, 3 + min(model.max_chunk, a.pos - i))), i)
    t = time.perf_counter()
    for i in range(32):
        model.step([5], a.pos + i)
    tok_s = 32 / (time.perf_counter() - t)
    limit = bw / total
    del model
    kernel_bw = kernel_bandwidth(cfg.vocab_size, cfg.hidden_size, a.quantize, a.group_size)
    kernel_limit = kernel_bw / total
    rec = {
        "bandwidth_GBps": bw / 1e9,
        "copy_GBps": copy_bw / 1e9,
        "read_GBps": read_bw / 1e9,
        "bytes_per_token": parts,
        "total_MB": total / 1e6,
        "limit_tok_s": limit,
        "decode_tok_s": tok_s,
        "fraction_of_limit": tok_s / limit,
        "kernel_GBps": kernel_bw / 1e9,
        "kernel_limit_tok_s": kernel_limit,
        "fraction_of_kernel_limit": tok_s / kernel_limit,
        "threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
    }
    print(
        "| copy / read bandwidth | bytes/token | bound tok/s | measured tok/s | fraction "
        "| XNNPACK linear alone | its bound tok/s | fraction |\n|---|---|---|---|---|---|---|---|"
    )
    print(
        f"| {copy_bw / 1e9:.1f} / {read_bw / 1e9:.1f} GB/s | {total / 1e6:.1f} MB | {limit:.1f} | {tok_s:.1f} | "
        f"{tok_s / limit:.0%} | {kernel_bw / 1e9:.1f} GB/s | {kernel_limit:.1f} | {tok_s / kernel_limit:.0%} |"
    )
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
