"""Every bad input to a command or the loader: one clear line naming what is at fault, exit 2, nothing written."""

import json
import subprocess
import sys
import wave

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_tokenizer import build as build_tokenizer

import g4
from g4.checkpoint import INDEX, CheckpointError
from g4.export.__main__ import main as export_main
from g4.run import main as run_main

CFG = g4.CONFIGS["tiny"]


def files(folder):
    return sorted((p.relative_to(folder).as_posix(), p.read_bytes()) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def tiny_ck(tmp_path_factory):
    ck = tmp_path_factory.mktemp("ck")
    g4.write_random_checkpoint(CFG, ck, seed=0, dtype=torch.float32, max_shard_bytes=1 << 20)
    build_tokenizer().save(str(ck / "tokenizer.json"))
    return ck


EXPORT = [
    # (arguments, with {out}, {dir} and {ck} filled in; the error line's text)
    (["tiny", "{out}", "--max-chunk", "0"], "max_chunk must be in [1, max_seq_len=1024], got 0"),
    (["tiny", "{out}", "--max-chunk", "-3"], "max_chunk must be in [1, max_seq_len=1024], got -3"),
    (["tiny", "{out}", "--max-seq-len", "64", "--max-chunk", "65"], "max_chunk must be in [1, max_seq_len=64], got 65"),
    (["tiny", "{out}", "--max-seq-len", "1"], "max_seq_len must be >= 2, got 1"),
    (["tiny", "{out}", "--group-size", "0"], "group_size must be >= 1, got 0"),
    (["tiny", "{out}", "--head-rows", "0"], "head_rows must be >= 1, got 0"),
    (["tiny", "{out}", "--quantize", "8da4w", "--group-size", "48"], "group_size 48 does not divide the input width"),
    (["tiny", "{out}", "--embedding-quantize", "4", "--group-size", "96"], "group_size 96 does not divide the width"),
    (["tiny", "{dir}"], "is a directory"),
    (["{out}", "--checkpoint", "{ck}"], "tokenizer.json exists and differs from"),
    (["e2b", "{out}", "--checkpoint", "{ck}"], "is not e2b: vocab_size 512 (not 262144)"),
    (["{out}"], "give a SIZE, or --checkpoint DIR"),
    (["{out}", "--checkpoint", "{badgen}"], "generation_config.json: not JSON"),
    (["tiny", "{out}", "--draft-tokens", "2"], "--draft-tokens needs --assistant"),
    (["tiny", "{out}", "--assistant", "{asst}", "--draft-tokens", "0"], "draft tokens must be >= 1, got 0"),
    (["tiny", "{out}", "--assistant", "{asst}", "--dtype", "bf16"], "a drafter is exported with fp32 activations"),
    (["tiny", "{out}", "--assistant", "{asst}", "--max-chunk", "4"], "1 + 4 draft tokens does not fit a prefill chunk"),
    (["tiny", "{out}", "--assistant", "{dir}"], "config.json: not found"),
    (["tiny-26b", "{out}", "--assistant", "{asst}"], "has head_dim 64 and 2 KV heads; the target's K/V there"),
    (["tiny", "{out}", "--vision", "--dtype", "bf16"], "vision / audio: the towers are exported with fp32 activations"),
    (["tiny", "{out}", "--audio", "--dtype", "bf16"], "vision / audio: the towers are exported with fp32 activations"),
    (["tiny-31b", "{out}", "--audio"], "--audio: no audio tower for tiny-31b"),
    (["{out}", "--checkpoint", "{ck}", "--audio"], "config.json: towers need a multimodal Gemma 4 config"),
    (["tiny", "{out}", "--audio", "--audio-quantize", "8da4w"], "group_size 32 does not divide the input width 48"),
    (["tiny-31b", "{out}", "--vision"], "--vision: no vision tower for tiny-31b"),
    (["{out}", "--checkpoint", "{ck}", "--vision"], "config.json: towers need a multimodal Gemma 4 config"),
    (
        ["{out}", "--checkpoint", "{bick}", "--vision", "--max-seq-len", "64"],
        "max_soft_tokens 280 > the prefill chunk 64",
    ),
]


@pytest.fixture(scope="module")
def bidirectional_ck(tmp_path_factory):
    """A tiny multimodal checkpoint whose images attend both ways (31B's `use_bidirectional_attention`)."""
    import attrs

    t = attrs.evolve(g4.config.TOWERS["tiny"], audio=None, bidirectional_vision=True)
    ck = tmp_path_factory.mktemp("bick")
    g4.write_random_checkpoint(attrs.evolve(CFG, towers=t), ck, dtype=torch.float32, multimodal=True)
    return ck


@pytest.mark.parametrize("args,message", EXPORT, ids=[" ".join(a) for a, _ in EXPORT])
def test_export_bad_input(tmp_path, tiny_ck, bidirectional_ck, tiny_assistant, capsys, args, message):
    (tmp_path / "dir").mkdir()
    (tmp_path / "tokenizer.json").write_text("{}")  # someone else's tokenizer next to OUT
    badgen = tmp_path / "badgen"  # the tiny checkpoint with a broken generation_config.json
    badgen.mkdir()
    for f in tiny_ck.iterdir():
        (badgen / f.name).symlink_to(f)
    (badgen / "generation_config.json").write_text("{")
    before = files(tmp_path)
    fill = dict(
        out=tmp_path / "x.pte",
        dir=tmp_path / "dir",
        ck=tiny_ck,
        badgen=badgen,
        asst=tiny_assistant,
        bick=bidirectional_ck,
    )
    argv = [a.format(**fill) for a in args]
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert files(tmp_path) == before


def test_export_force_replaces_tokenizer_files_and_says_so(tmp_path, tiny_ck, capsys):
    from g4.export.__main__ import tokenizer_files

    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(Exception, match="differs"):
        tokenizer_files(tiny_ck, tmp_path / "x.pte", force=False)
    plan = tokenizer_files(tiny_ck, tmp_path / "x.pte", force=True)
    assert plan == [(tiny_ck / "tokenizer.json", tmp_path / "tokenizer.json")]
    (tmp_path / "tokenizer.json").write_bytes((tiny_ck / "tokenizer.json").read_bytes())
    assert tokenizer_files(tiny_ck, tmp_path / "x.pte", force=False) == []  # the same file: nothing to do


RUN = [
    (["--eager", "--size", "tiny", "--tokens", ""], "--tokens must be comma-separated integers, got ''"),
    (["--eager", "--size", "tiny", "--tokens", "1,x"], "--tokens must be comma-separated integers"),
    (["--eager", "--compare", "--size", "tiny", "--tokens", "2"], "--compare needs a .pte"),
    (["--eager", "--size", "tiny", "--max-seq-len", "0", "--tokens", "2"], "--max-seq-len must be >= 2, got 0"),
    (["--eager", "--size", "tiny", "--top-p", "-0.5", "--tokens", "2"], "--top-p must be in (0, 1], got -0.5"),
    (["--eager", "--size", "tiny", "--top-k", "-1", "--tokens", "2"], "--top-k must be >= 0, got -1"),
    (["--eager", "--size", "tiny", "--temperature", "-1", "--tokens", "2"], "--temperature must be >= 0, got -1.0"),
    (["--eager", "--size", "tiny", "--max-new-tokens", "0", "--tokens", "2"], "--max-new-tokens must be >= 1, got 0"),
    (["{pte}", "--threads", "0", "--tokens", "2"], "--threads must be >= 1, got 0"),
    (["--eager", "--size", "tiny", "--tokens", "2,9999"], "prompt token ids must be in [0, 512)"),
    (["--eager", "--tokenizer", "{tpl}", "--size", "tiny", "--chat", "--prompt", "hi"], "chat template"),
    (["{pte}", "--compare", "--checkpoint", "{small}", "--tokens", "2"], "vocabulary"),
    (["--eager", "--size", "e9b", "--tokens", "2"], "--size e9b is not one of"),
    (["{missing}", "--tokens", "2"], "no such file"),
    (["--eager", "--size", "tiny"], "give --prompt or --tokens, or --chat to read turns from stdin"),
    (["--eager", "--size", "tiny", "--chat", "--tokens", "2"], "--tokens are fed as they are"),
    (["--eager", "--size", "tiny", "--tokens", "2", "--render"], "--render prints the text of a --prompt"),
    (["--eager", "--size", "tiny", "--messages", "{missing}"], "none.pte: No such file or directory"),
    (["--eager", "--size", "tiny", "--messages", "{notjson}"], "notjson.json: not JSON"),
    (["--eager", "--size", "tiny", "--messages", "{notlist}"], "must be a JSON list of"),
    (
        ["--eager", "--tokenizer", "{badcfg}", "--size", "tiny", "--chat", "--prompt", "hi"],
        "tokenizer_config.json: not",
    ),
    (["--eager", "--size", "tiny", "--draft-tokens", "0", "--tokens", "2"], "--draft-tokens must be >= 1, got 0"),
    (["{pte}", "--assistant", "{asst}", "--tokens", "2"], "a .pte drafts with the drafter exported into it"),
    (["{pte}", "--draft-tokens", "2", "--tokens", "2"], "has no drafter (export it with --assistant)"),
    (["{dpte}", "--draft-tokens", "5", "--tokens", "2"], "draft tokens must be in [1, 4] for"),
    (["--eager", "--size", "tiny", "--assistant", "{missing}", "--tokens", "2"], "none.pte: not a directory"),
    (["--eager", "--size", "tiny", "--assistant", "{small}", "--tokens", "2"], "is not a Gemma 4 assistant"),
    (
        ["--eager", "--checkpoint", "{small}", "--assistant", "{asst}", "--tokens", "2"],
        "do not match the target's hidden_size 128 / vocab_size 256",
    ),
    (["{pte}", "--image", "{tpl}", "--prompt", "hi"], "has no vision tower (export it with --vision)"),
    (["--eager", "--size", "tiny", "--image", "{tpl}", "--prompt", "hi"], "tokenizer.json: not an image Pillow can"),
    (["--eager", "--size", "tiny", "--image", "{tpl}", "--tokens", "2"], "--image goes with --prompt or --chat"),
    (["--eager", "--size", "tiny-31b", "--image", "{tpl}", "--prompt", "hi"], "--image: no towers for --size"),
    (["--eager", "--checkpoint", "{small}", "--image", "{tpl}", "--prompt", "hi"], "towers need a multimodal"),
    (["{vpte}", "--image", "{png}", "--max-soft-tokens", "140", "--prompt", "hi"], "--max-soft-tokens must be one of"),
    (["{pte}", "--audio", "{wav}", "--prompt", "hi"], "has no audio tower (export it with --audio)"),
    (["{vpte}", "--audio", "{tpl}", "--prompt", "hi"], "--audio {tpl}: not a PCM WAV file"),
    (["{vpte}", "--audio", "{wav44}", "--prompt", "hi"], "44100 Hz; the audio tower takes 16000 Hz"),
    (["{vpte}", "--audio", "{wav}", "--tokens", "2"], "--audio goes with --prompt or --chat"),
    (["{vpte}", "--messages", "{system}", "--image", "{png}"], "system.json: --image/--audio go at the start of the"),
    (["--eager", "--size", "tiny-31b", "--audio", "{wav}", "--prompt", "hi"], "--audio: no towers for --size"),
]


@pytest.fixture(scope="module")
def small_vocab_ck(tmp_path_factory):
    import attrs

    ck = tmp_path_factory.mktemp("small")
    g4.write_random_checkpoint(
        attrs.evolve(CFG, vocab_size=256, vocab_size_per_layer_input=256), ck, dtype=torch.float32
    )
    return ck


@pytest.fixture(scope="module")
def tiny_assistant(tmp_path_factory):
    return g4.write_random_assistant(g4.config.ASSISTANTS["tiny"], tmp_path_factory.mktemp("asst"))


@pytest.mark.parametrize("args,message", RUN, ids=[" ".join(a) for a, _ in RUN])
def test_run_bad_input(
    tmp_path, pte_fp32, pte_draft, pte_towers, small_vocab_ck, tiny_assistant, capsys, args, message
):
    build_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
    (tmp_path / "notjson.json").write_text("[{")
    (tmp_path / "notlist.json").write_text('{"role": "user"}')
    (tmp_path / "system.json").write_text('[{"role": "system", "content": "be brief"}]')
    (tmp_path / "cfg").mkdir()
    build_tokenizer().save(str(tmp_path / "cfg" / "tokenizer.json"))
    (tmp_path / "cfg" / "tokenizer_config.json").write_text("[]")
    fill = dict(
        tpl=tmp_path / "tokenizer.json",
        pte=pte_fp32,
        dpte=pte_draft[0],
        small=small_vocab_ck,
        missing=tmp_path / "none.pte",
        notjson=tmp_path / "notjson.json",
        notlist=tmp_path / "notlist.json",
        system=tmp_path / "system.json",
        badcfg=tmp_path / "cfg" / "tokenizer.json",
        asst=tiny_assistant,
        vpte=pte_towers,
        png=tmp_path / "image.png",
        wav=tmp_path / "clip.wav",
        wav44=tmp_path / "clip44.wav",
    )
    for name, rate in (("clip.wav", 16000), ("clip44.wav", 44100)):
        with wave.open(str(tmp_path / name), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(bytes(4000))
    Image.new("RGB", (20, 12)).save(tmp_path / "image.png")
    assert run_main([a.format(**fill) for a in args]) == 2
    message = message.format(**fill)
    ours = capsys.readouterr().err.strip().splitlines()
    err = [ln for ln in ours if not ln.startswith("[cpuinfo")]  # ExecuTorch's runtime logs its first CPU probe
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def edited(src, dst, edit):
    """A copy of checkpoint folder `src` whose shards' tensors go through `edit(shard name, dict)`."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            save_file(edit(f.name, load_file(f)), dst / f.name)
        else:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def first_shard(name, sd, fn):
    return fn(sd) if name.startswith("model-00001") else sd


CHECKPOINT = [
    (
        "int8 tensor",
        lambda d: edited(
            d[0], d[1], lambda n, sd: sd | {k: v.to(torch.int8) for k, v in sd.items() if k == "model.norm.weight"}
        ),
        r"tensor 'model.norm.weight' has dtype I8; g4 reads float weights \(F32, BF16, F16\)",
    ),
    (
        "float8 tensor",
        lambda d: edited(
            d[0],
            d[1],
            lambda n, sd: sd | {k: v.to(torch.float8_e4m3fn) for k, v in sd.items() if k == "model.norm.weight"},
        ),
        r"tensor 'model.norm.weight' has dtype F8_E4M3",
    ),
    (
        "tensor in two shards",
        lambda d: edited(
            d[0], d[1], lambda n, sd: sd | ({} if "00001" in n else {"model.norm.weight": torch.ones(CFG.hidden_size)})
        ),
        r"tensor 'model.norm.weight' is in two files: model-00001-of-\d+.safetensors and model-000\d\d",
    ),
    (
        "weight_map a list",
        lambda d: _index(d, lambda ix: ix | {"weight_map": list(ix["weight_map"])}),
        rf"{INDEX}: 'weight_map' must map tensor names to file names",
    ),
    (
        "weight_map value not a string",
        lambda d: _index(d, lambda ix: ix | {"weight_map": ix["weight_map"] | {"model.norm.weight": 3}}),
        rf"{INDEX}: 'weight_map' must map tensor names to file names",
    ),
    (
        "index not an object",
        lambda d: _index(d, lambda ix: [ix]),
        rf"{INDEX}: not a safetensors index",
    ),
]


def _index(d, fn):
    dst = edited(d[0], d[1], lambda n, sd: sd)
    (dst / INDEX).write_text(json.dumps(fn(json.loads((dst / INDEX).read_text()))))
    return dst


@pytest.mark.parametrize("name,make,message", CHECKPOINT, ids=[c[0] for c in CHECKPOINT])
def test_checkpoint_bad_input(tmp_path, tiny_ck, name, make, message):
    assert len(list(tiny_ck.glob("*.safetensors"))) > 1  # sharded, so two-shard cases are real
    folder = make((tiny_ck, tmp_path / "c"))
    with pytest.raises(CheckpointError, match=message):
        g4.load_checkpoint(folder)


def test_random_checkpoint_into_unwritable_folder(tmp_path):
    (tmp_path / "file").write_text("")
    r = subprocess.run(
        [sys.executable, "-m", "g4.checkpoint", "random", "tiny", str(tmp_path / "file" / "ck")],
        capture_output=True,
        text=True,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: cannot write"), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_export_on_a_full_disk_leaves_nothing(tmp_path, capsys, monkeypatch):
    """The .pte goes through a temporary file; a write that fails (ENOSPC here) ends in one line, exit 2."""
    import errno

    import g4.checkpoint

    real = g4.checkpoint.os.replace

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(g4.checkpoint.os, "replace", full)
    before = files(tmp_path)
    assert export_main(["tiny", str(tmp_path / "x.pte"), "--max-seq-len", "64"]) == 2
    monkeypatch.setattr(g4.checkpoint.os, "replace", real)
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("error: ")]
    assert err == [f"error: {tmp_path / 'x.pte'}: cannot write (No space left on device)"]
    assert files(tmp_path) == before
