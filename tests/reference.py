"""Helpers that build the Hugging Face reference model on g4's random weights."""

from __future__ import annotations

import torch
import transformers

import g4
from g4.hf import MM_PREFIX, config_to_hf, to_hf_state_dict, towers_to_hf


def hf_model(cfg: g4.Config, params: g4.Params, dtype: torch.dtype = torch.float32):
    """A `Gemma4ForCausalLM` (eager attention) holding exactly `params`."""
    hf_cfg = transformers.Gemma4TextConfig(**config_to_hf(cfg))
    hf_cfg._attn_implementation = "eager"
    hf_cfg._experts_implementation = "eager"  # the per-expert loop of the modeling code (default: grouped_mm)
    model = transformers.Gemma4ForCausalLM(hf_cfg).eval()
    sd = to_hf_state_dict(params)
    sd["lm_head.weight"] = params.embed_tokens
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    model = model.to(dtype)
    # `.to(bf16)` would also round the RoPE inv_freq buffers, which `from_pretrained(dtype=bf16)`
    # keeps in fp32: rebuild them as a real bf16 load has them.
    model.model.rotary_emb = type(model.model.rotary_emb)(hf_cfg)
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Reference logits of a full causal forward, no cache."""
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def hf_cached_logits(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' own cached decoding on `ids`: a prefill of `n` tokens, then one token at a time."""
    with torch.no_grad():
        out = model(input_ids=ids[:, :n], use_cache=True)
        logits = [out.logits]
        for t in range(n, ids.shape[1] - 1):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, 1)


def hf_multimodal(cfg: g4.Config, params: g4.Params):
    """A `Gemma4ForConditionalGeneration` (eager attention) holding exactly `params`, towers included."""
    assert cfg.towers is not None
    hf_cfg = transformers.Gemma4Config(text_config=config_to_hf(cfg), **towers_to_hf(cfg.towers))
    for c in (hf_cfg, hf_cfg.text_config, hf_cfg.vision_config, hf_cfg.audio_config):
        if c is not None:
            c._attn_implementation = "eager"
    model = transformers.Gemma4ForConditionalGeneration(hf_cfg).eval()
    sd = to_hf_state_dict(params, MM_PREFIX) | {"lm_head.weight": params.embed_tokens}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model
