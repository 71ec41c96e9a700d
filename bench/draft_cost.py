"""What drafting costs inside a .pte exported with `--assistant`: the `draft` step and the verify
step against one decode step, and speculative decoding end to end.

    python bench/draft_cost.py write-assistant DIR [--size e2b]    # a random assistant of ASSUMED size
    python bench/draft_cost.py time MODEL.pte [--position 128] [--rounds 5] [--calls 5] [--out NAME.json]
    python bench/draft_cost.py rounding ANY.pte [--position 128]     # a chunk's last logits vs one-token steps

`time` prefills `--position` random tokens, then per round (T's order alternating) times `forward`
on T = 1 .. 1 + N tokens at that position (one untimed call first: XNNPACK re-plans when T changes)
and the `draft` method, `--calls` times each; medians. From them it models greedy speculative
decoding (N drafts each accepted with probability a: (1 - a^(N+1)) / (1 - a) tokens per round of
one verify step and N draft steps). Then it runs `g4.generate` end to end, plain and drafting,
twice each, alternating, from one prompt: with the random drafter (it is almost never accepted:
the cost of drafting for nothing) and with an oracle that pays for the `draft` calls but proposes the
greedy tokens of drafting itself (found by iterating: every draft accepted, the ceiling). It
reports how many tokens each run shares with plain greedy decoding before the first difference
(quantized kernels round a verify step's rows differently from one-token steps: near-ties flip), the
plain run's top-2 logit gap where the random-drafter run first differs, and how far the last logits of
an 8-token chunk and of the same 8 one-token steps lie apart.

Google's assistant configs are not available offline: `write-assistant` uses transformers'
Gemma4AssistantConfig defaults (2048 centroids, top 32) and assumed layer sizes (4 layers, hidden
256, MLP 2048, 4 query heads), so the draft step's cost is an estimate of the real drafter's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import g4
from g4.config import FULL, SLIDING, AssistantConfig
from g4.generation import PteDrafter, PteModel, generate

LAYERS = (SLIDING, SLIDING, SLIDING, FULL)


def assistant_config(size: str) -> AssistantConfig:
    """The assumed full-size drafter for `size` (see the module docstring)."""
    return AssistantConfig.for_target(
        g4.CONFIGS[size],
        hidden_size=256,
        intermediate_size=2048,
        num_attention_heads=4,
        layer_types=LAYERS,
        use_ordered_embeddings=True,
        num_centroids=2048,
        centroid_intermediate_top_k=32,
    )


class Oracle:
    """Pays for the .pte's `draft` calls, then proposes the target's own greedy continuation."""

    def __init__(self, model: PteModel, prompt_len: int, future: tuple[int, ...]):
        self.inner, self.tokens = PteDrafter(model), model.draft_tokens
        self.prompt_len, self.future = prompt_len, future

    def propose(self, target: PteModel, token: int, row: int, position: int, n: int) -> list[int]:
        self.inner.propose(target, token, row, position, n)
        start = position - self.prompt_len + 1
        return list(self.future[start : start + n])


def time_calls(m: PteModel, a: argparse.Namespace) -> dict[str, float]:
    """Median ms of forward at T = 1 .. 1 + N and of one draft step, at `a.position`."""
    gen = torch.Generator().manual_seed(0)
    m.verify(torch.randint(3, m.vocab_size, (a.position,), generator=gen).tolist(), 0)
    N = m.draft_tokens
    times: dict[str, list[float]] = {f"T{t}": [] for t in range(1, N + 2)} | {"draft": []}
    for r in range(a.rounds):
        for name in times if r % 2 == 0 else reversed(list(times)):
            if name == "draft":
                m.verify([5], a.position)  # its hidden state: a row the draft step reads
                call = lambda: m.draft(7, a.position + 1, 0)  # noqa: E731
            else:
                tokens = torch.randint(3, m.vocab_size, (int(name[1:]),), generator=gen).tolist()
                call = lambda tokens=tokens: m.verify(tokens, a.position)  # noqa: E731
            call()
            for _ in range(a.calls):
                t0 = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def modelled(ms: dict[str, float], N: int, accept: float) -> tuple[float, int]:
    """Best decode speedup over n = 1..N drafts at acceptance `accept`, and that n."""
    best = max(
        ((1 - accept ** (n + 1)) / (1 - accept) * ms["T1"] / (ms[f"T{n + 1}"] + n * ms["draft"]), n)
        for n in range(1, N + 1)
    )
    return round(best[0], 3), best[1]


def end_to_end(m: PteModel, new: int) -> dict[str, float]:
    """Decode tok/s plain and drafting (random drafter; oracle), two alternating runs each, best."""
    prompt = [2, *torch.randint(3, m.vocab_size, (31,), generator=torch.Generator().manual_seed(1)).tolist()]
    plain = generate(m, prompt, new, stop=(), keep_logits=True)
    want = plain.ids
    future = want  # the oracle's text: what drafting itself decodes, found by iterating to a fixed point
    for _ in range(4):
        g = generate(m, prompt, new, stop=(), drafter=Oracle(m, len(prompt), future))
        if g.ids == future:
            break
        future = g.ids
    runs: dict[str, list[float]] = {"plain": [], "random": [], "oracle": []}
    accepted: dict[str, str] = {}
    same: dict[str, int] = {}  # tokens equal to plain greedy decoding before the first that differs
    for _ in range(2):
        for name in runs:
            d = {"plain": None, "random": PteDrafter(m), "oracle": Oracle(m, len(prompt), future)}[name]
            g = generate(m, prompt, new, stop=(), drafter=d)
            runs[name].append((len(g.ids) - 1) / g.decode_s)
            accepted[name] = f"{g.accepted}/{g.drafted}"
            same[name] = next((i for i, (x, y) in enumerate(zip(g.ids, want, strict=True)) if x != y), len(want))
    best = {k: max(v) for k, v in runs.items()}
    top2 = torch.topk(plain.logits[same["random"]], 2).values if same["random"] < new else None
    return {f"{k}_tok_s": round(v, 2) for k, v in best.items()} | {
        "random_x": round(best["random"] / best["plain"], 3),
        "oracle_x": round(best["oracle"] / best["plain"], 3),
        "accepted_random": accepted["random"],
        "accepted_oracle": accepted["oracle"],
        "tokens_equal_to_plain_greedy_before_a_difference": same,
        "plain_top2_gap_where_random_drafting_first_differs": None
        if top2 is None
        else round(float(top2[0] - top2[1]), 4),
    }


def chunk_vs_steps(m: PteModel, position: int) -> dict[str, float]:
    """Max |difference| of the last logits of an 8-token chunk and of the same 8 tokens fed one by one."""
    prompt = torch.randint(3, m.vocab_size, (position,), generator=torch.Generator().manual_seed(2)).tolist()
    seq = list(range(1000, 1008))
    m.verify(prompt, 0)
    steps = [m.step([t], position + i) for i, t in enumerate(seq)][-1]
    m.verify(prompt, 0)
    chunk = m.step(seq, position)
    return {
        "max_abs_diff": round(float((steps - chunk).abs().max()), 4),
        "max_abs_logit": round(float(steps.abs().max()), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write-assistant")
    w.add_argument("dir")
    w.add_argument("--size", default="e2b", choices=("e2b", "e4b"))
    r = sub.add_parser("rounding")  # chunk_vs_steps of any .pte, with or without a drafter
    r.add_argument("pte")
    r.add_argument("--position", type=int, default=128)
    t = sub.add_parser("time")
    t.add_argument("pte")
    t.add_argument("--position", type=int, default=128)
    t.add_argument("--rounds", type=int, default=5)
    t.add_argument("--calls", type=int, default=5)
    t.add_argument("--new-tokens", type=int, default=64)
    t.add_argument("--out")
    a = ap.parse_args()
    if a.cmd == "write-assistant":
        Path(a.dir).mkdir(parents=True, exist_ok=True)
        g4.write_random_assistant(assistant_config(a.size), a.dir, seed=0)
        print(f"wrote a random {a.size} assistant (assumed size) to {a.dir}")
        return
    m = PteModel(a.pte)
    if a.cmd == "rounding":
        print(Path(a.pte).name, "last logits, an 8-token chunk vs 8 one-token steps:", chunk_vs_steps(m, a.position))
        return
    if not m.draft_tokens:
        raise SystemExit(f"{a.pte} has no drafter (export it with --assistant)")
    ms = time_calls(m, a)
    N = m.draft_tokens
    print(f"{Path(a.pte).name}, position {a.position}: decode step {ms['T1']:.1f} ms, draft step {ms['draft']:.2f} ms")
    print("| drafts n | verify 1 + n / decode step |")
    print("|---|---|")
    for n in range(1, N + 1):
        print(f"| {n} | {ms[f'T{n + 1}'] / ms['T1']:.2f} |")
    print(f"draft step / decode step: {ms['draft'] / ms['T1']:.3f}")
    model = {str(acc): modelled(ms, N, acc) for acc in (0.5, 0.7, 0.9)}
    print("modelled speedup (best n) at acceptance 0.5 / 0.7 / 0.9:", model)
    e2e = end_to_end(m, a.new_tokens)
    rounding = chunk_vs_steps(m, a.position)
    print("last logits, an 8-token chunk vs 8 one-token steps:", rounding)
    print("end to end:", e2e)
    if a.out:
        out = Path(__file__).parent / "results" / a.out
        result = {
            "command": f"python bench/draft_cost.py time {a.pte} --position {a.position} --rounds {a.rounds} "
            f"--calls {a.calls} --new-tokens {a.new_tokens}",
            "pte": Path(a.pte).name,
            "draft_tokens": N,
            "median_ms": {k: round(v, 3) for k, v in ms.items()},
            "verify_over_decode": {n: round(ms[f"T{n + 1}"] / ms["T1"], 3) for n in range(1, N + 1)},
            "draft_over_decode": round(ms["draft"] / ms["T1"], 4),
            "modelled_speedup_best_n": model,
            "end_to_end": e2e,
            "chunk_vs_steps_last_logits": rounding,
        }
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
