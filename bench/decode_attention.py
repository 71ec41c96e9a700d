"""Long-context decode attention: what grouping the query heads would gain, and why g4 does not (yet).

    python bench/decode_attention.py sdpa [--heads 8] [--kv-heads 1] [--dim 512] [--out NAME.json]
    python bench/decode_attention.py two-methods
    python bench/decode_attention.py cond

`sdpa`: ExecuTorch's `llama::custom_sdpa` for one decode query against a filled cache of L keys, as
g4 calls it (`[1, 1, nq, d]`, causal from `start`), against the same op with the query heads of a
KV head folded into the sequence axis (`[1, g, nkv, d]`, not causal, over the first `start + 1`
keys: `start + 1 - g` as its start). The op runs each query head on its own, so E2B's 8 heads read
the cache 8 times; folded, once. Both against an fp64 reference.

`two-methods`: a program with two methods over the same 128 MiB of XNNPACK weights (the way to run a
grouped decode without a branch in the graph: ExecuTorch 1.5.1's `torch.cond` support fails on
data-dependent positions in its passes), loaded one and two methods at a time: RSS added.

`cond`: the branch itself, on one attention layer with a cache (8 query heads, 1 KV head): the grouped
call when the call has one token (`torch.cond` on `T == 1`), the per-head one otherwise, with the
cache position passed the three ways torch 2.13 might take it. Prints how far each gets (export, lowering,
running against eager).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def sdpa(a: argparse.Namespace) -> None:
    from g4.export.et import load_custom_ops

    load_custom_ops()
    nq, nkv, d = a.heads, a.kv_heads, a.dim
    g = nq // nkv
    S = max(a.lengths)
    gen = torch.Generator().manual_seed(0)
    K, V = torch.randn(1, S, nkv, d, generator=gen), torch.randn(1, S, nkv, d, generator=gen)

    def per_head(q: torch.Tensor, start: int) -> torch.Tensor:
        return torch.ops.llama.custom_sdpa(q, K, V, start, None, 0.0, True, 1.0)

    def grouped(q: torch.Tensor, start: int) -> torch.Tensor:
        qg = q.view(1, 1, nkv, g, d).permute(0, 1, 3, 2, 4).reshape(1, g, nkv, d)  # heads of a KV head as rows
        o = torch.ops.llama.custom_sdpa(qg, K, V, start + 1 - g, None, 0.0, False, 1.0)
        return o.view(1, 1, g, nkv, d).permute(0, 1, 3, 2, 4).reshape(1, 1, nq, d)

    rows = []
    for L in a.lengths:
        q = torch.randn(1, 1, nq, d, generator=gen)
        k = K[0, :L].double().repeat_interleave(g, 1).transpose(0, 1)  # [nq, L, d]
        v = V[0, :L].double().repeat_interleave(g, 1).transpose(0, 1)
        ref = (torch.softmax(q[0, 0].double()[:, None] @ k.transpose(1, 2), -1) @ v)[:, 0]  # [nq, d]
        row: dict = {"keys": L}
        for name, f in (("per_head", per_head), ("grouped", grouped)):
            f(q, L - 1)
            ts = []
            for _ in range(a.calls):
                t0 = time.perf_counter()
                out = f(q, L - 1)
                ts.append(time.perf_counter() - t0)
            row[name + "_ms"] = statistics.median(ts) * 1e3
            row[name + "_max_abs_err"] = float((out[0, 0].double() - ref).abs().max())
        row["speedup"] = row["per_head_ms"] / row["grouped_ms"]
        rows.append(row)
        print(
            f"{L} keys: per head {row['per_head_ms']:.2f} ms, grouped {row['grouped_ms']:.2f} ms "
            f"({row['speedup']:.2f}x); max |err| {row['per_head_max_abs_err']:.1e} / {row['grouped_max_abs_err']:.1e}"
        )
    if a.out:
        result = {"args": vars(a), "threads": torch.get_num_threads(), "rows": rows}
        Path(a.out).write_text(json.dumps(result, indent=2))


N = 4096


class _Two(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(N, N, bias=False)
        self.l2 = torch.nn.Linear(N, N, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x)))


def _rss() -> int:
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmRSS")).split()[1]) >> 10


def two_methods(_: argparse.Namespace) -> None:
    if len(sys.argv) > 2 and sys.argv[2] == "--child":  # load methods of a program, print RSS added
        from g4.generation import runtime

        et = runtime()
        r0 = _rss()
        prog = et._load_program(sys.argv[3], program_verification=et.Verification.Minimal)
        methods = [prog.load_method(m) for m in sys.argv[4:]]
        print(_rss() - r0, len(methods))
        return
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    m = _Two().eval()
    T = torch.export.Dim("T", min=1, max=64)
    ep1 = torch.export.export(m, (torch.randn(1, 4, N),), dynamic_shapes=({1: T},), strict=False)
    ep2 = torch.export.export(m, (torch.randn(1, 1, N),), strict=False)
    with tempfile.TemporaryDirectory() as tmp:
        pte = Path(tmp) / "two.pte"
        prog = to_edge_transform_and_lower({"forward": ep1, "decode": ep2}, partitioner=[XnnpackPartitioner()])
        pte.write_bytes(prog.to_executorch().buffer)
        print(f"program: {pte.stat().st_size >> 20} MiB for 128 MiB of weights used by both methods")
        for methods in (["forward"], ["forward", "decode"]):
            cmd = [sys.executable, __file__, "two-methods", "--child", str(pte), *methods]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
            print(f"load {' + '.join(methods)}: +{out[0]} MiB RSS")


class _Attend(torch.nn.Module):
    """One attention layer over a cache of S slots, grouped for one token, per head otherwise."""

    S, nq, d = 64, 8, 32

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.register_buffer("k", torch.zeros(1, self.S, 1, self.d))
        self.register_buffer("v", torch.zeros(1, self.S, 1, self.d))
        self.wq = torch.nn.Linear(self.d, self.nq * self.d, bias=False)
        self.wk = torch.nn.Linear(self.d, self.d, bias=False)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        T, nq, d = x.shape[1], self.nq, self.d
        start = input_pos[0].item()
        torch._check_is_size(start)
        torch._check(start + T <= self.S)
        q, kn = self.wq(x).view(1, T, nq, d), self.wk(x).view(1, T, 1, d)
        idx = torch.arange(start, start + T)[None]
        torch.ops.llama.update_cache_with_indices(kn, self.k, 0, idx)
        torch.ops.llama.update_cache_with_indices(kn, self.v, 0, idx)
        start_g = start + 1 - nq  # the grouped call reads start_g + nq keys

        def pos(p: torch.Tensor, i: int, closed: int) -> int:
            return p[i].item() if self.how == "item" else closed

        def per_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            return torch.ops.llama.custom_sdpa(q, k, v, pos(p, 0, start), None, 0.0, True, 1.0)

        def grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            qg = q.transpose(1, 2).reshape(1, -1, 1, d)  # the heads as the rows of one query
            o = torch.ops.llama.custom_sdpa(qg, k, v, pos(p, 1, start_g), None, 0.0, False, 1.0)
            return o.view(1, nq, -1, d).transpose(1, 2).contiguous()  # the per-head call's layout

        p = torch.cat([input_pos[:1], input_pos[:1] + 1 - nq])
        args = (q, self.k, self.v, start) if self.how == "symint" else (q, self.k, self.v, p)
        return torch.cond(T == 1, grouped, per_head, args).sum(-1)  # type: ignore[arg-type]


def cond(_: argparse.Namespace) -> None:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from g4.export.et import load_custom_ops

    load_custom_ops()
    ways = {
        "symint": "the position as an operand (a SymInt)",
        "item": "input_pos as an operand, .item() in each branch",
        "closure": "the branches close over the position",
    }
    for how, what in ways.items():
        m, stage = _Attend(how).eval(), "torch.export"
        try:
            T = torch.export.Dim("T", min=1, max=16)
            x = (torch.randn(1, 4, _Attend.d), torch.tensor([0]))
            ep = torch.export.export(m, x, dynamic_shapes=({1: T}, {0: None}), strict=False)
            stage = "to_edge_transform_and_lower"
            to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
            print(f"{how} ({what}): lowers")
        except Exception as e:  # noqa: BLE001 (the point is which stage fails, and how)
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
            msg = next((ln for ln in lines if ln.startswith("Explanation:")), lines[0])
            print(f"{how} ({what}): fails in {stage}: {type(e).__name__}: {msg[:200]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sdpa")
    s.add_argument("--heads", type=int, default=8)
    s.add_argument("--kv-heads", type=int, default=1)
    s.add_argument("--dim", type=int, default=512)
    s.add_argument("--lengths", type=int, nargs="+", default=[128, 4096, 8192, 32768])
    s.add_argument("--calls", type=int, default=20)
    s.add_argument("--out")
    t = sub.add_parser("two-methods")
    t.add_argument("--child", nargs="*")
    sub.add_parser("cond")
    a = ap.parse_args()
    {"sdpa": sdpa, "two-methods": two_methods, "cond": cond}[a.cmd](a)


if __name__ == "__main__":
    main()
