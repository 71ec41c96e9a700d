"""Peak RSS of `g4.load_checkpoint` against the size of the parameters it returns.

    python bench/load_rss.py [--size e2b] [--layers 10] [--dir /tmp/g4-ck-mid]

Writes (once) a random bf16 checkpoint of the size with fewer layers, then loads it in a fresh
subprocess as bf16 and as fp32 and prints a markdown table.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import attrs

import g4
from g4.config import FULL, SLIDING


def reduced(size: str, layers: int) -> g4.Config:
    cfg = g4.CONFIGS[size]
    period = cfg.layer_types.index(FULL) + 1
    types = tuple(SLIDING if (i + 1) % period else FULL for i in range(layers - 1)) + (FULL,)
    return attrs.evolve(cfg, num_hidden_layers=layers, layer_types=types, num_kv_shared_layers=layers // 2)


def child(path: str, dtype: str) -> None:
    import torch

    t = time.perf_counter()
    _, params = g4.load_checkpoint(path, dtype=getattr(torch, dtype))
    dt = time.perf_counter() - t
    nbytes = sum(x.numel() * x.element_size() for _, x in g4.params.leaves_with_path(params))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"dtype": dtype, "param_bytes": nbytes, "peak_rss": peak, "seconds": dt}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="e2b")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--dir", default="/tmp/g4-ck-mid")
    ap.add_argument("--child", nargs=2)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    cfg = reduced(a.size, a.layers)
    if not (Path(a.dir) / "config.json").exists():
        g4.write_random_checkpoint(cfg, a.dir, progress=True)
    base = subprocess.run(
        [sys.executable, "-c", "import g4, resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"],
        capture_output=True,
        text=True,
        check=True,
    )
    print(f"{a.size} with {a.layers} layers; `import g4` alone peaks at {int(base.stdout) / 2**30:.2f} GiB\n")
    print("| load as | parameters | peak RSS | peak RSS - params | time |\n|---|---|---|---|---|")
    for dtype in ("bfloat16", "float32"):
        r = subprocess.run(
            [sys.executable, __file__, "--child", a.dir, dtype], capture_output=True, text=True, check=True
        )
        m = json.loads(r.stdout.strip().splitlines()[-1])
        gib = 2**30
        print(
            f"| {dtype} | {m['param_bytes'] / gib:.2f} GiB | {m['peak_rss'] / gib:.2f} GiB | "
            f"{(m['peak_rss'] - m['param_bytes']) / gib:.2f} GiB | {m['seconds']:.1f} s |"
        )


if __name__ == "__main__":
    main()
