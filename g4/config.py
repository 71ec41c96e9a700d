"""Gemma 4 text-decoder configuration: sizes as data, per-layer facts derived once.

Field names follow Hugging Face `Gemma4TextConfig` where one exists. Three fields are flat
where HF nests them under `rope_parameters` (as Gemma 3 named them): `rope_local_base_freq`
(sliding layers, "default" RoPE), `rope_theta` and `partial_rotary_factor` (full layers,
"proportional" RoPE).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import attrs

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)


class ConfigError(ValueError):
    """A configuration that g4 cannot run, naming the field at fault."""


@attrs.frozen
class LayerSpec:
    """Static facts about one decoder layer, derived from `Config`."""

    type: str  # SLIDING or FULL
    window: int | None  # sliding window W (a query sees W keys, itself included), None on full layers
    head_dim: int
    num_kv_heads: int
    rope_theta: float
    partial_rotary_factor: float  # 1.0: all dims rotated ("default" RoPE)
    intermediate_size: int
    kv_source: int  # layer whose K/V this layer attends to: itself, or its donor if KV-shared

    @property
    def is_sliding(self) -> bool:
        """Whether the layer uses the sliding-window mask."""
        return self.type == SLIDING


def _tuple(x: Any) -> tuple:
    return tuple(x)


@attrs.frozen(kw_only=True)
class Config:
    """Text-decoder hyper-parameters of one Gemma 4 size."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # sliding layers (and full layers unless k_eq_v overrides)
    head_dim: int  # sliding layers
    global_head_dim: int  # full layers
    layer_types: tuple[str, ...] = attrs.field(converter=_tuple)
    sliding_window: int
    num_kv_shared_layers: int
    hidden_size_per_layer_input: int  # PLE width P; 0 disables per-layer embeddings
    vocab_size_per_layer_input: int
    use_double_wide_mlp: bool = False  # KV-consumer layers use 2 * intermediate_size
    final_logit_softcapping: float | None = 30.0
    rms_norm_eps: float = 1e-6
    rope_local_base_freq: float = 10_000.0
    rope_theta: float = 1_000_000.0
    partial_rotary_factor: float = 0.25
    max_position_embeddings: int = 131_072
    pad_token_id: int = 0
    eos_token_id: tuple[int, ...] = attrs.field(default=(1,), converter=_tuple)
    bos_token_id: int = 2
    # Present in larger Gemma 4 sizes (31B, 26B-A4B); not supported yet, kept so configs say so.
    attention_k_eq_v: bool = False
    num_global_key_value_heads: int | None = None
    enable_moe_block: bool = False

    def __attrs_post_init__(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries, num_hidden_layers is {self.num_hidden_layers}"
            )
        if bad := sorted(set(self.layer_types) - set(LAYER_TYPES)):
            raise ConfigError(f"layer_types: unknown layer type(s) {bad}; expected {LAYER_TYPES}")
        if self.attention_k_eq_v or self.enable_moe_block:
            raise ConfigError("attention_k_eq_v / enable_moe_block (Gemma 4 31B, 26B-A4B) are not supported yet")
        if not 0 <= self.num_kv_shared_layers < self.num_hidden_layers:
            raise ConfigError(f"num_kv_shared_layers={self.num_kv_shared_layers} out of range")
        owners = set(self.layer_types[: self.first_shared])
        if missing := sorted(set(self.layer_types[self.first_shared :]) - owners):
            raise ConfigError(
                f"layer_types / num_kv_shared_layers: KV-shared layers of type {missing} have no donor "
                f"(no non-shared layer of that type before layer {self.first_shared})"
            )
        for name in ("num_key_value_heads",):
            if self.num_attention_heads % getattr(self, name):
                raise ConfigError(f"num_attention_heads must be a multiple of {name}")

    @property
    def first_shared(self) -> int:
        """Index of the first KV-consumer layer; layers before it own a KV cache."""
        return self.num_hidden_layers - self.num_kv_shared_layers

    @functools.cached_property
    def layers(self) -> tuple[LayerSpec, ...]:
        """Per-layer facts, derived once."""
        donor = {
            t: max(i for i in range(self.first_shared) if self.layer_types[i] == t)
            for t in LAYER_TYPES
            if t in self.layer_types[: self.first_shared]
        }
        specs = []
        for i, t in enumerate(self.layer_types):
            shared = i >= self.first_shared
            sliding = t == SLIDING
            wide = 2 if (self.use_double_wide_mlp and shared) else 1
            specs.append(
                LayerSpec(
                    type=t,
                    window=self.sliding_window if sliding else None,
                    head_dim=self.head_dim if sliding else self.global_head_dim,
                    num_kv_heads=self.num_key_value_heads,
                    rope_theta=self.rope_local_base_freq if sliding else self.rope_theta,
                    partial_rotary_factor=1.0 if sliding else self.partial_rotary_factor,
                    intermediate_size=self.intermediate_size * wide,
                    kv_source=donor[t] if shared else i,
                )
            )
        return tuple(specs)

    @property
    def kv_source(self) -> tuple[int, ...]:
        """The donor map: layer i attends to the K/V of layer kv_source[i]."""
        return tuple(s.kv_source for s in self.layers)

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> Config:
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
            raise ConfigError(
                f"config.json: model_type {model_type!r} is not Gemma 4 (expected 'gemma4' or 'gemma4_text')"
            )

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

        # Full-layer head_dim: flat `global_head_dim` (hub files) or HF 5.x's `per_layer_config`.
        global_head_dim = d.get("global_head_dim")
        for i, over in (d.get("per_layer_config") or {}).items():
            hd = over.get("head_dim")
            if hd is not None:
                if global_head_dim not in (None, hd):
                    raise ConfigError(f"config.json: per_layer_config[{i}].head_dim={hd} differs from others")
                global_head_dim = hd
        eos = need("eos_token_id") if "eos_token_id" in d else 1
        return cls(
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
            num_global_key_value_heads=d.get("num_global_key_value_heads"),
            enable_moe_block=bool(d.get("enable_moe_block", False)),
        )

    def to_hf(self) -> dict[str, Any]:
        """The text-only Hugging Face `config.json` dict (`Gemma4ForCausalLM`)."""
        return {
            "architectures": ["Gemma4ForCausalLM"],
            "model_type": "gemma4_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "global_head_dim": self.global_head_dim,
            "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window,
            "num_kv_shared_layers": self.num_kv_shared_layers,
            "hidden_size_per_layer_input": self.hidden_size_per_layer_input,
            "vocab_size_per_layer_input": self.vocab_size_per_layer_input,
            "use_double_wide_mlp": self.use_double_wide_mlp,
            "final_logit_softcapping": self.final_logit_softcapping,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {
                SLIDING: {"rope_type": "default", "rope_theta": self.rope_local_base_freq},
                FULL: {
                    "rope_type": "proportional",
                    "partial_rotary_factor": self.partial_rotary_factor,
                    "rope_theta": self.rope_theta,
                },
            },
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_activation": "gelu_pytorch_tanh",
            "attention_bias": False,
            "attention_k_eq_v": False,
            "enable_moe_block": False,
            "tie_word_embeddings": True,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": list(self.eos_token_id),
            "bos_token_id": self.bos_token_id,
        }


def _pattern(n_sliding: int, repeats: int) -> tuple[str, ...]:
    return ((SLIDING,) * n_sliding + (FULL,)) * repeats


CONFIGS: dict[str, Config] = {
    # A few MB; keeps every Gemma 4 feature: both layer types with different head dims, partial
    # RoPE, GQA, KV sharing of both types, per-layer embeddings, double-wide MLP, softcap.
    "tiny": Config(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        global_head_dim=64,
        layer_types=_pattern(3, 2),
        sliding_window=16,
        num_kv_shared_layers=3,
        hidden_size_per_layer_input=32,
        vocab_size_per_layer_input=512,
        use_double_wide_mlp=True,
        max_position_embeddings=4096,
        eos_token_id=(1, 106),
    ),
    "e2b": Config(
        vocab_size=262_144,
        hidden_size=1536,
        intermediate_size=6144,
        num_hidden_layers=35,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        global_head_dim=512,
        layer_types=_pattern(4, 7),
        sliding_window=512,
        num_kv_shared_layers=20,
        hidden_size_per_layer_input=256,
        vocab_size_per_layer_input=262_144,
        use_double_wide_mlp=True,
        eos_token_id=(1, 106),
    ),
    "e4b": Config(
        vocab_size=262_144,
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=42,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=256,
        global_head_dim=512,
        layer_types=_pattern(5, 7),
        sliding_window=512,
        num_kv_shared_layers=18,
        hidden_size_per_layer_input=256,
        vocab_size_per_layer_input=262_144,
        eos_token_id=(1, 106),
    ),
}
