import sys
from pathlib import Path

import attrs
import pytest
import torch

import g4

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py, tests/tiny_tokenizer.py

from g4.export.__main__ import main as export_main  # noqa: E402
from g4.run import TINY  # noqa: E402

torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield


CTX, CHUNK = 96, 20  # tiny exports: ring of 20 slots > window 16, so it wraps within 60 positions


@pytest.fixture(scope="session")
def pte_fp32(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32") / "tiny.pte"
    assert export_main(["tiny", str(out), "--max-seq-len", str(CTX), "--max-chunk", str(CHUNK)]) == 0
    return out


@pytest.fixture(scope="session")
def pte_8da4w(tmp_path_factory):
    ck = tmp_path_factory.mktemp("ck")
    g4.write_random_checkpoint(g4.CONFIGS["tiny"], ck, seed=0, dtype=torch.float32)
    for f in TINY.iterdir():  # tokenizer.json, tokenizer_config.json, chat_template.jinja
        (ck / f.name).write_bytes(f.read_bytes())
    out = tmp_path_factory.mktemp("q") / "tiny-8da4w.pte"
    assert (
        export_main(
            [
                str(out),  # no SIZE: the checkpoint's config.json decides
                "--checkpoint",
                str(ck),
                "--max-seq-len",
                str(CTX),
                "--max-chunk",
                str(CHUNK),
                "--quantize",
                "8da4w",
                "--embedding-quantize",
                "8",
                "--head-rows",  # the LM head in 4 blocks, 4 delegates
                "128",
            ]
        )
        == 0
    )
    return out, ck


@pytest.fixture(scope="session")
def pte_kv8(tmp_path_factory):
    out = tmp_path_factory.mktemp("kv8") / "tiny-kv8.pte"
    assert (
        export_main(["tiny", str(out), "--max-seq-len", str(CTX), "--max-chunk", str(CHUNK), "--kv-cache", "int8"]) == 0
    )
    return out


@pytest.fixture(scope="session")
def pte_multi(tmp_path_factory):
    """tiny (seed 0) fp32 with everything beside `forward`, in one program (one export for the tests of
    each): the tiny assistant (seed 4; ordered embeddings, as Google's E2B/E4B drafters) as its `draft`
    method, up to 4 tokens a round, and the tiny vision and audio towers: `vision_encoder` (up to 70
    soft tokens an image), `audio_encoder`, `speech_transform` and `text_decoder`. Returns the .pte and
    the assistant's folder."""
    acfg = attrs.evolve(g4.config.ASSISTANTS["tiny"], use_ordered_embeddings=True)
    asst = g4.write_random_assistant(acfg, tmp_path_factory.mktemp("asst"), seed=4)
    out = tmp_path_factory.mktemp("multi") / "tiny-multi.pte"
    flags = ["--max-seq-len", "160", "--max-chunk", str(CHUNK), "--assistant", str(asst), "--draft-tokens", "4"]
    assert export_main(["tiny", str(out), *flags, "--vision", "--max-soft-tokens", "70", "--audio"]) == 0
    return out, asst


@pytest.fixture(scope="session")
def pte_draft(pte_multi):
    """A program with a drafter (`pte_multi`) and its assistant's folder."""
    return pte_multi


@pytest.fixture(scope="session")
def pte_towers(pte_multi):
    """A program with the vision and audio towers (`pte_multi`)."""
    return pte_multi[0]
