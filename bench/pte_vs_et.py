"""g4's .pte against the .pte of ExecuTorch's own Gemma 4 exporter, same checkpoint, same machine.

    python bench/pte_vs_et.py [--hidden 256] [--layers 10] [--vocab 32768] [--quant none 8da4w] [--ctx 1024]
        [--rounds 5] [--export-rounds 2]

Writes one random multimodal-layout checkpoint (the layout the peer reads) and exports it with both
exporters (text decoder only, same quantization and group size, same max context; g4 at its default
prefill chunk, 256, the peer taking up to ctx - 1 tokens a call), each `--export-rounds` times,
interleaved; the peer's export fails unless it loaded every parameter and used every tensor. Exports
are cached under a key of group size, torch and executorch versions and g4's commit (the JSON says
which were cached, and when each ran). Then each .pte runs `--rounds` times, alone in a fresh process,
g4 and the peer alternating: load, prefill of 128/512/1024-token prompts (g4 in its chunks, the peer in
one call; best of 3 calls), decode tok/s after 128 tokens and near the end of the context (median
step), peak RSS. Logits of 8 teacher-forced sequences (prefill 128 + 16 steps) are compared with fp32
eager g4.forward computed in another process: max abs diff, KL, cosine, top-1 agreement. The table
shows the median over rounds with min-max; ratios are of medians; the JSON keeps every number.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import attrs
import numpy as np
import torch

import g4
from g4.config import FULL, SLIDING
from g4.hf import config_to_hf

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("G4_BENCH_DIR", "/tmp/g4-bench"))


def bench_config(hidden: int, layers: int, vocab: int) -> g4.Config:
    """E2B's structure (4:1 pattern, KV sharing, double-wide MLP, PLE) at `hidden` width, `layers` deep."""
    base = g4.CONFIGS["e2b"]
    types = tuple(SLIDING if (i + 1) % 5 else FULL for i in range(layers - 1)) + (FULL,)
    scale = hidden / base.hidden_size
    return attrs.evolve(
        base,
        hidden_size=hidden,
        intermediate_size=int(base.intermediate_size * scale),
        num_hidden_layers=layers,
        layer_types=types,
        num_kv_shared_layers=layers // 2,
        vocab_size=vocab,
        vocab_size_per_layer_input=vocab,
    )


def et_variant_json(cfg: g4.Config, path: Path) -> str:
    """The peer's flat config format; returns the absolute `variant` stem its loader resolves."""
    d = {
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "global_head_dim": cfg.global_head_dim,
        "vocab_size": cfg.vocab_size,
        "intermediate_size": cfg.intermediate_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_local_base_freq": cfg.rope_local_base_freq,
        "partial_rotary_factor": cfg.partial_rotary_factor,
        "sliding_window": cfg.sliding_window,
        "layer_types": list(cfg.layer_types),
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "hidden_size_per_layer_input": cfg.hidden_size_per_layer_input,
        "vocab_size_per_layer_input": cfg.vocab_size_per_layer_input,
        "num_kv_shared_layers": cfg.num_kv_shared_layers,
        "use_double_wide_mlp": cfg.use_double_wide_mlp,
        "tie_word_embeddings": True,
    }
    (path.parent / f"{path.name}_config.json").write_text(json.dumps(d, indent=1))
    return str(path)


def run_child(code: str, *args: str) -> dict:
    """Runs `code` in a fresh interpreter; it prints one JSON line last. Adds wall time and peak RSS."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1], "wall_s": wall}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out | {"wall_s": wall}


# A child's own peak RSS: VmHWM of its address space. (ru_maxrss also counts what the parent held when
# it forked, folded in at exec: the parent here holds the logits and has read the .pte files.)
PEAK_RSS = """
def peak_rss():
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1]) * 1024
"""

EXPORT_G4 = (
    PEAK_RSS
    + """
import json, sys
from g4.export.__main__ import main
ck, out, quant, ctx, gs = sys.argv[1:]
args = [out, "--checkpoint", ck, "--max-seq-len", ctx, "--group-size", gs]  # g4's default prefill chunk
if quant == "8da4w": args += ["--quantize", "8da4w", "--embedding-quantize", "8"]
assert main(args) == 0
print(json.dumps({"peak_rss": peak_rss()}))
"""
)

# The peer loads with strict=False and logs what it misses: record every load_state_dict result and
# fail unless each parameter it computes with and every converted tensor found its place. Its
# KV-shared layers keep k/v projections they never run (they take the donor's K/V): not in a
# checkpoint, listed as unused. Buffers (its caches) are listed too.
EXPORT_ET = (
    PEAK_RSS
    + """
import json, re, sys, torch
seen = {"missing_params": [], "unused_params": [], "missing_buffers": [], "unexpected": [], "loaded": 0}
unused = re.compile(r"cross_decoder\\.layers\\.\\d+\\.self_attn\\.(k_proj|v_proj|k_norm)\\.weight$")
_load = torch.nn.Module.load_state_dict
def load_state_dict(self, sd, strict=True, assign=False):
    r = _load(self, sd, strict=strict, assign=assign)
    params = {n for n, _ in self.named_parameters()}
    for k in r.missing_keys:
        kind = "missing_buffers" if k not in params else "unused_params" if unused.search(k) else "missing_params"
        seen[kind].append(k)
    seen["unexpected"] += list(r.unexpected_keys)
    seen["loaded"] += len(sd) - len(r.unexpected_keys)
    return r
torch.nn.Module.load_state_dict = load_state_dict
from executorch.examples.models.gemma4.export_gemma4 import export_single_pte
ck, out, quant, ctx, gs, variant = sys.argv[1:]
export_single_pte(checkpoint_path=ck, output_path=out, text_quantize="none" if quant == "none" else "8da4w+emb8",
                  audio_quantize="none", vision_quantize="none", max_seq_len=int(ctx), max_patches=1260,
                  group_size=int(gs), tied_embedding=False, variant=variant, quantize_kv_cache=False,
                  include_audio=False, include_vision=False, use_custom_sdpa=True)
if seen["missing_params"] or seen["unexpected"] or not seen["loaded"]:
    sys.exit(f"the peer did not load every tensor: {seen}")
print(json.dumps({"peak_rss": peak_rss(), "peer_load": seen}))
"""
)

# One .pte, alone in its process (the reference logits come from another one): load, prefill
# (each prompt length 3 times; g4 in its chunks, the peer in one call), decode after 128 and near the
# end of the context, then (first round only) teacher-forced logits of ACCURACY_SEQS sequences.
RUN = (
    PEAK_RSS
    + """
import json, statistics, sys, time, numpy as np, torch
from executorch.extension.llm.custom_ops import custom_ops
from executorch.kernels import quantized
from executorch.runtime import Runtime
kind, pte, logits_out = sys.argv[1], sys.argv[2], sys.argv[6]
vocab, H, ctx = (int(x) for x in sys.argv[3:6])
seqs = json.loads(sys.argv[7])
t = time.perf_counter()
prog = Runtime.get().load_program(pte)
m = prog.load_method("forward" if kind == "g4" else "text_decoder")
load_s = time.perf_counter() - t
chunk = int(prog.load_method("get_max_seq_len").execute([])[0]) if kind == "g4" else ctx - 1
def step(tokens, start):
    out = None
    for i in range(0, tokens.shape[1], chunk):
        x, s = tokens[:, i : i + chunk], start + i
        if kind == "g4":
            out = m.execute([x, torch.tensor([s])])[0]
        else:
            out = m.execute([x, torch.arange(s, s + x.shape[1]), torch.zeros(1, x.shape[1], H)])[0]
    return out.reshape(-1)
gen = torch.Generator().manual_seed(0)
prefill_s = {}
for n in (128, 512, 1024):
    if n + 64 <= ctx:
        prompt = torch.randint(3, vocab, (1, n), generator=gen)
        prefill_s[n] = []
        for _ in range(3):  # the first call also pays one-time set-up
            t = time.perf_counter(); step(prompt, 0); prefill_s[n].append(time.perf_counter() - t)
prompt = torch.randint(3, vocab, (1, 128), generator=gen)
logits = step(prompt, 0)
decode_s = []
for i in range(32):
    tok = torch.tensor([[int(logits.argmax())]])
    t = time.perf_counter(); logits = step(tok, 128 + i); decode_s.append(time.perf_counter() - t)
far, pos = ctx - 20, 160
while pos < far:
    n = min(128, far - pos)
    step(torch.randint(3, vocab, (1, n), generator=gen), pos)
    pos += n
far_s = []
for i in range(16):
    t = time.perf_counter(); step(torch.tensor([[5]]), pos + i); far_s.append(time.perf_counter() - t)
rss = peak_rss()
if logits_out:
    got = []
    for seq in seqs:
        x = torch.tensor([seq])
        got.append([step(x[:, :128], 0)] + [step(x[:, t : t + 1], t) for t in range(128, x.shape[1])])
    np.save(logits_out, torch.stack([torch.stack(g) for g in got]).numpy())
print(json.dumps({"load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s, "far_s": far_s, "far_pos": pos,
                  "runtime_peak_rss": rss}))
"""
)

REFERENCE = """
import sys, json, numpy as np, torch, g4
ck, out, seqs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cfg, params = g4.load_checkpoint(ck)
x = torch.tensor(seqs)
with torch.no_grad():
    ref = g4.forward(params, cfg, x, torch.arange(x.shape[1]))[0][:, 127:]
np.save(out, ref.float().numpy())
print("{}")
"""

ACCURACY_SEQS, ACCURACY_LEN = 8, 128 + 16  # teacher-forced: the prefill's last logits and 16 steps


def accuracy(got: np.ndarray, ref: np.ndarray) -> dict:
    """The .pte's logits against fp32 eager over every position of every sequence."""
    g, r = got.reshape(-1, got.shape[-1]).astype(np.float64), ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    logp = r - r.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    logq = g - g.max(-1, keepdims=True)
    logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
    kl = (np.exp(logp) * (logp - logq)).sum(-1)  # KL(fp32 || .pte) per position
    cos = (g * r).sum(-1) / (np.linalg.norm(g, axis=-1) * np.linalg.norm(r, axis=-1))
    return {
        "positions": int(g.shape[0]),
        "max_abs_logit_diff": float(np.abs(g - r).max()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
        "top1_agree": float((g.argmax(-1) == r.argmax(-1)).mean()),
    }


def versions() -> dict:
    """Versions of what was measured."""
    import executorch.version
    import torch

    return {
        "torch": torch.__version__,
        "executorch": executorch.version.__version__,
        "python": platform.python_version(),
    }


def largest_planned(path: Path) -> list[dict]:
    """The decoder method's largest planned tensors (`bench/memory.py`)."""
    from memory import largest_planned as largest

    return largest(path)


def memory_plan(path: Path) -> int:
    """Bytes of the decoder method's memory plan (activations, KV caches, masks: one arena, held while loaded)."""
    from memory import layout

    return layout(path)["memory_plan"]


def g4_commit() -> str:
    """The last commit that changed g4/, `+dirty` with uncommitted changes to it."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "log", "-1", "--format=%h", "--", "g4"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "g4"], capture_output=True, text=True).stdout.strip()
    return (head or "unknown") + ("+dirty" if dirty else "")


def export_key(a: argparse.Namespace) -> str:
    """What an export depends on: group size, torch and executorch versions, g4's commit."""
    v = versions()
    key = f"gs{a.group_size}-torch{v['torch']}-et{v['executorch']}-g4{g4_commit()}"
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--quant", nargs="+", default=["none", "8da4w"])
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--group-size", default="32")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--rounds", type=int, default=5, help="runs of each .pte, g4 and the peer alternating")
    ap.add_argument("--export-rounds", type=int, default=2, help="timed exports of each, interleaved")
    ap.add_argument("--reexport", action="store_true", help="export again even if an earlier export exists")
    a = ap.parse_args()
    cfg = bench_config(a.hidden, a.layers, a.vocab)
    tag = f"h{a.hidden}-l{a.layers}-v{a.vocab}"
    work = WORK / tag
    ck = work / "ck"
    if not (ck / "config.json").exists():
        g4.write_random_checkpoint(cfg, ck, seed=0, dtype=torch.float32, multimodal=True)
    variant = et_variant_json(cfg, work / "et_variant")
    key = export_key(a)
    rows: dict = {}

    def pte(kind: str, q: str) -> Path:
        return work / f"{kind}-{q}-c{a.ctx}-{key}.pte"

    for r in range(a.export_rounds):  # g4 and the peer interleaved
        for q in a.quant:
            for kind, code, extra in (("g4", EXPORT_G4, ()), ("executorch", EXPORT_ET, (variant,))):
                out, row = pte(kind, q), rows.setdefault((kind, q), {"exports": []})
                done = out.with_suffix(".export.json")  # an earlier run's exports of this exact file
                if r == 0 and out.exists() and done.exists() and not a.reexport:
                    row["exports"] = [e | {"cached": True} for e in json.loads(done.read_text())]
                if len(row["exports"]) > r:
                    continue
                print(f"exporting {kind} {q} ({r + 1}/{a.export_rounds}) ...", file=sys.stderr, flush=True)
                ex = run_child(code, str(ck), str(out), q, str(a.ctx), a.group_size, *extra)
                row["exports"].append(ex | {"cached": False, "exported_at": time.strftime("%Y-%m-%d %H:%M:%S")})
                done.write_text(json.dumps([{k: v for k, v in e.items() if k != "cached"} for e in row["exports"]]))
    for (kind, q), row in rows.items():
        if not any("error" in e for e in row["exports"]):
            row["pte_bytes"], row["plan_bytes"] = pte(kind, q).stat().st_size, memory_plan(pte(kind, q))
            row["plan_largest"] = largest_planned(pte(kind, q))
    gen = torch.Generator().manual_seed(1)
    seqs = torch.randint(3, cfg.vocab_size, (ACCURACY_SEQS, ACCURACY_LEN), generator=gen).tolist()
    ref_path = work / "reference.npy"
    ref = run_child(REFERENCE, str(ck), str(ref_path), json.dumps(seqs))
    if "error" in ref:
        sys.exit(f"error: reference logits: {ref['error']}")
    for r in range(a.rounds):
        for (kind, q), row in rows.items():
            if any("error" in e for e in row["exports"]):
                continue
            logits = work / f"logits-{kind}-{q}.npy" if r == 0 else ""
            args = (kind, str(pte(kind, q)), str(cfg.vocab_size), str(cfg.hidden_size), str(a.ctx), str(logits))
            run = run_child(RUN, *args, json.dumps(seqs))
            row.setdefault("runs", []).append(run)
            if logits and "error" not in run:
                row["accuracy"] = accuracy(np.load(logits, allow_pickle=False), np.load(ref_path, allow_pickle=False))
    for (kind, q), row in rows.items():
        print(json.dumps({kind + "/" + q: {k: v for k, v in row.items() if k != "runs"}}), file=sys.stderr, flush=True)
    report(cfg, a, tag, rows)


def samples(row: dict, key: str) -> list[float]:
    """Every round's value of one metric of a .pte, in table units (GiB, MiB, s, tok/s)."""
    gib = 2**30
    ex = [e for e in row.get("exports", []) if "error" not in e]
    runs = [r for r in row.get("runs", []) if "error" not in r]
    if key == "export_s":
        return [e["wall_s"] for e in ex if not e.get("cached")] or [e["wall_s"] for e in ex]
    if key == "export_rss":
        return [e["peak_rss"] / gib for e in ex]
    if key in ("size", "plan"):
        v = row.get("pte_bytes" if key == "size" else "plan_bytes")
        return [v / 2**20] if v else []
    if key.startswith("prefill_"):
        n = key.split("_")[1]
        return [int(n) / min(r["prefill_s"][n]) for r in runs if n in r["prefill_s"]]  # best of a run's 3 calls
    if key == "decode_128":
        return [1 / statistics.median(r["decode_s"]) for r in runs]
    if key == "decode_far":
        return [1 / statistics.median(r["far_s"]) for r in runs]
    if key == "runtime_rss":
        return [r["runtime_peak_rss"] / gib for r in runs]
    if key == "load_s":
        return [r["load_s"] for r in runs]
    acc = row.get("accuracy", {})
    return [acc[key]] if key in acc else []


METRICS = [  # label, key, format; speed rows: median over the rounds (min-max)
    ("export wall s", "export_s", "{:.0f}"),
    ("export peak RSS GiB", "export_rss", "{:.2f}"),
    (".pte MiB", "size", "{:.1f}"),
    ("memory plan MiB (activations, caches, masks)", "plan", "{:.1f}"),
    ("load s", "load_s", "{:.2f}"),
    ("prefill tok/s, 128-token prompt", "prefill_128", "{:.0f}"),
    ("prefill tok/s, 512-token prompt", "prefill_512", "{:.0f}"),
    ("prefill tok/s, 1024-token prompt", "prefill_1024", "{:.0f}"),
    ("decode tok/s @128", "decode_128", "{:.1f}"),
    ("decode tok/s near end", "decode_far", "{:.1f}"),
    ("runtime peak RSS GiB (the .pte alone)", "runtime_rss", "{:.2f}"),
    ("max abs logit diff vs fp32 eager", "max_abs_logit_diff", "{:.2e}"),
    ("mean KL(fp32 eager ‖ .pte)", "kl_mean", "{:.2e}"),
    ("mean / min logit cosine vs fp32", "cos_mean", "{:.5f}"),
    ("top-1 agreement vs fp32 (teacher-forced)", "top1_agree", "{:.3f}"),
]


def cell(v: list[float], fmt: str) -> str:
    """`median (min-max)` of several values, the value of one, n/a of none."""
    if not v:
        return "n/a"
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"


def report(cfg: g4.Config, a: argparse.Namespace, tag: str, rows: dict) -> None:
    """Markdown table (ratios of medians first) and a JSON record."""
    lines = [
        f"### {tag}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}, context {a.ctx}",
        "",
        "| quant | metric | g4 / peer | g4 | ExecuTorch example |",
        "|---|---|---|---|---|",
    ]
    for q in a.quant:
        g, e = rows.get(("g4", q), {}), rows.get(("executorch", q), {})
        for label, key, fmt in METRICS:
            gv, ev = samples(g, key), samples(e, key)
            ratio = (
                f"{statistics.median(gv) / statistics.median(ev):.2f}x"
                if gv and ev and statistics.median(ev)
                else "n/a"
            )
            if key == "cos_mean":
                gc, ec = (cell(v, fmt) + " / " + cell(samples(r, "cos_min"), fmt) for v, r in ((gv, g), (ev, e)))
            else:
                gc, ec = cell(gv, fmt), cell(ev, fmt)
            lines.append(f"| {q} | {label} | {ratio} | {gc} | {ec} |")
        for kind, r in (("g4", g), ("executorch", e)):
            for part in [*r.get("exports", []), *r.get("runs", [])]:
                if "error" in part:
                    lines.append(f"| {q} | {kind} failed | {part['error'][:160]} | | |")
    text = "\n".join(lines)
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "mem_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        },
        "versions": versions() | {"g4": g4_commit()},
        "config": config_to_hf(cfg),
        "ctx": a.ctx,
        "group_size": a.group_size,
        "g4_prefill_chunk": min(a.ctx, 256),
        "command": " ".join(sys.argv),
        "results": {f"{k}/{q}": v for (k, q), v in rows.items()},
        "table": text,
    }
    (out / f"pte_vs_et-{tag}-c{a.ctx}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
