"""Gate and up as one GEMM: does the fused form win once lowered? One MLP of E2B's shape, two programs.

    python bench/fuse_mlp.py [--hidden 1536] [--ffn 6144 12288] [--rounds 7] [--calls 200] [--out NAME.json]

For each FFN width: `down(gelu(gate(x)) * up(x))` as g4 exports it (two GEMMs), and the same with
gate and up stacked (`[2F, H]`, one GEMM) and split after it. Both 8da4w (group 32, g4's quantizer),
exported with a dynamic length (1..256) as g4's `forward` is and lowered with one XnnpackPartitioner.
Prints where the split lands (delegate calls and portable ops per program), then times a decode
call (T = 1) and a 256-token call of each, interleaved in one process (`--rounds` of `--calls`
calls; median per call), and the max difference of their outputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from g4.export.fuse import cat_rows
from g4.export.quant import quantize_linear
from g4.fn.ops import gelu


class Mlp(torch.nn.Module):
    def __init__(self, gate: Tensor, up: Tensor, down: Tensor, fused: bool):
        super().__init__()
        self.fused, self.down = fused, torch.nn.Parameter(down, requires_grad=False)
        if fused:
            self.gate_up = torch.nn.Parameter(cat_rows([gate, up]), requires_grad=False)
        else:
            self.gate = torch.nn.Parameter(gate, requires_grad=False)
            self.up = torch.nn.Parameter(up, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.fused:
            return F.linear(gelu(F.linear(x, self.gate)) * F.linear(x, self.up), self.down)
        g, u = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return F.linear(gelu(g) * u, self.down)


def lower(m: Mlp, hidden: int) -> tuple[bytes, dict]:
    """The program's bytes, and its delegate calls and portable ops."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    T = torch.export.Dim("T", min=1, max=256)
    ep = torch.export.export(m, (torch.randn(1, 4, hidden),), dynamic_shapes=({1: T},), strict=False)
    prog = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    ops: dict[str, int] = {}
    for n in prog.exported_program().graph.nodes:
        if n.op == "call_function":
            name = getattr(n.target, "__name__", str(n.target))
            name = "delegate" if "call_delegate" in name else name
            ops[name] = ops.get(name, 0) + 1
    ops.pop("getitem", None)
    return prog.to_executorch().buffer, ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--ffn", type=int, nargs="+", default=[6144, 12288])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out")
    a = ap.parse_args()
    from g4.generation import runtime

    et, rows, keep = runtime(), [], []
    for ffn in a.ffn:
        gen = torch.Generator().manual_seed(0)
        w = [torch.randn(s, generator=gen) * 0.02 for s in ((ffn, a.hidden), (ffn, a.hidden), (a.hidden, ffn))]
        gate, up, down = (quantize_linear(x, "8da4w", 32) for x in w)
        methods, row = {}, {"hidden": a.hidden, "ffn": ffn}
        for name, fused in (("two", False), ("fused", True)):
            buf, ops = lower(Mlp(gate, up, down, fused).eval(), a.hidden)
            module = et._load_for_executorch_from_buffer(buf)
            keep.append((buf, module))  # the module reads the buffer it was loaded from
            methods[name] = module.run_method
            row[name + "_ops"] = ops
            print(f"F={ffn} {name}: {ops}", flush=True)
        for T, calls in ((1, a.calls), (256, max(1, a.calls // 20))):
            x = torch.randn(1, T, a.hidden, generator=gen)
            outs = {k: f("forward", (x,))[0] for k, f in methods.items()}
            row[f"max_abs_diff_T{T}"] = float((outs["two"] - outs["fused"]).abs().max())
            times: dict[str, list[float]] = {k: [] for k in methods}
            for _ in range(a.rounds):
                for k, f in methods.items():
                    t = time.perf_counter()
                    for _ in range(calls):
                        f("forward", (x,))
                    times[k].append((time.perf_counter() - t) / calls)
            for k, ts in times.items():
                row[f"{k}_ms_T{T}"] = statistics.median(ts) * 1e3
                row[f"{k}_ms_T{T}_range"] = [min(ts) * 1e3, max(ts) * 1e3]
            row[f"fused_vs_two_T{T}"] = row[f"two_ms_T{T}"] / row[f"fused_ms_T{T}"]
            print(
                f"F={ffn} T={T}: two GEMMs {row[f'two_ms_T{T}']:.3f} ms, fused {row[f'fused_ms_T{T}']:.3f} ms "
                f"(speed-up {row[f'fused_vs_two_T{T}']:.3f}x), max |diff| {row[f'max_abs_diff_T{T}']:.1e}",
                flush=True,
            )
        rows.append(row)
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
