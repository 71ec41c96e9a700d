"""The LM head for one token: int4 (group 32, 128) against int8 per channel, bytes and time side by side.

    python bench/lm_head.py [--size e2b] [--rounds 5]

Each variant is a .pte holding one linear of the size's LM head shape (`[vocab, hidden]`), lowered to
XNNPACK as the export lowers it, all loaded at once; one token at a time, best of 20 calls, rounds
alternating between the variants. The
bytes are the packed weights a decode step reads (XNNPACK keeps bf16 scales for int4 groups, fp32
per channel for int8). Answers whether the 8-bit embedding table could also serve as the LM head.
Writes bench/results/lm_head-SIZE.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bandwidth import best_seconds, linear_bytes, linear_program  # noqa: E402

import g4  # noqa: E402

VARIANTS = [("8da4w", 32), ("8da4w", 128), ("8da8w", 0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="e2b")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    cfg = g4.CONFIGS[a.size]
    V, H = cfg.vocab_size, cfg.hidden_size
    progs = {f"{q}/{g}": linear_program(V, H, q, g or 32) for q, g in VARIANTS}
    times: dict[str, list[float]] = {k: [] for k in progs}
    for _ in range(a.rounds):  # the variants alternate
        for k, (m, x) in progs.items():
            times[k].append(best_seconds(m, x))
    rows = {}
    for q, g in VARIANTS:
        t = times[f"{q}/{g}"]
        b = int(linear_bytes(V * H, V, q, g or 32))  # as XNNPACK holds them: bf16 group scales, fp32 per channel
        rows[f"{q}/{g}"] = {"bytes": b, "seconds": t, "median_ms": statistics.median(t) * 1e3, "GB_s": b / min(t) / 1e9}
        print(
            f"{q:6s} group {g or '-':>4}: {b / 2**20:6.0f} MiB, {statistics.median(t) * 1e3:6.2f} ms "
            f"({min(t) * 1e3:.2f}-{max(t) * 1e3:.2f}), {b / statistics.median(t) / 1e9:5.1f} GB/s"
        )
    out = Path(__file__).parent / "results" / f"lm_head-{a.size}.json"
    res = {"size": a.size, "shape": [V, H], "date": time.strftime("%Y-%m-%d"), "rows": rows}
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
