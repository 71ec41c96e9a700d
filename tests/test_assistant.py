"""The assistant drafter (MTP) against transformers' `Gemma4AssistantForCausalLM`, and speculative decoding."""

import attrs
import pytest
import torch
import transformers
from reference import hf_model
from transformers.models.gemma4 import configuration_gemma4

import g4
from g4.checkpoint import CheckpointError, load_assistant
from g4.config import FULL, SLIDING, AssistantConfig
from g4.fn.cache import key_positions
from g4.fn.draft import draft_step
from g4.fn.model import embed, hidden_states
from g4.hf import assistant_config_to_hf, assistant_name
from g4.params import init_assistant, leaves_with_path

TARGET = g4.CONFIGS["tiny"]  # 2 KV heads, head_dim 32 (sliding) / 64 (full), window 16, hidden 128
ASSISTANT = AssistantConfig(
    text=attrs.evolve(
        TARGET,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        layer_types=(SLIDING, SLIDING, FULL),
        num_kv_shared_layers=0,
        hidden_size_per_layer_input=0,
        use_double_wide_mlp=False,
        final_logit_softcapping=None,
    ),
    backbone_hidden_size=TARGET.hidden_size,
    num_centroids=16,
    centroid_intermediate_top_k=4,
)
PROMPT = 24  # longer than the window: the drafter's sliding layers see only the last W + 1 keys


def all_shared_kv_modes(original):
    """transformers 5.23's `Gemma4TextConfig.kv_sharing_modes` raises when every layer is KV-shared (no
    layer stores K/V for the others); an assistant's config is exactly that, and means "reuse" for all."""

    def modes(self):
        if self.num_kv_shared_layers == self.num_hidden_layers:
            return ["reuse"] * self.num_hidden_layers
        return original.fget(self)

    return property(modes)


@pytest.fixture(autouse=True)
def _assistant_config_patch(monkeypatch):
    cls = configuration_gemma4.Gemma4TextConfig
    monkeypatch.setattr(cls, "kv_sharing_modes", all_shared_kv_modes(cls.kv_sharing_modes))


def hf_assistant(acfg, a):
    """A `Gemma4AssistantForCausalLM` (eager attention) holding exactly `a`."""
    hf_cfg = transformers.Gemma4AssistantConfig(**assistant_config_to_hf(acfg))
    hf_cfg.text_config._attn_implementation = "eager"
    model = transformers.Gemma4AssistantForCausalLM(hf_cfg).eval()
    sd = {assistant_name(p): t for p, t in leaves_with_path(a)}
    sd["lm_head.weight"] = a.embed_tokens
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


@pytest.fixture(scope="module")
def target():
    params = g4.init_params(TARGET, seed=3)
    return params, hf_model(TARGET, params)


@pytest.mark.parametrize("ordered", [False, True])
@torch.no_grad()
def test_drafter_matches_transformers(target, ordered, tmp_path, monkeypatch):
    params, ref = target
    acfg = attrs.evolve(ASSISTANT, use_ordered_embeddings=ordered)
    hf = hf_assistant(acfg, init_assistant(acfg, seed=4))
    hf.save_pretrained(tmp_path)  # the loader reads what transformers writes
    got_cfg, a = load_assistant(tmp_path)
    assert got_cfg == acfg

    tokens = torch.randint(0, TARGET.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(5))
    out = ref(input_ids=tokens, output_hidden_states=True, return_shared_kv_states=True, use_cache=True)
    last = out.logits[0, -1].argmax().view(1, 1)  # the token the drafter continues from, at position PROMPT
    shared = {t: (k, v) for t, (k, v) in out.shared_kv_states.items()}
    x_hf = torch.cat([ref.get_input_embeddings()(last), out.hidden_states[-1][:, -1:]], -1)

    cache = g4.init_cache(TARGET, max_seq_len=64, max_chunk=TARGET.sliding_window + 5)
    h, cache = hidden_states(params, TARGET, tokens, torch.arange(PROMPT), cache)
    kv = {t: (cache.k[i], cache.v[i], key_positions(cache, t)) for t, i in TARGET.kv_stores.items()}
    x = torch.cat([embed(params.embed_tokens, last, TARGET.hidden_size**0.5), h[:, -1:]], -1)
    assert torch.equal(x, x_hf)

    for _ in range(3):  # a round of drafts: same position and K/V, the drafter's own hidden state fed back
        want = hf(inputs_embeds=x_hf, position_ids=torch.tensor([[PROMPT]]), shared_kv_states=shared)
        logits, nxt = draft_step(a, acfg, x, PROMPT, kv)
        for ours, theirs in ((logits, want.logits), (nxt, want.last_hidden_state)):
            assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-6  # measured 4.6e-7
        tok = want.logits.argmax(-1)
        assert torch.equal(logits.argmax(-1), tok)
        x_hf = torch.cat([ref.get_input_embeddings()(tok), want.last_hidden_state], -1)
        x = torch.cat([embed(params.embed_tokens, tok, TARGET.hidden_size**0.5), nxt], -1)


def test_assistant_checkpoint_errors(tmp_path):
    acfg = attrs.evolve(ASSISTANT, use_ordered_embeddings=True)
    hf = hf_assistant(acfg, init_assistant(acfg, seed=4))
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "model.safetensors")
    sd["masked_embedding.token_ordering"] = torch.zeros_like(sd["masked_embedding.token_ordering"])
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="token_ordering.*not a permutation"):
        load_assistant(tmp_path)
    with pytest.raises(CheckpointError, match="not a Gemma 4 assistant"):
        load_assistant(tmp_path.parent / "nope") if False else None
        (tmp_path / "config.json").write_text('{"model_type": "gemma4_text"}')
        load_assistant(tmp_path)


def test_drafter_must_fit_its_target():
    with pytest.raises(g4.ConfigError, match="backbone_hidden_size"):
        attrs.evolve(ASSISTANT, backbone_hidden_size=64).check_target(TARGET)
    ASSISTANT.check_target(TARGET)
