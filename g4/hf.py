"""Hugging Face translation: `config.json` <-> `Config`, checkpoint tensor names <-> tree paths."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from torch import Tensor

from g4.config import (
    AUDIO_TOKEN_ID,
    BOA_TOKEN_ID,
    BOI_TOKEN_ID,
    DRAFT_TOKENS,
    EOA_TOKEN_ID,
    EOI_TOKEN_ID,
    FULL,
    IMAGE_TOKEN_ID,
    SLIDING,
    AssistantConfig,
    AudioConfig,
    Config,
    ConfigError,
    Towers,
    VisionConfig,
)
from g4.params import CLIP_BOUNDS, KV_WEIGHTS, TOWERS, Params, leaves_with_path

TEXT_PREFIX = "model."  # Gemma4ForCausalLM
MM_PREFIX = "model.language_model."  # Gemma4ForConditionalGeneration (hub -it and base checkpoints)
MM_IGNORED = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")
TOWER_PREFIXES = {  # loaded with towers=True, then checked
    "vision": ("model.vision_tower.", "model.embed_vision."),
    "audio": ("model.audio_tower.", "model.embed_audio."),
}
# KV-shared layers still carry these in hub checkpoints; the reference never uses them.
SHARED_KV_IGNORED = tuple(p + ".weight" for p in KV_WEIGHTS)


TOWERS_PREFIX = "model."  # the towers and their embedders sit beside the language model

# Tensors that are parameters (or buffers) of their own in transformers, not a module's `.weight`.
BARE: tuple[str, ...] = (
    "layer_scalar",
    "router.scale",
    "router.per_expert_scale",
    "experts.gate_up_proj",
    "experts.down_proj",
)
BARE += ("position_embedding_table", "std_bias", "std_scale", *CLIP_BOUNDS)  # the vision tower's
BARE += ("per_dim_scale", "output_proj.weight", "output_proj.bias")  # the audio tower's


def hf_name(path: str) -> str:
    """Tree path -> key without prefix: `layers.0.self_attn.q_proj` -> `...q_proj.weight`."""
    return path if path.endswith(BARE) else path + ".weight"


def hf_key(path: str, prefix: str) -> str:
    """Tree path -> checkpoint key: text weights under `prefix` (the layout's), the towers under `model.`."""
    return (TOWERS_PREFIX if path.startswith(TOWERS) else prefix) + hf_name(path)


def to_hf_state_dict(params: Params, prefix: str = TEXT_PREFIX) -> dict[str, Tensor]:
    """The tree as a Hugging Face state dict (tied lm_head not included)."""
    return {hf_key(p, prefix): t for p, t in leaves_with_path(params)}


def config_from_hf(d: Mapping[str, Any]) -> Config:
    """Reads a Hugging Face `config.json` dict (multimodal `Gemma4Config` or `Gemma4TextConfig`)."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type == "gemma4":
        if not isinstance(d.get("text_config"), Mapping):
            raise ConfigError("config.json: model_type 'gemma4' without a 'text_config' object")
        d = d["text_config"]
        model_type = d.get("model_type", "gemma4_text")
    if model_type != "gemma4_text":
        raise ConfigError(f"config.json: model_type {model_type!r} is not Gemma 4 (expected 'gemma4' or 'gemma4_text')")

    def need(key: str) -> Any:
        if d.get(key) is None:
            raise ConfigError(f"config.json: missing field {key!r}")
        return d[key]

    n_layers = int(need("num_hidden_layers"))
    layer_types = list(d.get("layer_types") or [SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)])
    layer_types[-1] = FULL  # HF forces the last layer to full attention
    if d.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ConfigError(f"config.json: hidden_activation {d['hidden_activation']!r} is not supported")
    if d.get("attention_bias"):
        raise ConfigError("config.json: attention_bias=true is not supported")
    if d.get("use_bidirectional_attention") == "all":
        raise ConfigError("config.json: use_bidirectional_attention='all' is not supported")

    rope = d.get("rope_parameters") or {}
    sliding_rope = rope.get(SLIDING, {"rope_type": "default", "rope_theta": 10_000.0})
    full_rope = rope.get(FULL, {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.25})
    if sliding_rope.get("rope_type", "default") != "default":
        raise ConfigError(f"config.json: rope_parameters.{SLIDING}.rope_type must be 'default'")
    if full_rope.get("rope_type") != "proportional" or full_rope.get("factor", 1.0) != 1.0:
        raise ConfigError(f"config.json: rope_parameters.{FULL} must be 'proportional' without factor")

    # Full-layer head_dim and KV heads: flat `global_head_dim` / `num_global_key_value_heads` (hub
    # files) or HF 5.x's `per_layer_config`.
    flat = {"head_dim": d.get("global_head_dim"), "num_key_value_heads": d.get("num_global_key_value_heads")}
    for i, over in (d.get("per_layer_config") or {}).items():
        for key in flat:
            if over.get(key) is not None:
                if flat[key] not in (None, over[key]):
                    raise ConfigError(f"config.json: per_layer_config[{i}].{key}={over[key]} differs from others")
                flat[key] = over[key]
    global_head_dim = flat["head_dim"]
    eos = need("eos_token_id") if "eos_token_id" in d else 1
    return Config(
        vocab_size=int(need("vocab_size")),
        hidden_size=int(need("hidden_size")),
        intermediate_size=int(need("intermediate_size")),
        num_hidden_layers=n_layers,
        num_attention_heads=int(need("num_attention_heads")),
        num_key_value_heads=int(need("num_key_value_heads")),
        head_dim=int(need("head_dim")),
        global_head_dim=int(global_head_dim if global_head_dim is not None else 512),
        layer_types=layer_types,
        sliding_window=int(need("sliding_window")),
        num_kv_shared_layers=int(d.get("num_kv_shared_layers") or 0),
        hidden_size_per_layer_input=int(d.get("hidden_size_per_layer_input") or 0),
        vocab_size_per_layer_input=int(d.get("vocab_size_per_layer_input") or d["vocab_size"]),
        use_double_wide_mlp=bool(d.get("use_double_wide_mlp", False)),
        final_logit_softcapping=d.get("final_logit_softcapping"),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_local_base_freq=float(sliding_rope.get("rope_theta", 10_000.0)),
        rope_theta=float(full_rope.get("rope_theta", 1e6)),
        partial_rotary_factor=float(full_rope.get("partial_rotary_factor", 1.0)),
        max_position_embeddings=int(d.get("max_position_embeddings", 131_072)),
        pad_token_id=int(d.get("pad_token_id") or 0),
        eos_token_id=eos if isinstance(eos, list) else [eos],
        bos_token_id=int(d.get("bos_token_id", 2)),
        attention_k_eq_v=bool(d.get("attention_k_eq_v", False)),
        num_global_key_value_heads=flat["num_key_value_heads"],
        enable_moe_block=bool(d.get("enable_moe_block", False)),
        num_experts=int(d.get("num_experts") or 0),
        top_k_experts=int(d.get("top_k_experts") or 0),
        moe_intermediate_size=int(d.get("moe_intermediate_size") or 0),
    )


VISION_FIELDS = [f.name for f in attrs.fields(VisionConfig) if f.name != "rope_theta"]
AUDIO_FIELDS = [f.name for f in attrs.fields(AudioConfig)]


def towers_from_hf(d: Mapping[str, Any]) -> Towers:
    """The towers of a multimodal `config.json` (`model_type` 'gemma4'); ConfigError if it has none."""
    if not isinstance(d, Mapping) or d.get("model_type") != "gemma4":
        raise ConfigError("config.json: towers need a multimodal Gemma 4 config (model_type 'gemma4')")
    v, a = d.get("vision_config"), d.get("audio_config")
    if not isinstance(v, Mapping) and not isinstance(a, Mapping):
        raise ConfigError(
            "config.json: neither a 'vision_config' nor an 'audio_config' object (a text-only checkpoint?)"
        )
    vision = audio = None
    if isinstance(v, Mapping):
        rope = v.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ConfigError(
                f"config.json: vision_config.rope_parameters.rope_type {rope['rope_type']!r} is not 'axial'"
            )
        if v.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh" or v.get("attention_bias"):
            raise ConfigError(
                "config.json: vision_config needs hidden_activation gelu_pytorch_tanh and no attention_bias"
            )
        vision = VisionConfig(
            **{k: v[k] for k in VISION_FIELDS if v.get(k) is not None}, rope_theta=float(rope.get("rope_theta", 100.0))
        )
    if isinstance(a, Mapping):
        if a.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json: audio_config.hidden_act {a['hidden_act']!r} is not 'silu'")
        audio = AudioConfig(**{k: a[k] for k in AUDIO_FIELDS if a.get(k) is not None})
    text = d.get("text_config") or {}
    return Towers(
        vision=vision,
        audio=audio,
        image_token_id=int(d.get("image_token_id", IMAGE_TOKEN_ID)),
        boi_token_id=int(d.get("boi_token_id", BOI_TOKEN_ID)),
        eoi_token_id=int(d.get("eoi_token_id", EOI_TOKEN_ID)),
        audio_token_id=int(d.get("audio_token_id", AUDIO_TOKEN_ID)),
        boa_token_id=int(d.get("boa_token_id", BOA_TOKEN_ID)),
        eoa_token_id=int(d.get("eoa_token_index", EOA_TOKEN_ID)),  # transformers' name
        bidirectional_vision=text.get("use_bidirectional_attention") == "vision",
    )


def towers_to_hf(t: Towers) -> dict[str, Any]:
    """The multimodal `config.json` fields of `t` (beside `text_config`)."""
    v = a = None
    if t.vision is not None:
        v = attrs.asdict(t.vision) | {"model_type": "gemma4_vision"}
        v["rope_parameters"] = {"rope_type": "axial", "rope_theta": v.pop("rope_theta")}
    if t.audio is not None:
        a = attrs.asdict(t.audio) | {"model_type": "gemma4_audio", "hidden_act": "silu"}
        a["subsampling_conv_channels"] = list(a["subsampling_conv_channels"])
    return {
        "vision_config": v,
        "audio_config": a,
        "image_token_id": t.image_token_id,
        "boi_token_id": t.boi_token_id,
        "eoi_token_id": t.eoi_token_id,
        "audio_token_id": t.audio_token_id,
        "boa_token_id": t.boa_token_id,
        "eoa_token_index": t.eoa_token_id,
    }


def assistant_config_from_hf(d: Mapping[str, Any], generation: Mapping[str, Any] | None = None) -> AssistantConfig:
    """Reads an assistant drafter's `config.json` dict (`gemma4_assistant`), and its generation config's
    `num_assistant_tokens` if it names one."""
    if not isinstance(d, Mapping) or d.get("model_type") != "gemma4_assistant":
        got = d.get("model_type") if isinstance(d, Mapping) else type(d).__name__
        raise ConfigError(f"config.json: model_type {got!r} is not a Gemma 4 assistant ('gemma4_assistant')")
    text = d.get("text_config")
    if not isinstance(text, Mapping):
        raise ConfigError("config.json: a gemma4_assistant config needs a 'text_config' object")
    n = text.get("num_hidden_layers")
    if text.get("num_kv_shared_layers") not in (None, 0, n):
        raise ConfigError(f"config.json: text_config.num_kv_shared_layers must be num_hidden_layers ({n})")
    draft = (generation or {}).get("num_assistant_tokens") or DRAFT_TOKENS
    return AssistantConfig(
        text=config_from_hf({**text, "num_kv_shared_layers": 0}),  # see AssistantConfig
        backbone_hidden_size=int(d.get("backbone_hidden_size", 1536)),
        use_ordered_embeddings=bool(d.get("use_ordered_embeddings", False)),
        num_centroids=int(d.get("num_centroids", 2048)),
        centroid_intermediate_top_k=int(d.get("centroid_intermediate_top_k", 32)),
        draft_tokens=int(draft),
    )


def assistant_config_to_hf(acfg: AssistantConfig) -> dict[str, Any]:
    """The assistant's Hugging Face `config.json` dict (`Gemma4AssistantForCausalLM`)."""
    text = config_to_hf(acfg.text) | {
        "num_kv_shared_layers": acfg.text.num_hidden_layers,
        "vocab_size_per_layer_input": 0,
    }
    del text["architectures"]
    return {
        "architectures": ["Gemma4AssistantForCausalLM"],
        "model_type": "gemma4_assistant",
        "text_config": text,
        "backbone_hidden_size": acfg.backbone_hidden_size,
        "use_ordered_embeddings": acfg.use_ordered_embeddings,
        "num_centroids": acfg.num_centroids,
        "centroid_intermediate_top_k": acfg.centroid_intermediate_top_k,
        "tie_word_embeddings": True,
    }


ASSISTANT_NAMES = {  # drafter tree paths outside its decoder (`model.`)
    "pre_projection": "pre_projection.weight",
    "post_projection": "post_projection.weight",
    "centroids": "masked_embedding.centroids.weight",
    "token_ordering": "masked_embedding.token_ordering",
}


def assistant_name(path: str) -> str:
    """Drafter tree path -> checkpoint key."""
    return ASSISTANT_NAMES.get(path) or TEXT_PREFIX + hf_name(path)


def config_to_hf(cfg: Config) -> dict[str, Any]:
    """The text-only Hugging Face `config.json` dict (`Gemma4ForCausalLM`)."""
    return {
        "architectures": ["Gemma4ForCausalLM"],
        "model_type": "gemma4_text",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "global_head_dim": cfg.global_head_dim,
        "layer_types": list(cfg.layer_types),
        "sliding_window": cfg.sliding_window,
        "num_kv_shared_layers": cfg.num_kv_shared_layers,
        "hidden_size_per_layer_input": cfg.hidden_size_per_layer_input,
        "vocab_size_per_layer_input": cfg.vocab_size_per_layer_input,
        "use_double_wide_mlp": cfg.use_double_wide_mlp,
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {
            SLIDING: {"rope_type": "default", "rope_theta": cfg.rope_local_base_freq},
            FULL: {
                "rope_type": "proportional",
                "partial_rotary_factor": cfg.partial_rotary_factor,
                "rope_theta": cfg.rope_theta,
            },
        },
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_k_eq_v": cfg.attention_k_eq_v,
        "num_global_key_value_heads": cfg.num_global_key_value_heads,
        "enable_moe_block": cfg.enable_moe_block,
        "num_experts": cfg.num_experts or None,
        "top_k_experts": cfg.top_k_experts or None,
        "moe_intermediate_size": cfg.moe_intermediate_size or None,
        "tie_word_embeddings": True,
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": list(cfg.eos_token_id),
        "bos_token_id": cfg.bos_token_id,
        "use_bidirectional_attention": "vision" if cfg.towers and cfg.towers.bidirectional_vision else None,
    }
