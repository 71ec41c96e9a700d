import math

import attrs
import pytest
import torch
import transformers

import g4
from g4.config import FULL, SLIDING, ConfigError
from g4.hf import config_from_hf, config_to_hf, hf_name
from g4.params import param_shapes


def n_params(cfg):
    return sum(math.prod(s) for p, s in param_shapes(cfg).items() if not p.endswith("layer_scalar"))


@pytest.mark.parametrize("name", ["e2b", "e4b", "31b", "26b-a4b"])
def test_real_sizes_match_transformers(name):
    # Every tensor of the text decoder, by name and shape, as transformers builds it (on the meta device).
    cfg = g4.CONFIGS[name]
    with torch.device("meta"):
        ref = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**config_to_hf(cfg)))
    want = {
        k.removeprefix("model."): tuple(v.shape)
        for k, v in ref.named_parameters()
        if not k.startswith("lm_head")  # tied
    }
    assert {hf_name(p): s for p, s in param_shapes(cfg).items() if not p.endswith("layer_scalar")} == want


def test_real_sizes_counts():
    # Text parameters without layer_scalar (a buffer in transformers); counted from the models built above.
    assert n_params(g4.CONFIGS["e2b"]) == 4_628_569_344
    assert n_params(g4.CONFIGS["e4b"]) == 7_463_013_376
    # 540 text tensors for E2B (17 per non-shared layer, 14 per consumer, 5 top-level).
    assert len(param_shapes(g4.CONFIGS["e2b"])) == 540
    # The larger models, against the totals published for them (31B; 26B-A4B's 25.2 B, which fixes its
    # dense MLP width at config.json's 2112: 9216, also reported, would make it 26.5 B).
    assert n_params(g4.CONFIGS["31b"]) == 30_697_345_280
    moe = g4.CONFIGS["26b-a4b"]
    assert n_params(moe) == 25_233_141_760
    assert n_params(attrs.evolve(moe, intermediate_size=9216)) > 26_400_000_000
    experts = sum(math.prod(s) for p, s in param_shapes(moe).items() if ".experts." in p)
    assert experts == 22_837_985_280  # 30 layers x 128 x (1408 x 2816 + 2816 x 704)
    active = n_params(moe) - experts * (1 - moe.top_k_experts / moe.num_experts)
    assert round(active / 1e9, 2) == 3.82  # 8 of 128 experts per token


@pytest.mark.parametrize(
    "name, donors, full_layers",
    [("e2b", (13, 14), (4, 9, 14, 19, 24, 29, 34)), ("e4b", (22, 23), (5, 11, 17, 23, 29, 35, 41))],
)
def test_real_layer_schedule(name, donors, full_layers):
    cfg = g4.CONFIGS[name]
    assert tuple(i for i, t in enumerate(cfg.layer_types) if t == FULL) == full_layers
    sliding_donor, full_donor = donors
    for i, s in enumerate(cfg.layers):
        if i < cfg.first_shared:
            assert s.kv_source == i
        else:
            assert s.kv_source == (sliding_donor if s.type == SLIDING else full_donor)
        assert s.head_dim == (256 if s.is_sliding else 512)
        assert s.window == (512 if s.is_sliding else None)
    wide = [s.intermediate_size for s in cfg.layers[cfg.first_shared :]]
    assert set(wide) == {cfg.intermediate_size * (2 if cfg.use_double_wide_mlp else 1)}


def test_tiny_keeps_every_feature():
    cfg = g4.CONFIGS["tiny"]
    types = {s.type for s in cfg.layers}
    assert types == {SLIDING, FULL}
    assert cfg.head_dim != cfg.global_head_dim
    assert cfg.partial_rotary_factor < 1 and cfg.hidden_size_per_layer_input > 0
    assert cfg.use_double_wide_mlp and cfg.final_logit_softcapping
    shared_types = {cfg.layers[i].type for i in range(cfg.first_shared, cfg.num_hidden_layers)}
    assert shared_types == {SLIDING, FULL}
    assert cfg.num_attention_heads > cfg.num_key_value_heads > 1  # GQA


@pytest.mark.parametrize("name", ["tiny", "e2b", "e4b", "31b", "26b-a4b", "tiny-26b"])
def test_from_hf_roundtrip_text_and_multimodal(name):
    cfg = g4.CONFIGS[name]
    text = transformers.Gemma4TextConfig(**config_to_hf(cfg))
    assert config_from_hf(text.to_dict()) == cfg  # HF 5.x writes per_layer_config
    mm = transformers.Gemma4Config(text_config=text.to_dict(), vision_config=None, audio_config=None)
    assert config_from_hf(mm.to_dict()) == cfg
    assert config_from_hf(config_to_hf(cfg)) == cfg  # flat global_head_dim, as in hub files
    # HF's own donor map agrees with ours.
    modes = text.kv_sharing_modes
    assert [i >= cfg.first_shared for i in range(cfg.num_hidden_layers)] == [m == "reuse" for m in modes]


def test_from_hf_rejects_other_models_and_missing_fields():
    with pytest.raises(ConfigError, match="model_type 'gemma3_text' is not Gemma 4"):
        config_from_hf(transformers.Gemma3TextConfig().to_dict())
    d = config_to_hf(g4.CONFIGS["tiny"])
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="missing field 'hidden_size'"):
        config_from_hf(d)
    with pytest.raises(ConfigError, match="text_config"):
        config_from_hf({"model_type": "gemma4"})
    with pytest.raises(ConfigError, match="enable_moe_block needs num_experts >= 1"):
        config_from_hf({**config_to_hf(g4.CONFIGS["tiny"]), "enable_moe_block": True, "num_experts": 4})
    with pytest.raises(ConfigError, match=r"multiple of the KV heads of full_attention layers \(3\)"):
        attrs.evolve(g4.CONFIGS["tiny-31b"], num_global_key_value_heads=3)


def test_larger_kinds_per_layer_facts():
    # HF applies num_global_key_value_heads to full layers only together with attention_k_eq_v.
    for name, full_kv in [("31b", 4), ("26b-a4b", 2)]:
        cfg = g4.CONFIGS[name]
        hf = transformers.Gemma4TextConfig(**config_to_hf(cfg))
        for i, s in enumerate(cfg.layers):
            assert s.k_eq_v == (s.type == FULL)
            assert s.num_kv_heads == (full_kv if s.type == FULL else cfg.num_key_value_heads)
            assert s.window == (None if s.type == FULL else 1024)
            assert (hf.per_layer_config[i].num_key_value_heads, hf.per_layer_config[i].head_dim) == (
                s.num_kv_heads,
                s.head_dim,
            )
    no_k_eq_v = attrs.evolve(g4.CONFIGS["31b"], attention_k_eq_v=False)
    assert {s.num_kv_heads for s in no_k_eq_v.layers} == {16} and not any(s.k_eq_v for s in no_k_eq_v.layers)
    hf = transformers.Gemma4TextConfig(**config_to_hf(no_k_eq_v))
    assert {hf.per_layer_config[i].num_key_value_heads for i in range(60)} == {16}


def test_consumer_without_donor_is_rejected():
    cfg = g4.CONFIGS["tiny"]
    # Only full layers before the shared block, but a sliding consumer after it.
    types = (FULL,) * 5 + (SLIDING, SLIDING, FULL)
    with pytest.raises(ConfigError, match=r"layer_types / num_kv_shared_layers.*'sliding_attention'"):
        attrs.evolve(cfg, layer_types=types)
    with pytest.raises(ConfigError, match="layer_types has 3 entries"):
        attrs.evolve(cfg, layer_types=(SLIDING, SLIDING, FULL))


def test_last_layer_is_forced_to_full_attention_as_in_transformers():
    d = config_to_hf(g4.CONFIGS["tiny"])
    d["layer_types"][-1] = SLIDING
    assert transformers.Gemma4TextConfig(**d).layer_types[-1] == FULL
    assert config_from_hf(d).layer_types[-1] == FULL
