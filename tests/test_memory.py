"""Run-time memory: a .pte's lookup tables stay on disk, paged in by the rows a token reads."""

import json
import os
import subprocess
import sys

import attrs
import pytest
import torch

import g4
from g4.export.__main__ import main as export_main

# Tiny's structure with a large vocabulary: the two 8-bit tables (65536 x 128 and 65536 x 8 * 32) are
# 24 MiB of the 63 MiB file (most of the rest is the LM head's fp32 copy, packed by XNNPACK, in 8
# delegates of 8192 rows).
BIG_VOCAB = attrs.evolve(g4.CONFIGS["tiny"], vocab_size=65536, vocab_size_per_layer_input=65536)
TABLE_BYTES, HEAD_BYTES, HEAD_ROWS = 65536 * (128 + 8 * 32), 65536 * 128 * 4, 8192

RUN = r"""
import json, sys
from g4.generation import PteModel, generate
from g4.memory import resident
pte, lock = sys.argv[1], sys.argv[2] == "1"
def status():
    fields = (ln.split(":", 1) for ln in open("/proc/self/status"))
    return {k: int(v.split()[0]) * 1024 for k, v in fields if k in ("VmHWM", "VmRSS", "VmLck")}
m = PteModel(pte, lock=lock)
loaded = status()
generate(m, [2] + [(977 * i) % 65000 + 3 for i in range(31)], 16, stop=())
rss = resident(pte)["Rss"]
print(json.dumps({"pte_rss": rss, "load_peak_over_rss": loaded["VmHWM"] - loaded["VmRSS"], **status(),
                  "exir_imported": "executorch.exir" in sys.modules}))
"""


@pytest.fixture(scope="module")
def big_vocab_pte(tmp_path_factory):
    d = tmp_path_factory.mktemp("bigvocab")
    g4.write_random_checkpoint(BIG_VOCAB, d / "ck", dtype=torch.float32)
    out = d / "big.pte"
    assert (
        export_main(
            [str(out), "--checkpoint", str(d / "ck"), "--max-seq-len", "128", "--embedding-quantize", "8"]
            + ["--head-rows", str(HEAD_ROWS)]
        )
        == 0
    )
    return out


def measure(pte, lock):
    r = subprocess.run(
        [sys.executable, "-c", RUN, str(pte.resolve()), "1" if lock else "0"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def unlocked_run(big_vocab_pte):
    """One run of the big-vocabulary .pte as `g4.PteModel` loads it (shared by the tests below)."""
    return measure(big_vocab_pte, lock=False)


def test_tables_are_not_resident_after_a_run(big_vocab_pte, unlocked_run):
    assert TABLE_BYTES > 0.35 * big_vocab_pte.stat().st_size
    ours = unlocked_run
    # 48 tokens read 48 rows of each table: a few pages each, nowhere near the tables.
    assert ours["VmLck"] == 0 and ours["pte_rss"] < 0.1 * TABLE_BYTES, ours
    if os.geteuid() == 0:  # ExecuTorch's own load locks them all in RAM where it may (CAP_IPC_LOCK)
        locked = measure(big_vocab_pte, lock=True)
        assert locked["pte_rss"] >= TABLE_BYTES and locked["VmLck"] >= TABLE_BYTES, locked
        assert ours["VmHWM"] <= locked["VmHWM"] - 0.8 * TABLE_BYTES, (ours, locked)


def test_weights_are_not_held_twice_while_loading(unlocked_run):
    """XNNPACK holds a delegate's unpacked weights until it has packed them all: with the LM head in
    blocks of its own, loading peaks at about one block above what stays resident, not the whole head."""
    ours = unlocked_run
    assert ours["load_peak_over_rss"] < HEAD_BYTES / 4, ours  # 8 blocks: 4 MiB each; one delegate: 32 MiB


def test_running_a_pte_does_not_import_the_exporter(unlocked_run):
    """`executorch.exir` (imported by ExecuTorch's `portable_lib` for a warning class) is the exporter's whole stack."""
    assert not unlocked_run["exir_imported"]


def test_no_mlock_restores_what_it_changed():
    import resource

    from g4.memory import _caps, no_mlock

    limit, caps = resource.getrlimit(resource.RLIMIT_MEMLOCK), _caps()
    with no_mlock():
        assert resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] == 0
    assert resource.getrlimit(resource.RLIMIT_MEMLOCK) == limit
    assert caps is None or _caps()[0].effective == caps[0].effective
