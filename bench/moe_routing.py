"""How to run 26B-A4B's experts in a static graph: three ways, one layer at the real widths, eager, 2 cores.

    python bench/moe_routing.py [--tokens 1 16] [--repeats 3]

One expert block of 26B-A4B (128 experts, 8 per token, H 2816, I 704, bf16 weights, random) on N
tokens, timed side by side (median of --repeats, the three ways interleaved):
- gather (`g4.fn.moe.experts_gathered`, the export's): each token's 8 experts' weights gathered, then
  batched matmuls;
- dense: every expert on every token, weighted by the (mostly zero) routing weights;
- loop (`g4.fn.moe.experts_loop`, eager g4's, as transformers' eager loop): each expert that was hit on
  its tokens (data-dependent shapes: not exportable).
Also prints the bytes each way reads and the outputs' largest difference from the loop.
Writes bench/results/moe_routing.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import g4
from g4.fn.moe import experts_gathered, experts_loop, route
from g4.fn.ops import gelu
from g4.params import Experts, Router

CFG = g4.CONFIGS["26b-a4b"]


def dense(e: Experts, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """All experts on all tokens; routing weights scattered into [N, E] (zeros for experts not chosen)."""
    full = torch.zeros(x.shape[0], e.gate_up_proj.shape[0], dtype=w.dtype).scatter(1, ids, w)
    gate, up = torch.einsum("nh,eoh->neo", x, e.gate_up_proj).chunk(2, -1)
    y = torch.einsum("nei,ehi->neh", gelu(gate) * up, e.down_proj)
    return (y * full.unsqueeze(-1)).sum(1).to(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    H, E, I, K = CFG.hidden_size, CFG.num_experts, CFG.moe_intermediate_size, CFG.top_k_experts
    dt = torch.bfloat16
    e = Experts(
        gate_up_proj=(torch.randn(E, 2 * I, H) * H**-0.5).to(dt), down_proj=(torch.randn(E, H, I) * I**-0.5).to(dt)
    )
    r = Router(proj=(torch.randn(E, H) * H**-0.5).to(dt), scale=torch.ones(H, dtype=dt), per_expert_scale=torch.ones(E))
    per_expert = (2 * I * H + H * I) * 2  # bytes of one expert's bf16 weights
    rows = []
    for n in a.tokens:
        x = torch.randn(n, H).to(dt)
        w, ids = route(r, x, CFG)
        ways = {"gather": experts_gathered, "dense": dense, "loop": experts_loop}
        times: dict[str, list[float]] = {k: [] for k in ways}
        outs = {}
        with torch.no_grad():
            for _ in range(a.repeats):
                for name, fn in ways.items():
                    t0 = time.perf_counter()
                    outs[name] = fn(e, x, w, ids)
                    times[name].append(time.perf_counter() - t0)
        hit = ids.unique().numel()
        reads = {"gather": n * K * per_expert, "dense": E * per_expert, "loop": hit * per_expert}
        for name in ways:
            diff = (outs[name].float() - outs["loop"].float()).abs().max().item()
            rows.append(
                dict(
                    tokens=n,
                    way=name,
                    ms=round(statistics.median(times[name]) * 1000, 2),
                    weight_bytes_read=reads[name],
                    max_abs_diff_vs_loop=diff,
                )
            )
            mib = reads[name] / 2**20
            print(f"N={n:4d} {name:6s} {rows[-1]['ms']:9.2f} ms  reads {mib:8.1f} MiB  |d| vs loop {diff:.2e}")
    out = Path(__file__).parent / "results" / "moe_routing.json"
    meta = dict(cmd="python bench/moe_routing.py", threads=torch.get_num_threads(), torch=torch.__version__)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
