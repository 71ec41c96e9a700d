import json
import pickle
import subprocess
import sys

import pytest
import torch
import transformers
from reference import hf_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import g4
from g4.checkpoint import INDEX, CheckpointError
from g4.hf import MM_PREFIX, config_to_hf, to_hf_state_dict

CFG = g4.CONFIGS["tiny"]
TOKENS = torch.randint(0, CFG.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))


def g4_logits(cfg, params):
    with torch.no_grad():
        return g4.forward(params, cfg, TOKENS, torch.arange(TOKENS.shape[1]))[0]


def ref_logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS, use_cache=False).logits


def small_multimodal(params, cfg=CFG):
    """A Gemma4ForConditionalGeneration with the smallest vision/audio towers, holding `params` as text."""
    mm_cfg = transformers.Gemma4Config(
        text_config=transformers.Gemma4TextConfig(**config_to_hf(cfg)).to_dict(),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            position_embedding_size=64,
        ),
        audio_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            subsampling_conv_channels=[8, 4],
            output_proj_dims=32,
        ),
    )
    model = transformers.Gemma4ForConditionalGeneration(mm_cfg).eval()
    missing, unexpected = model.load_state_dict(to_hf_state_dict(params, MM_PREFIX), strict=False)
    assert not unexpected and not [k for k in missing if k.startswith(MM_PREFIX)]
    return model


@pytest.fixture(scope="module")
def params():
    return g4.init_params(CFG, seed=7)


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory, params):
    d = tmp_path_factory.mktemp("causal")
    hf_model(CFG, params).save_pretrained(d)
    return d


@pytest.mark.parametrize("layout", ["causal", "multimodal"])
@pytest.mark.parametrize("shard", [None, "300KB"])
def test_roundtrip_from_transformers(tmp_path, params, layout, shard):
    model = hf_model(CFG, params) if layout == "causal" else small_multimodal(params)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / INDEX).exists() == bool(shard)
    cfg, loaded = g4.load_checkpoint(tmp_path)
    assert cfg == CFG
    assert (g4_logits(cfg, loaded) - ref_logits(model)).abs().max() <= 1e-4
    for (_, a), (_, b) in zip(g4.params.leaves_with_path(loaded), g4.params.leaves_with_path(params), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["tiny-31b", "tiny-26b"])
@pytest.mark.parametrize("layout", ["causal", "multimodal"])
def test_larger_kinds_roundtrip_from_transformers(tmp_path, name, layout):
    cfg = g4.CONFIGS[name]
    params = g4.init_params(cfg, seed=7)
    model = hf_model(cfg, params) if layout == "causal" else small_multimodal(params, cfg)
    model.config._experts_implementation = "eager"
    model.save_pretrained(tmp_path, max_shard_size="300KB")
    loaded_cfg, loaded = g4.load_checkpoint(tmp_path)
    assert loaded_cfg == cfg
    for (_, a), (_, b) in zip(g4.params.leaves_with_path(loaded), g4.params.leaves_with_path(params), strict=True):
        assert torch.equal(a, b)
    assert (g4_logits(cfg, loaded) - ref_logits(model)).abs().max() <= 1e-4
    # Random checkpoints of these kinds load in transformers with every tensor in place.
    g4.write_random_checkpoint(cfg, tmp_path / "random", seed=3, dtype=torch.float32)
    _, info = transformers.Gemma4ForCausalLM.from_pretrained(tmp_path / "random", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_random_writer_loads_in_transformers(tmp_path):
    g4.write_random_checkpoint(CFG, tmp_path, seed=3, dtype=torch.float32, max_shard_bytes=500_000)
    index = json.loads((tmp_path / INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, info = transformers.Gemma4ForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg, params = g4.load_checkpoint(tmp_path)
    assert (g4_logits(cfg, params) - ref_logits(model.eval())).abs().max() <= 1e-4
    # Deterministic: the same seed writes the same bytes.
    again = tmp_path / "again"
    g4.write_random_checkpoint(CFG, again, seed=3, dtype=torch.float32, max_shard_bytes=500_000)
    for f in sorted(tmp_path.glob("*.safetensors")):
        assert f.read_bytes() == (again / f.name).read_bytes()


def test_cli_writes_random_checkpoint(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "g4.checkpoint", "random", "tiny", str(tmp_path / "ck")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "wrote" in r.stdout
    cfg, _ = g4.load_checkpoint(tmp_path / "ck")
    assert cfg == CFG


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_checkpoint_values_exact(tmp_path, dtype):
    g4.write_random_checkpoint(CFG, tmp_path, seed=1)  # bf16 on disk
    _, params = g4.load_checkpoint(tmp_path, dtype=dtype)
    on_disk = {}
    for f in tmp_path.glob("*.safetensors"):
        on_disk |= load_file(f)
    for k, t in to_hf_state_dict(params).items():
        assert t.dtype == dtype
        assert torch.equal(t, on_disk[k].to(dtype))


def test_hub_extras_are_ignored(tmp_path, params, causal_dir):
    # Hub checkpoints keep k/v/k_norm of KV-shared layers, and a tied lm_head may be stored.
    sd = load_file(causal_dir / "model.safetensors")
    for i in range(CFG.first_shared, CFG.num_hidden_layers):
        d = CFG.layers[i].head_dim * CFG.num_key_value_heads
        sd[f"model.layers.{i}.self_attn.k_proj.weight"] = torch.randn(d, CFG.hidden_size)
        sd[f"model.layers.{i}.self_attn.v_proj.weight"] = torch.randn(d, CFG.hidden_size)
        sd[f"model.layers.{i}.self_attn.k_norm.weight"] = torch.randn(CFG.layers[i].head_dim)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((causal_dir / "config.json").read_text())
    _, loaded = g4.load_checkpoint(tmp_path)
    assert torch.equal(loaded.embed_tokens, params.embed_tokens)
    assert loaded.layers[-1].self_attn.k_proj is None
    sd["lm_head.weight"][5, 0] += 1
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="lm_head.weight differs from embed_tokens"):
        g4.load_checkpoint(tmp_path)


def copy_with(src, dst, edit=None, config=None):
    """A copy of checkpoint `src` with the state dict edited and/or config.json replaced."""
    dst.mkdir(exist_ok=True)
    sd = load_file(src / "model.safetensors")
    if edit:
        edit(sd)
    save_file(sd, dst / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
    return dst


def test_missing_tensor(tmp_path, causal_dir):
    d = copy_with(causal_dir, tmp_path / "c", lambda sd: sd.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.2.mlp.up_proj.weight'"):
        g4.load_checkpoint(d)


def test_unexpected_tensor(tmp_path, causal_dir):
    d = copy_with(causal_dir, tmp_path / "c", lambda sd: sd.update({"model.layers.0.extra.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor 'model.layers.0.extra.weight'"):
        g4.load_checkpoint(d)


def test_wrong_shape(tmp_path, causal_dir):
    d = copy_with(
        causal_dir, tmp_path / "c", lambda sd: sd.update({"model.norm.weight": torch.ones(CFG.hidden_size + 1)})
    )
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \[129\], config.json implies \[128\]"):
        g4.load_checkpoint(d)


def test_weights_of_another_size(tmp_path, causal_dir):
    # "E2B weights with an E4B config", at tiny scale: config.json of a wider model.
    d = copy_with(causal_dir, tmp_path / "c", config=lambda c: c | {"hidden_size": 256})
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.embed_tokens.weight' has shape"):
        g4.load_checkpoint(d)


def test_truncated_and_corrupt_files(tmp_path, causal_dir):
    d = copy_with(causal_dir, tmp_path / "t")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
        g4.load_checkpoint(d)
    f.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
        g4.load_checkpoint(d)


def test_index_names_missing_shard(tmp_path, params):
    hf_model(CFG, params).save_pretrained(tmp_path, max_shard_size="300KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=rf"{INDEX}: names shard '{shards[1].name}'.*which does not exist"):
        g4.load_checkpoint(tmp_path)


def test_bad_configs(tmp_path, causal_dir):
    d = copy_with(causal_dir, tmp_path / "a", config=lambda c: c | {"model_type": "llama"})
    with pytest.raises(CheckpointError, match=r"config.json: model_type 'llama' is not Gemma 4"):
        g4.load_checkpoint(d)
    d = copy_with(causal_dir, tmp_path / "b", config=lambda c: {k: v for k, v in c.items() if k != "vocab_size"})
    with pytest.raises(CheckpointError, match=r"config.json: missing field 'vocab_size'"):
        g4.load_checkpoint(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        g4.load_checkpoint(d)
    with pytest.raises(CheckpointError, match=r"not a directory"):
        g4.load_checkpoint(tmp_path / "nope")


class _Boom:
    def __reduce__(self):
        return (open, ("/tmp/g4-unpickled-marker", "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_only_folder_is_refused_without_unpickling(tmp_path, causal_dir, name):
    marker = "/tmp/g4-unpickled-marker"
    subprocess.run(["rm", "-f", marker], check=True)
    (tmp_path / name).write_bytes(pickle.dumps(_Boom()))
    (tmp_path / "config.json").write_text((causal_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match=rf"only pickle weights found \({name}\).*never unpickles.*safetensors"):
        g4.load_checkpoint(tmp_path)
    assert not __import__("os").path.exists(marker)


def test_no_partial_result_on_late_error(tmp_path, causal_dir):
    # The last key in file order is wrong: the error comes before any weight is read.
    d = copy_with(causal_dir, tmp_path / "c", lambda sd: sd.update({"model.layers.7.layer_scalar": torch.ones(2)}))
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert "model.layers.7.layer_scalar" in f.keys()
    with pytest.raises(CheckpointError, match="layer_scalar' has shape"):
        g4.load_checkpoint(d)


def _rss_file_kib():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("RssFile:"))


@pytest.mark.skipif(sys.platform != "linux", reason="page release is Linux-only")
def test_release_pages_drops_mapped_rows_and_keeps_data(tmp_path):
    from g4.checkpoint import MAPPED, release_pages

    save_file({"w": torch.randn(4096, 1024)}, str(tmp_path / "w.safetensors"))  # 16 MiB
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as h:
        want = h.get_tensor("w").clone()
    r = g4.checkpoint._Reader([tmp_path / "w.safetensors"])
    t = r.get("w")  # stored dtype: a view of the file mapping
    assert getattr(t, MAPPED)
    assert torch.equal(t, want)  # touches every page
    before = _rss_file_kib()
    release_pages(t, 0, t.shape[0])
    assert before - _rss_file_kib() >= 12 * 1024  # most of the 16 MiB left the resident set
    assert torch.equal(t, want)  # read back from the file, unchanged
    assert not hasattr(r.get("w", torch.float64), MAPPED)  # a converted copy is not a mapping

    mem = torch.randn(4096, 1024)  # ordinary memory is never released (that would zero it)
    copy = mem.clone()
    release_pages(mem, 0, mem.shape[0])
    assert torch.equal(mem, copy)


def test_atomic_write_killed_mid_write_keeps_the_old_file_and_the_next_write_cleans_up(tmp_path):
    import signal

    from g4.checkpoint import atomic_write

    dest = tmp_path / "model.pte"
    dest.write_bytes(b"previous export")
    code = (
        "import time\nfrom pathlib import Path\nfrom g4.checkpoint import atomic_write\n"
        "def slow(tmp):\n"
        "    with open(tmp, 'wb') as f:\n"
        "        f.write(b'half' * 4096); f.flush(); print('writing', flush=True); time.sleep(120)\n"
        f"atomic_write(Path({str(dest)!r}), slow)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert dest.read_bytes() == b"previous export"  # no half file where the .pte was
    stale = list(tmp_path.glob(".model.pte.*.tmp"))
    assert len(stale) == 1 and f".{p.pid}." in stale[0].name
    live = tmp_path / f".model.pte.{__import__('os').getpid()}.live.tmp"  # a writer still running: kept
    live.write_bytes(b"")
    atomic_write(dest, lambda t: t.write_bytes(b"new export"))
    assert dest.read_bytes() == b"new export"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dest.name, live.name])


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    import os
    import stat

    from g4.checkpoint import atomic_write

    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: events.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file") or fsync(fd)
    )
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("rename") or replace(a, b))
    atomic_write(tmp_path / "x.bin", lambda t: t.write_bytes(b"data"))
    assert events == ["file", "rename", "dir"] and (tmp_path / "x.bin").read_bytes() == b"data"
