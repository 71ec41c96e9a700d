"""What a speculative verify step costs on a .pte: one call of 1 + N tokens against one decode step.

    python bench/verify_cost.py MODEL.pte [--max-drafts 6] [--position 128] [--rounds 15] [--out NAME.json]

Prefills `--position` tokens, then times `forward` on T = 1 .. 1 + max-drafts tokens at that
position (each call rewrites the same cache slots): per round and T, one untimed call (XNNPACK
re-plans its delegates when the input shape changes; drafting keeps T fixed) then `--calls` timed
ones; T's order alternates between rounds. Reports each T's median as a ratio of T = 1's.

A verify step also needs the LM head on every one of the T positions, where this program computes
it for the last only; `--head-ms` (one position's head, from `bench/lm_head.py`) adds (T - 1) of it.

From the ratios it models greedy speculative decoding: with N drafts each accepted with probability
a (independently), a round yields (1 - a^(N+1)) / (1 - a) tokens for one verify step plus N drafter
steps; the drafter step's cost is given as a fraction of a decode step (`--draft-cost`, the
assistant's share; not measured here: no full-size drafter was exported). Modelled, not measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import g4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pte")
    ap.add_argument("--max-drafts", type=int, default=6)
    ap.add_argument("--position", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--head-ms", type=float, default=0.0)
    ap.add_argument("--draft-cost", type=float, nargs="+", default=[0.0, 0.05, 0.1])
    ap.add_argument("--out")
    a = ap.parse_args()
    m = g4.PteModel(a.pte)
    gen = torch.Generator().manual_seed(0)
    m.step(torch.randint(3, m.vocab_size, (a.position,), generator=gen).tolist(), 0)
    sizes = range(1, a.max_drafts + 2)
    times: dict[int, list[float]] = {t: [] for t in sizes}
    for r in range(a.rounds):
        for t in sizes if r % 2 == 0 else reversed(sizes):
            tokens = torch.randint(3, m.vocab_size, (t,), generator=gen).tolist()
            m.step(tokens, a.position)
            for _ in range(a.calls):
                t0 = time.perf_counter()
                m.step(tokens, a.position)
                times[t].append(time.perf_counter() - t0)
    med = {t: statistics.median(v) * 1e3 + a.head_ms * (t - 1) for t, v in times.items()}
    print(f"{Path(a.pte).name}, position {a.position}: one decode step {med[1]:.1f} ms")
    print("| drafts N | verify 1 + N tokens, ms | / decode step |")
    print("|---|---|---|")
    for t in sizes:
        print(f"| {t - 1} | {med[t]:.1f} | {med[t] / med[1]:.2f} |")
    model = []
    print("\nmodelled speed-up (greedy), best N in brackets:")
    print("| drafter step / decode step | " + " | ".join(f"accept {x}" for x in (0.5, 0.7, 0.9)) + " |")
    print("|---|---|---|---|")
    for c in a.draft_cost:
        cells = []
        for acc in (0.5, 0.7, 0.9):
            tokens = {n: (1 - acc ** (n + 1)) / (1 - acc) for n in range(1, a.max_drafts + 1)}
            best = max((tokens[n] / (med[n + 1] / med[1] + n * c), n) for n in tokens)
            cells.append(f"{best[0]:.2f}x (N={best[1]})")
            model.append({"draft_cost": c, "acceptance": acc, "speedup": best[0], "drafts": best[1]})
        print(f"| {c} | " + " | ".join(cells) + " |")
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "ms": times, "median_ms": med, "model": model}, indent=2))


if __name__ == "__main__":
    main()
