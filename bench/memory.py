"""Where a .pte's run-time memory goes: peak RSS, file-backed vs anonymous, locked pages, the program's mapping.

    python bench/memory.py OUT.pte [--prompt-tokens 128] [--new-tokens 128] [--lock] [--as-user 65534]
        [--threads N] [--runner]

Runs the .pte in a fresh process (`g4.PteModel`, or with `--runner` ExecuTorch's stock `TextLLMRunner`
and the tokenizer.json beside the .pte: a prefill, then greedy decoding), prints the breakdown (the
.pte's parts from its header; RSS after imports, after load, the load's peak, after the run) and one
JSON line with every number, read from /proc/self/status and /proc/self/smaps. ExecuTorch's runtime mlocks the
program's constant segment (the embedding tables) and ignores a failure: `--lock` loads it that way
(as root, `CAP_IPC_LOCK`, every table is then locked in RAM), the default as `g4.PteModel` does
(`g4.memory`: the lock fails, read-ahead is off, rows are paged in as tokens read them). `--as-user
UID` runs the process as an unprivileged user, bound by `RLIMIT_MEMLOCK` as an app would be.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import contextlib, json, os, sys, time

def status():
    fields = (ln.split(":", 1) for ln in open("/proc/self/status"))
    keys = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "VmLck")
    return {k: int(v.split()[0]) * 1024 for k, v in fields if k in keys}

pte, n_prompt, n_new, lock, runner = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[6]
threads = int(sys.argv[5]) or None
import torch
from g4.generation import PteModel, generate, runtime, set_threads
from g4.memory import no_mlock, page_on_demand, resident
runtime()  # ExecuTorch's bindings and the kernels g4's programs call
if threads:
    set_threads(threads)
prompt = [2] + [(7 * i) % 262000 + 3 for i in range(n_prompt - 1)]
imported = status()
t = time.perf_counter()
if runner:  # ExecuTorch's stock runner (C++, through its Python binding)
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
    with contextlib.nullcontext() if lock else no_mlock():
        r = TextLLMRunner(pte, runner)  # loads the program; its method (XNNPACK's weights) on the first generate
    if not lock:
        page_on_demand(pte)
    load_s, loaded = time.perf_counter() - t, status()
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(runner)  # a text of about n_prompt tokens; the runner adds <bos>
    words = " ".join(f"w{i}" for i in range(2 * n_prompt))
    text = tok.decode(tok.encode(words, add_special_tokens=False).ids[: n_prompt - 1])
    stats = []
    cfg = GenerationConfig(max_new_tokens=n_new, temperature=0.0, echo=False, num_bos=1)
    r.generate(text, cfg, token_callback=lambda s: None, stats_callback=stats.append)
    st = stats[0]
    ttft = (st.first_token_ms - st.inference_start_ms) / 1e3
    decode = (st.num_generated_tokens - 1) / ((st.inference_end_ms - st.first_token_ms) / 1e3)
    n_prompt = st.num_prompt_tokens
else:
    m = PteModel(pte, lock=lock)
    load_s, loaded = time.perf_counter() - t, status()
    g = generate(m, [m.bos_id] + prompt[1:], n_new, stop=())
    ttft, decode = g.ttft_s, (len(g.ids) - 1) / g.decode_s
print(json.dumps({
    "pte_bytes": os.path.getsize(pte), "load_s": load_s, "prompt_tokens": n_prompt, "ttft_s": ttft,
    "decode_tok_s": decode, "imported": imported, "loaded": loaded, "status": status(),
    "pte_mapping": resident(pte),
}))
"""


def layout(pte: str | Path) -> dict[str, int]:
    """Bytes of a .pte's parts, from its header: the constant segment (tables and weights that run in
    portable kernels), XNNPACK's weights (named data), the forward method's memory plan."""
    from executorch.exir._serialize._flatbuffer_program import _flatbuffer_to_program
    from executorch.exir._serialize._program import _ExtendedHeader

    with open(pte, "rb") as f:
        head = _ExtendedHeader.from_bytes(f.read(64)[8:])
        f.seek(0)
        prog = _flatbuffer_to_program(f.read(head.program_size))
    named = {d.segment_index for d in prog.named_data or []}
    plan = next(p for p in prog.execution_plan if p.name in ("forward", "text_decoder"))
    return {
        "constant_segment": prog.segments[prog.constant_segment.segment_index].size,
        "xnnpack_weights": sum(s.size for i, s in enumerate(prog.segments) if i in named),
        "memory_plan": sum(plan.non_const_buffer_sizes),
    }


ELEMENT_BYTES = {0: 1, 1: 1, 3: 4, 4: 8, 6: 4, 11: 1, 15: 2}  # ExecuTorch scalar types: u8 i8 i32 i64 f32 bool bf16


def largest_planned(pte: str | Path, n: int = 6) -> list[dict]:
    """The decoder method's largest planned tensors (activations, caches, masks): shape, dtype code, MiB, and
    how many tensors of that shape the plan holds."""
    from collections import Counter

    from executorch.exir._serialize._flatbuffer_program import _flatbuffer_to_program
    from executorch.exir._serialize._program import _ExtendedHeader

    with open(pte, "rb") as f:
        head = _ExtendedHeader.from_bytes(f.read(64)[8:])
        f.seek(0)
        prog = _flatbuffer_to_program(f.read(head.program_size))
    plan = next(p for p in prog.execution_plan if p.name in ("forward", "text_decoder"))
    planned = [v.val for v in plan.values if getattr(v.val, "allocation_info", None) is not None]
    count = Counter((tuple(t.sizes), int(t.scalar_type)) for t in planned)
    size = {k: math.prod(k[0]) * ELEMENT_BYTES.get(k[1], 4) for k in count}
    top = sorted(count, key=lambda k: -size[k])[:n]
    return [{"shape": list(k[0]), "dtype": k[1], "mib": size[k] / 2**20, "count": count[k]} for k in top]


def measure(
    pte: str,
    prompt: int,
    new: int,
    lock: bool = False,
    as_user: int | None = None,
    threads: int | None = None,
    runner: bool = False,
) -> dict:
    """One run of `pte` in a fresh process (`g4.PteModel`, or the stock `TextLLMRunner` with the
    tokenizer.json beside it): size, load, TTFT, decode tok/s, RSS after imports / load / the run."""
    tok = str(Path(pte).resolve().parent / "tokenizer.json") if runner else ""
    args = [str(Path(pte).resolve()), str(prompt), str(new), str(int(lock)), str(threads or 0), tok]
    cmd = [sys.executable, "-c", CHILD, *args]
    if as_user is not None:
        cmd = ["setpriv", f"--reuid={as_user}", f"--regid={as_user}", "--clear-groups", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HOME": "/tmp"})
    if r.returncode:
        sys.exit(f"error: the measured process failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    uid = as_user if as_user is not None else os.getuid()
    return json.loads(r.stdout.strip().splitlines()[-1]) | {"uid": uid, "lock": lock, "threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pte")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--as-user", type=int, help="run the measured process as this uid (setpriv; root only)")
    ap.add_argument(
        "--lock", action="store_true", help="load as ExecuTorch does by default, the runner too (mlock the tables)"
    )
    ap.add_argument("--threads", type=int, help="thread pool size (default: ExecuTorch's)")
    ap.add_argument("--runner", action="store_true", help="ExecuTorch's TextLLMRunner instead of g4.PteModel")
    a = ap.parse_args()
    r = measure(a.pte, a.prompt_tokens, a.new_tokens, a.lock, a.as_user, a.threads, a.runner)
    r["layout"] = parts = layout(a.pte)
    mib = lambda b: f"{b / 2**20:8.0f} MiB"  # noqa: E731
    imp, ld, end = r["imported"], r["loaded"], r["status"]
    for label, b in [
        (".pte: constant segment (tables, portable-kernel weights)", parts["constant_segment"]),
        (".pte: XNNPACK weights", parts["xnnpack_weights"]),
        (".pte: memory plan (activations, KV cache)", parts["memory_plan"]),
        ("RSS after imports (Python, torch, ExecuTorch)", imp["VmRSS"]),
        ("RSS after load: anonymous (packed weights, plan as touched)", ld["RssAnon"]),
        ("RSS after load: file-backed", ld["RssFile"]),
        ("load peak above the RSS after load", ld["VmHWM"] - ld["VmRSS"]),
        ("RSS after the run: anonymous", end["RssAnon"]),
        ("RSS after the run: file-backed", end["RssFile"]),
        ("  of which the .pte's mapping", r["pte_mapping"]["Rss"]),
        ("locked", end["VmLck"]),
        ("peak RSS", end["VmHWM"]),
    ]:
        print(f"{label:62s} {mib(b)}", file=sys.stderr)
    speed = f"TTFT ({r['prompt_tokens']} tokens) {r['ttft_s'] * 1e3:.0f} ms, decode {r['decode_tok_s']:.1f} tok/s"
    print(speed, file=sys.stderr)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
