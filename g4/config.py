"""Gemma 4 text-decoder configuration: sizes as data, per-layer facts derived once.

Field names follow Hugging Face `Gemma4TextConfig` where one exists. Three fields are flat
where HF nests them under `rope_parameters` (as Gemma 3 named them): `rope_local_base_freq`
(sliding layers, "default" RoPE), `rope_theta` and `partial_rotary_factor` (full layers,
"proportional" RoPE). Reading and writing `config.json` is `g4.hf`'s job.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
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
    k_eq_v: bool = False  # values are the key projection (31B, 26B-A4B full layers: no v_proj)

    @property
    def is_sliding(self) -> bool:
        """Whether the layer uses the sliding-window mask."""
        return self.type == SLIDING


def _tuple(x: Iterable[Any]) -> tuple[Any, ...]:
    """attrs converter: a list from config.json becomes a tuple (a plain `tuple` converter defeats mypy)."""
    return tuple(x)


IMAGE_TOKEN_ID = 258_880  # `<|image|>`: the placeholder each soft token of an image replaces
BOI_TOKEN_ID, EOI_TOKEN_ID = 255_999, 258_882  # `<|image>`, `<image|>`: around an image's placeholders


@attrs.frozen(kw_only=True)
class VisionConfig:
    """Gemma 4's vision tower (`Gemma4VisionConfig`): a bidirectional encoder over 2-D patch positions."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0  # axial RoPE: half the head dim rotates with x, half with y
    pooling_kernel_size: int = 3  # k x k patches average into one soft token
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024  # rows of each (x, y) position table
    use_clipped_linears: bool = False  # every linear clamps its input and output to stored bounds
    standardize: bool = False  # soft tokens: (x - std_bias) * std_scale

    def __attrs_post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads or self.head_dim % 4:
            raise ConfigError(
                f"vision_config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) and head_dim ({self.head_dim}) of 4"
            )


AUDIO_TOKEN_ID = 258_881  # `<|audio|>`: the placeholder each soft token of a clip replaces
BOA_TOKEN_ID, EOA_TOKEN_ID = 256_000, 258_883  # `<|audio>`, `<audio|>`: around a clip's placeholders


@attrs.frozen(kw_only=True)
class AudioConfig:
    """Gemma 4's audio tower (`Gemma4AudioConfig`): 4x subsampling convolutions, then conformer layers
    with chunked local attention (relative positions, a logit cap) and a causal depthwise convolution."""

    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    subsampling_conv_channels: tuple[int, ...] = attrs.field(default=(128, 32), converter=_tuple)
    conv_kernel_size: int = 5  # the light convolution's (depthwise, causal)
    residual_weight: float = 0.5  # each feed-forward half adds this much of its output
    attention_chunk_size: int = 12  # queries attend in blocks of this many frames ...
    attention_context_left: int = 13  # ... to keys this far back (the frame itself counts) ...
    attention_context_right: int = 0  # ... and this far ahead
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9  # masked logits (finite: a fully masked row is uniform)
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10  # activations are clamped to +-this between blocks
    output_proj_dims: int = 1536  # the soft tokens' width, before the embedder's projection

    def __attrs_post_init__(self) -> None:
        c = self.subsampling_conv_channels
        if len(c) != 2 or c[0] % 4 or self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"audio_config: needs two subsampling_conv_channels, the first a multiple of 4 (got {list(c)}), "
                f"and hidden_size ({self.hidden_size}) a multiple of num_attention_heads ({self.num_attention_heads})"
            )

    @property
    def mel_bins(self) -> int:
        """Mel bins of the input features: transformers sizes the projection as if they were the first
        convolution's channels (128 and 128 in every checkpoint)."""
        return self.subsampling_conv_channels[0]

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads


@attrs.frozen(kw_only=True)
class Towers:
    """What a multimodal checkpoint adds to the text decoder (`Gemma4Config`): its vision and audio towers."""

    vision: VisionConfig | None = None
    audio: AudioConfig | None = None
    image_token_id: int = IMAGE_TOKEN_ID
    boi_token_id: int = BOI_TOKEN_ID
    eoi_token_id: int = EOI_TOKEN_ID
    audio_token_id: int = AUDIO_TOKEN_ID
    boa_token_id: int = BOA_TOKEN_ID
    eoa_token_id: int = EOA_TOKEN_ID
    # text_config.use_bidirectional_attention == "vision": on sliding layers, an image's soft tokens
    # also see the later soft tokens of the same image (full layers stay causal)
    bidirectional_vision: bool = False

    def only(self, vision: bool, audio: bool) -> Towers | None:
        """These towers with the unwanted dropped; None if none is left."""
        t = attrs.evolve(self, vision=self.vision if vision else None, audio=self.audio if audio else None)
        return None if t.vision is None and t.audio is None else t

    @property
    def soft_token_ids(self) -> tuple[int, ...]:
        """The placeholder ids soft tokens replace: the image's if there is a vision tower, the audio's if audio."""
        return (self.image_token_id,) * (self.vision is not None) + (self.audio_token_id,) * (self.audio is not None)


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
    # 31B and 26B-A4B: full layers take their values from the key projection, with their own KV-head
    # count (HF applies num_global_key_value_heads only together with attention_k_eq_v).
    attention_k_eq_v: bool = False
    num_global_key_value_heads: int | None = None
    # 26B-A4B: every layer adds a routed mixture of experts beside its dense MLP.
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    # The vision tower etc., loaded only on request (`load_checkpoint(..., towers=True)`); None: text only.
    towers: Towers | None = None

    def __attrs_post_init__(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries, num_hidden_layers is {self.num_hidden_layers}"
            )
        if bad := sorted(set(self.layer_types) - set(LAYER_TYPES)):
            raise ConfigError(f"layer_types: unknown layer type(s) {bad}; expected {LAYER_TYPES}")
        if self.enable_moe_block and not (
            self.num_experts >= 1 and 1 <= self.top_k_experts <= self.num_experts and self.moe_intermediate_size >= 1
        ):
            got = f"{self.num_experts}, {self.top_k_experts}, {self.moe_intermediate_size}"
            raise ConfigError(
                "enable_moe_block needs num_experts >= 1, top_k_experts in [1, num_experts] and "
                f"moe_intermediate_size >= 1, got {got}"
            )
        if not 0 <= self.num_kv_shared_layers < self.num_hidden_layers:
            raise ConfigError(f"num_kv_shared_layers={self.num_kv_shared_layers} out of range")
        owners = set(self.layer_types[: self.first_shared])
        if missing := sorted(set(self.layer_types[self.first_shared :]) - owners):
            raise ConfigError(
                f"layer_types / num_kv_shared_layers: KV-shared layers of type {missing} have no donor "
                f"(no non-shared layer of that type before layer {self.first_shared})"
            )
        for s in self.layers:
            if self.num_attention_heads % s.num_kv_heads:
                raise ConfigError(
                    f"num_attention_heads ({self.num_attention_heads}) must be a multiple of the KV heads of "
                    f"{s.type} layers ({s.num_kv_heads})"
                )

    @property
    def first_shared(self) -> int:
        """Index of the first KV-consumer layer; layers before it own a KV cache."""
        return self.num_hidden_layers - self.num_kv_shared_layers

    @functools.cached_property
    def kv_stores(self) -> dict[str, int]:
        """Layer type -> the last KV-owning layer of that type: the donor of KV-shared layers, and the
        K/V an assistant drafter reads (HF's "store" layers)."""
        owners = self.layer_types[: self.first_shared]
        return {t: max(i for i, u in enumerate(owners) if u == t) for t in LAYER_TYPES if t in owners}

    @functools.cached_property
    def layers(self) -> tuple[LayerSpec, ...]:
        """Per-layer facts, derived once."""
        donor = self.kv_stores
        k_eq_v = self.attention_k_eq_v  # full layers only
        full_kv = self.num_global_key_value_heads if k_eq_v and self.num_global_key_value_heads else None
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
                    num_kv_heads=self.num_key_value_heads if sliding or full_kv is None else full_kv,
                    rope_theta=self.rope_local_base_freq if sliding else self.rope_theta,
                    partial_rotary_factor=1.0 if sliding else self.partial_rotary_factor,
                    intermediate_size=self.intermediate_size * wide,
                    kv_source=donor[t] if shared else i,
                    k_eq_v=k_eq_v and not sliding,
                )
            )
        return tuple(specs)


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
    # The larger models: no per-layer embeddings, no KV sharing, window 1024, and full layers whose
    # values are their keys, with fewer KV heads. 26B-A4B adds 128 experts (8 per token) to every layer;
    # its dense MLP is config.json's intermediate_size, 2112 (the 25.2 B total checks it).
    "31b": Config(
        vocab_size=262_144,
        hidden_size=5376,
        intermediate_size=21_504,
        num_hidden_layers=60,
        num_attention_heads=32,
        num_key_value_heads=16,
        head_dim=256,
        global_head_dim=512,
        layer_types=_pattern(5, 10),
        sliding_window=1024,
        num_kv_shared_layers=0,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=262_144,
        max_position_embeddings=262_144,
        eos_token_id=(1, 106),
        attention_k_eq_v=True,
        num_global_key_value_heads=4,
    ),
    "26b-a4b": Config(
        vocab_size=262_144,
        hidden_size=2816,
        intermediate_size=2112,
        num_hidden_layers=30,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        global_head_dim=512,
        layer_types=_pattern(5, 5),
        sliding_window=1024,
        num_kv_shared_layers=0,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=262_144,
        max_position_embeddings=262_144,
        eos_token_id=(1, 106),
        attention_k_eq_v=True,
        num_global_key_value_heads=2,
        enable_moe_block=True,
        num_experts=128,
        top_k_experts=8,
        moe_intermediate_size=704,
    ),
}

# Tiny stand-ins of the two larger kinds, for tests: the tiny size's widths, 31B's and 26B-A4B's features.
CONFIGS["tiny-31b"] = attrs.evolve(
    CONFIGS["tiny"],
    num_kv_shared_layers=0,
    hidden_size_per_layer_input=0,
    use_double_wide_mlp=False,
    attention_k_eq_v=True,
    num_global_key_value_heads=1,
)
CONFIGS["tiny-26b"] = attrs.evolve(
    CONFIGS["tiny-31b"],
    num_hidden_layers=4,  # half the layers: its exports lower in half the time
    layer_types=_pattern(1, 2),
    intermediate_size=64,
    enable_moe_block=True,
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=32,
)


DRAFT_TOKENS = 4  # tokens an assistant drafts per round when its generation_config.json names none


@attrs.frozen(kw_only=True)
class AssistantConfig:
    """A Gemma 4 assistant drafter (`gemma4_assistant`): a few decoder layers with no K/V of their own.

    `text` holds the drafter's layers. HF marks all of them KV-shared (each reads the target's K/V of
    its layer type); g4 holds them with `num_kv_shared_layers=0`, as the drafter has no donor layer of
    its own, and builds them without k/v weights.
    """

    text: Config
    backbone_hidden_size: int  # the target's hidden size
    use_ordered_embeddings: bool = False  # logits only for the tokens of the top centroids
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    draft_tokens: int = DRAFT_TOKENS  # generation_config.json's num_assistant_tokens

    def __attrs_post_init__(self) -> None:
        t = self.text
        if t.hidden_size_per_layer_input or t.enable_moe_block or t.use_double_wide_mlp:
            raise ConfigError("assistant text_config: no per-layer inputs, experts or double-wide MLP expected")
        if self.use_ordered_embeddings and (
            self.num_centroids < 1
            or t.vocab_size % self.num_centroids
            or not 1 <= self.centroid_intermediate_top_k <= self.num_centroids
        ):
            raise ConfigError(
                f"assistant: num_centroids ({self.num_centroids}) must divide vocab_size ({t.vocab_size}) and "
                f"centroid_intermediate_top_k ({self.centroid_intermediate_top_k}) be in [1, num_centroids]"
            )
        if self.draft_tokens < 1:
            raise ConfigError(f"assistant: num_assistant_tokens must be >= 1, got {self.draft_tokens}")

    @classmethod
    def for_target(
        cls,
        target: Config,
        *,
        hidden_size: int,
        intermediate_size: int,
        num_attention_heads: int,
        layer_types: tuple[str, ...],
        **kw: Any,
    ) -> AssistantConfig:
        """A drafter of these sizes for `target`: its vocabulary, K/V heads, head dims, window and RoPE;
        no per-layer inputs, experts, double-wide MLP or softcap."""
        text = attrs.evolve(
            target,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_attention_heads=num_attention_heads,
            num_hidden_layers=len(layer_types),
            layer_types=layer_types,
            num_kv_shared_layers=0,
            hidden_size_per_layer_input=0,
            use_double_wide_mlp=False,
            final_logit_softcapping=None,
            enable_moe_block=False,
            num_experts=0,
            top_k_experts=0,
            moe_intermediate_size=0,
        )
        return cls(text=text, backbone_hidden_size=target.hidden_size, **kw)

    def check_target(self, target: Config) -> None:
        """Raises ConfigError unless this drafter can read `target`'s K/V and hidden states."""
        t = self.text
        if self.backbone_hidden_size != target.hidden_size or t.vocab_size != target.vocab_size:
            raise ConfigError(
                f"assistant: backbone_hidden_size {self.backbone_hidden_size} / vocab_size {t.vocab_size} do not "
                f"match the target's hidden_size {target.hidden_size} / vocab_size {target.vocab_size}"
            )
        for i, s in enumerate(t.layers):
            if s.type not in target.kv_stores:
                raise ConfigError(f"assistant: layer {i} is {s.type}; the target has no such layer")
            store = target.layers[target.kv_stores[s.type]]
            if (s.head_dim, s.num_kv_heads) != (store.head_dim, store.num_kv_heads):
                raise ConfigError(
                    f"assistant: layer {i} ({s.type}) has head_dim {s.head_dim} and {s.num_kv_heads} KV heads; the "
                    f"target's K/V there have {store.head_dim} and {store.num_kv_heads}"
                )


# A tiny drafter for the tiny target, for tests and the README's example.
ASSISTANTS: dict[str, AssistantConfig] = {
    "tiny": AssistantConfig.for_target(
        CONFIGS["tiny"],
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        layer_types=(SLIDING, SLIDING, FULL),
        num_centroids=16,
        centroid_intermediate_top_k=4,
    )
}

# The towers of multimodal checkpoints (`vision_config`, `audio_config`), for random weights and
# `g4.export --vision / --audio`. E2B's and E4B's: transformers' default vision config with clipped linears,
# no standardisation, and its default audio config (their tensor counts). The tiny ones keep every feature
# at a few KB: grouped KV heads, clipping, standardisation, 4 x 4-pixel patches; audio keys from the future
# (context right), a cap and clamps that act on unit-scale activations, a norm epsilon unlike the default's;
# their placeholders are unused ids of the tiny vocabulary.
TOWERS: dict[str, Towers] = {
    "tiny": Towers(
        vision=VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            patch_size=4,
            position_embedding_size=64,
            use_clipped_linears=True,
            standardize=True,
        ),
        audio=AudioConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            subsampling_conv_channels=(128, 8),
            conv_kernel_size=3,
            attention_chunk_size=4,
            attention_context_left=6,
            attention_context_right=2,
            attention_logit_cap=4.0,
            rms_norm_eps=1e-5,
            gradient_clipping=3.0,
            output_proj_dims=48,
        ),
        image_token_id=54,
        boi_token_id=53,
        eoi_token_id=55,
        audio_token_id=57,
        boa_token_id=56,
        eoa_token_id=58,
    ),
    "e2b": Towers(vision=VisionConfig(use_clipped_linears=True), audio=AudioConfig()),
    "e4b": Towers(vision=VisionConfig(use_clipped_linears=True), audio=AudioConfig()),
}
