"""Two or more .pte files run in turn, each in a fresh process, for a before/after a skeptic accepts.

    python bench/side_by_side.py A.pte B.pte [...] [--rounds 5] [--prompt-tokens 128] [--new-tokens 64]
        [--threads 1 2] [--out bench/results/NAME.json]

Each round runs every .pte once (`bench/memory.py`'s process: load, a prefill, greedy decoding), the
order rotating from round to round (with `--threads`, every .pte at each pool size). Prints, per
.pte, the median and min-max over the rounds of TTFT, decode tok/s and peak RSS, and each median as
a ratio of the first's; `--out` keeps every round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import measure  # noqa: E402

METRICS = {  # name -> (read from a run, format)
    "TTFT ms": (lambda r: r["ttft_s"] * 1e3, "{:.0f}"),
    "decode tok/s": (lambda r: r["decode_tok_s"], "{:.1f}"),
    "peak RSS GiB": (lambda r: r["status"]["VmHWM"] / 2**30, "{:.2f}"),
}


def summary(values: list[float], fmt: str) -> str:
    """`median (min-max)`."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pte", nargs="+")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", help="thread pool sizes to run each .pte at")
    ap.add_argument("--out", help="JSON file for every round")
    a = ap.parse_args()
    for p in a.pte:
        if not Path(p).is_file():
            ap.error(f"{p}: no such file")
    variants = [(p, t) for p in a.pte for t in a.threads or [None]]
    runs: dict[str, list[dict]] = {f"{p}@{t}": [] for p, t in variants}
    for r in range(a.rounds):
        for p, t in variants[r % len(variants) :] + variants[: r % len(variants)]:
            runs[f"{p}@{t}"].append(measure(p, a.prompt_tokens, a.new_tokens, threads=t))
            got = ", ".join(f"{k} {f.format(g(runs[f'{p}@{t}'][-1]))}" for k, (g, f) in METRICS.items())
            print(f"round {r + 1} {p} threads {t}: {got}", file=sys.stderr, flush=True)
    first = next(iter(runs))
    print("| .pte | threads | MiB | " + " | ".join(f"{k}: median (min-max) | ratio" for k in METRICS) + " |")
    print("|---|---|---|" + "---|---|" * len(METRICS))
    for (path, t), p in zip(variants, runs, strict=True):
        cells = [Path(path).name, str(t or "default"), f"{runs[p][0]['pte_bytes'] / 2**20:.0f}"]
        for g, f in METRICS.values():
            v = [g(x) for x in runs[p]]
            cells += [summary(v, f), f"{statistics.median(v) / statistics.median([g(x) for x in runs[first]]):.2f}x"]
        print("| " + " | ".join(cells) + " |")
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
