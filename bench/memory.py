"""Where a .pte's run-time memory goes: peak RSS, file-backed vs anonymous, locked pages, the program's mapping.

    python bench/memory.py OUT.pte [--prompt-tokens 128] [--new-tokens 128] [--lock] [--as-user 65534]

Runs the .pte in a fresh process (`g4.PteModel`: a prefill, then greedy decoding) and prints one JSON
line read from /proc/self/status and /proc/self/smaps after the run. ExecuTorch's runtime mlocks the
program's constant segment (the embedding tables) and ignores a failure: `--lock` loads it that way
(as root, `CAP_IPC_LOCK`, every table is then locked in RAM), the default as `g4.PteModel` does
(`g4.memory`: the lock fails, read-ahead is off, rows are paged in as tokens read them). `--as-user
UID` runs the process as an unprivileged user, bound by `RLIMIT_MEMLOCK` as an app would be.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
from g4.generation import PteModel, generate
from g4.memory import resident
pte, n_prompt, n_new, lock = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == '1'
threads = int(sys.argv[5]) or None

def kib(keys):
    d = dict(ln.split(":", 1) for ln in open("/proc/self/status") if ln.split(":")[0] in keys)
    return {k: int(v.split()[0]) * 1024 for k, v in d.items()}

t = time.perf_counter()
m = PteModel(pte, lock=lock, threads=threads)
load_s = time.perf_counter() - t
g = generate(m, [m.bos_id] + [(7 * i) % (m.vocab_size - 3) + 3 for i in range(n_prompt - 1)], n_new, stop=())
n = len(g.ids)
print(json.dumps({
    "pte_bytes": __import__("os").path.getsize(pte), "load_s": load_s, "ttft_s": g.ttft_s,
    "decode_tok_s": (n - 1) / g.decode_s if n > 1 else None,
    "status": kib(("VmHWM", "VmRSS", "RssAnon", "RssFile", "VmLck")),
    "pte_mapping": resident(pte),
}))
"""


def measure(
    pte: str, prompt: int, new: int, lock: bool = False, as_user: int | None = None, threads: int | None = None
) -> dict:
    """One run of `pte` in a fresh process: size, load, TTFT, decode tok/s, RSS, the mapping."""
    args = [str(Path(pte).resolve()), str(prompt), str(new), str(int(lock)), str(threads or 0)]
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
    ap.add_argument("--lock", action="store_true", help="load as ExecuTorch does by default (mlock the tables)")
    ap.add_argument("--threads", type=int, help="thread pool size (default: ExecuTorch's)")
    a = ap.parse_args()
    print(json.dumps(measure(a.pte, a.prompt_tokens, a.new_tokens, a.lock, a.as_user, a.threads)))


if __name__ == "__main__":
    main()
