"""Group size and embedding bits: .pte size, run-time memory and logit error vs fp32, one export each.

    python bench/quant_options.py [--hidden 1536] [--layers 10] [--vocab 32768] [--ctx 1024]
        [--options 32:8 128:8 32:4 128:4]

Each option is GROUP:EMBEDDING_BITS for an 8da4w export of the same random checkpoint (E2B's
structure at `--hidden` width, `--layers` deep; the linears' int4 groups and the 4-bit tables' groups
are the same size). For each: .pte size, export peak RSS, then `bench/memory.py`'s run (peak RSS; its
speed is in the JSON, but compare speed side by side, bench/paired.py) and the logits of 8
teacher-forced sequences against fp32 eager `g4.forward` computed in another process (max |diff|,
KL, cosine, top-1). Writes bench/results/quant_options-TAG.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from memory import measure  # noqa: E402
from pte_vs_et import (  # noqa: E402
    ACCURACY_LEN,
    ACCURACY_SEQS,
    PEAK_RSS,
    REFERENCE,
    ROOT,
    WORK,
    accuracy,
    bench_config,
    run_child,
    versions,
)

import g4  # noqa: E402

EXPORT = (
    PEAK_RSS
    + """
import json, sys
from g4.export.__main__ import main
ck, out, ctx, gs, bits = sys.argv[1:]
args = [out, "--checkpoint", ck, "--max-seq-len", ctx, "--quantize", "8da4w", "--group-size", gs,
        "--embedding-quantize", bits]
assert main(args) == 0
print(json.dumps({"peak_rss": peak_rss()}))
"""
)

LOGITS = """
import json, sys, numpy as np, torch, g4
pte, out, seqs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
m = g4.PteModel(pte)
got = [[m.step(s[:128], 0)] + [m.step(s[t : t + 1], t) for t in range(128, len(s))] for s in seqs]
np.save(out, torch.stack([torch.stack(g) for g in got]).numpy())
print("{}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--options", nargs="+", default=["32:8", "128:8", "32:4", "128:4"], help="GROUP:EMBEDDING_BITS")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    cfg = bench_config(a.hidden, a.layers, a.vocab)
    tag = f"h{a.hidden}-l{a.layers}-v{a.vocab}"
    work = WORK / f"quant-options-{tag}"
    ck = work / "ck"
    if not (ck / "config.json").exists():
        g4.write_random_checkpoint(cfg, ck, seed=0, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    seqs = json.dumps(torch.randint(3, cfg.vocab_size, (ACCURACY_SEQS, ACCURACY_LEN), generator=gen).tolist())
    ref_path = work / "reference.npy"
    if "error" in (ref := run_child(REFERENCE, str(ck), str(ref_path), seqs)):
        sys.exit(f"error: reference logits: {ref['error']}")
    ref = np.load(ref_path, allow_pickle=False)
    rows = {}
    for opt in a.options:
        gs, bits = opt.split(":")
        pte = work / f"g{gs}-e{bits}-c{a.ctx}.pte"
        print(f"exporting group {gs}, {bits}-bit embeddings ...", file=sys.stderr, flush=True)
        ex = run_child(EXPORT, str(ck), str(pte), str(a.ctx), gs, bits)
        if "error" in ex:
            rows[opt] = {"export": ex}
            continue
        logits = work / f"logits-{opt.replace(':', '-')}.npy"
        if "error" in (lg := run_child(LOGITS, str(pte), str(logits), seqs)):
            sys.exit(f"error: logits of {pte}: {lg['error']}")
        rows[opt] = {
            "group_size": int(gs),
            "embedding_bits": int(bits),
            "pte_bytes": pte.stat().st_size,
            "export": ex,
            "run": measure(str(pte), 128, 64),
            "accuracy": accuracy(np.load(logits, allow_pickle=False), ref),
        }
        print(json.dumps({opt: rows[opt]}), file=sys.stderr, flush=True)
    res = {"config": tag, "ctx": a.ctx, "versions": versions(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    (Path(a.out) / f"quant_options-{tag}.json").write_text(json.dumps(res, indent=1))
    print("| group, embeddings | .pte | peak RSS | max abs Δ | KL mean | cos min | top-1 |")
    print("|---|---|---|---|---|---|---|")
    for opt, r in rows.items():
        if "accuracy" not in r:
            print(f"| {opt} | export failed: {r['export']['error']} |")
            continue
        acc, run = r["accuracy"], r["run"]
        cells = [
            f"{r['group_size']}, {r['embedding_bits']}-bit",
            f"{r['pte_bytes'] / 2**20:.0f} MiB",
            f"{run['status']['VmHWM'] / 2**20:.0f} MiB",
            f"{acc['max_abs_logit_diff']:.3f}",
            f"{acc['kl_mean']:.2e}",
            f"{acc['cos_min']:.4f}",
            f"{acc['top1_agree']:.3f}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
