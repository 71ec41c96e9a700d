"""Long contexts: prefill up to each position, then decode there; the KV cache's share of memory.

    python bench/long_context.py OUT.pte --size e2b [--kv-cache fp32|int8] [--positions 128 4096 8192 32768]
        [--steps 16] [--jump] [--out bench/results/NAME.json]

One process (`g4.PteModel`): from position 0 it prefills random tokens in the .pte's chunks up to
each position in turn, timing the prefill (the TTFT of a prompt that long, and tok/s), then decodes
`--steps` tokens there (median step). Prints a table and the peak RSS, and the KV cache's bytes for
`--size`, the .pte's context and `--kv-cache` (the cache is a buffer of the program: the same bytes).

`--jump` times without filling the cache first: at each position one prefill chunk (the .pte's
chunk, ending there), then the decode steps. The kernels' work depends on the position only (full
layers read the first `position + T` slots, sliding layers `T + min(position, ring)`), not on what
the slots hold, and the runtime zero-fills its planned buffers at load, so the slots are resident
memory either way; depths too slow to fill (an int8 cache at 32K) are measured all the same.
Checked against the filled cache on the same .pte (README, Long contexts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils import _pytree

import g4
from g4.fn.cache import init_cache


def kv_bytes(cfg: g4.Config, ctx: int, chunk: int, int8: bool) -> int:
    """Bytes of the cache the exporter builds for this context and chunk."""
    cache = init_cache(cfg, max_seq_len=ctx, max_chunk=chunk, int8=int8)
    return sum(t.nbytes for t in _pytree.tree_leaves(cache))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pte")
    ap.add_argument("--size", required=True, help="the named size the .pte was exported from (for the KV bytes)")
    ap.add_argument("--kv-cache", default="fp32", choices=("fp32", "int8"))
    ap.add_argument("--positions", type=int, nargs="+", default=[128, 4096, 8192, 32768])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--jump", action="store_true", help="time each position without filling the cache first")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out")
    a = ap.parse_args()
    m = g4.PteModel(a.pte, threads=a.threads)
    cfg = g4.CONFIGS[a.size]
    ends = [min(p, m.max_context - a.steps) for p in sorted(a.positions)]
    gen = torch.Generator().manual_seed(0)
    pos, prefill_s, rows = 0, 0.0, []
    for end in ends:
        if a.jump:  # one chunk ending at `end`, on whatever the slots before it hold
            pos = max(0, end - m.max_chunk)
        t = time.perf_counter()
        logits = m.step(torch.randint(3, m.vocab_size, (end - pos,), generator=gen).tolist(), pos)
        took = time.perf_counter() - t
        prefill_s += took
        chunk = {"chunk_tokens": end - pos, "chunk_s": took} if a.jump else {"prompt_s": prefill_s}
        pos, steps = end, []
        for _ in range(a.steps):
            t = time.perf_counter()
            logits = m.step([int(logits.argmax())], pos)
            steps.append(time.perf_counter() - t)
            pos += 1
        rows.append({"position": end, **chunk, "decode_tok_s": 1 / statistics.median(steps)})
        prefill_s += sum(steps)  # the decoded tokens are part of the next prompt
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    status = dict(ln.split(":", 1) for ln in Path("/proc/self/status").read_text().splitlines() if ":" in ln)
    out = {
        "command": " ".join(["python", *sys.argv]),
        "pte": str(a.pte),
        "context": m.max_context,
        "chunk": m.max_chunk,
        "kv_cache": a.kv_cache,
        "kv_bytes": kv_bytes(cfg, m.max_context, m.max_chunk, a.kv_cache == "int8"),
        "peak_rss_bytes": int(status["VmHWM"].split()[0]) * 1024,
        "threads": a.threads,
        "jump": a.jump,
        "rows": rows,
    }
    base = rows[0]["decode_tok_s"]
    print(f"context {out['context']}, KV cache {a.kv_cache} {out['kv_bytes'] / 2**20:.0f} MiB, "
          f"peak RSS {out['peak_rss_bytes'] / 2**30:.2f} GiB")  # fmt: skip
    head = "one chunk ending there: ms (tok/s)" if a.jump else "prompt of that many tokens: s (tok/s)"
    print(f"| position | {head} | decode tok/s | decode step vs the first |")
    print("|---|---|---|---|")
    for r in rows:
        p = r["position"]
        if a.jump:
            prompt = f"{r['chunk_s'] * 1e3:.0f} ({r['chunk_tokens'] / r['chunk_s']:.0f})"
        else:
            prompt = f"{r['prompt_s']:.1f} ({p / r['prompt_s']:.0f})"
        print(f"| {p} | {prompt} | {r['decode_tok_s']:.1f} | {base / r['decode_tok_s']:.2f}x |")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
