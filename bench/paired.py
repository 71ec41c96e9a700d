"""Two .pte files in one process, their calls interleaved: a before/after that machine drift cannot bias.

    python bench/paired.py A.pte B.pte [--prompt-tokens 128] [--rounds 10] [--steps 8] [--out NAME.json]

Both programs are loaded (`g4.PteModel`) into one process. Each round prefills the same prompt in
A and B (order alternating between rounds), then decodes `--steps` tokens in A and `--steps` in B
from there. Prints, for each, the median prefill time and decode tok/s, and the median and range of
the per-round ratio B / A: a pair of calls runs seconds apart, so a slow minute slows both.
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
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out")
    a = ap.parse_args()
    models = {"a": g4.PteModel(a.a), "b": g4.PteModel(a.b)}
    prompt = torch.randint(3, models["a"].vocab_size, (a.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    rounds = []
    for r in range(a.rounds):
        row: dict = {}
        for k in ("a", "b") if r % 2 == 0 else ("b", "a"):
            m = models[k]
            t = time.perf_counter()
            logits = m.step(prompt.tolist(), 0)
            prefill = time.perf_counter() - t
            steps = []
            for i in range(a.steps):
                t = time.perf_counter()
                logits = m.step([int(logits.argmax())], a.prompt_tokens + i)
                steps.append(time.perf_counter() - t)
            row[k] = {"prefill_s": prefill, "decode_tok_s": 1 / statistics.median(steps)}
        rounds.append(row)
    names = {"a": Path(a.a).name, "b": Path(a.b).name}
    print(f"| metric | {names['a']} | {names['b']} | B / A per round: median (min-max) |")
    print("|---|---|---|---|")
    for key, label, fmt in (
        ("prefill_s", f"prefill {a.prompt_tokens} tokens, ms", 1e3),
        ("decode_tok_s", "decode tok/s", 1),
    ):
        va, vb = ([r[k][key] * fmt for r in rounds] for k in ("a", "b"))
        ratios = [y / x for x, y in zip(va, vb, strict=True)]
        print(f"| {label} | {statistics.median(va):.1f} | {statistics.median(vb):.1f} | "
              f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) |")  # fmt: skip
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "rounds": rounds}, indent=1) + "\n")


if __name__ == "__main__":
    main()
