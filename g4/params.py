"""The parameter tree: frozen attrs nodes with tensors as leaves, `None` for absent weights.

Attribute names are the Hugging Face module names, so a tree path such as
`layers.3.self_attn.q_proj` maps to the checkpoint key `model.layers.3.self_attn.q_proj.weight`
(see `g4.checkpoint`). Linear weights are stored as in HF: `[out, in]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar, cast

import attrs
import torch
from torch import Tensor
from torch.utils import _pytree

from g4.config import AssistantConfig, AudioConfig, Config, VisionConfig

T = TypeVar("T")


@attrs.frozen
class Attention:
    """Attention weights; a KV-shared layer has no k_proj, v_proj or k_norm, a k_eq_v layer no v_proj (None)."""

    q_proj: Tensor  # [nq*d, H]
    k_proj: Tensor | None  # [nkv*d, H]
    v_proj: Tensor | None  # [nkv*d, H]
    o_proj: Tensor  # [H, nq*d]
    q_norm: Tensor  # [d]
    k_norm: Tensor | None  # [d]; v_norm has no weight


@attrs.frozen
class Mlp:
    """Gated GELU-tanh MLP."""

    gate_proj: Tensor  # [I, H]
    up_proj: Tensor  # [I, H]
    down_proj: Tensor  # [H, I]


@attrs.frozen
class Router:
    """Chooses each token's experts (26B-A4B)."""

    proj: Tensor  # [E, H]
    scale: Tensor  # [H]; the router's RMSNorm itself has no weight
    per_expert_scale: Tensor  # [E]


@attrs.frozen
class Experts:
    """The experts' weights, stacked as on the hub."""

    gate_up_proj: Tensor  # [E, 2I, H]: gate rows, then up rows
    down_proj: Tensor  # [E, H, I]


@attrs.frozen
class Layer:
    """One decoder layer; PLE weights are None without per-layer embeddings, MoE weights without experts."""

    self_attn: Attention
    mlp: Mlp
    input_layernorm: Tensor
    post_attention_layernorm: Tensor
    pre_feedforward_layernorm: Tensor
    post_feedforward_layernorm: Tensor
    per_layer_input_gate: Tensor | None  # [P, H]
    per_layer_projection: Tensor | None  # [H, P]
    post_per_layer_input_norm: Tensor | None  # [H]
    layer_scalar: Tensor  # [1]; multiplies the whole residual stream at the end of the layer
    router: Router | None = None
    experts: Experts | None = None
    pre_feedforward_layernorm_2: Tensor | None = None  # [H] before the experts
    post_feedforward_layernorm_1: Tensor | None = None  # [H] after the dense MLP
    post_feedforward_layernorm_2: Tensor | None = None  # [H] after the experts


@attrs.frozen
class Clipped:
    """A vision/audio linear (`Gemma4ClippableLinear`); with clipping, scalar bounds on its input and output."""

    linear: Tensor  # [out, in]
    input_min: Tensor | None = None  # [] each
    input_max: Tensor | None = None
    output_min: Tensor | None = None
    output_max: Tensor | None = None


@attrs.frozen
class VisionAttention:
    """A vision layer's attention: full multi-head (or grouped) attention, q/k norms with weights."""

    q_proj: Clipped
    k_proj: Clipped
    v_proj: Clipped
    o_proj: Clipped
    q_norm: Tensor  # [d]
    k_norm: Tensor  # [d]


@attrs.frozen
class VisionMlp:
    """Gated GELU-tanh MLP of clipped linears."""

    gate_proj: Clipped
    up_proj: Clipped
    down_proj: Clipped


@attrs.frozen
class VisionLayer:
    """One encoder layer: the text layer's four norms, no layer_scalar."""

    self_attn: VisionAttention
    mlp: VisionMlp
    input_layernorm: Tensor
    post_attention_layernorm: Tensor
    pre_feedforward_layernorm: Tensor
    post_feedforward_layernorm: Tensor


@attrs.frozen
class PatchEmbedder:
    """Patches to the encoder's width, plus an x and a y position embedding."""

    input_proj: Tensor  # [Hv, 3 * patch**2]
    position_embedding_table: Tensor | tuple[Tensor, Tensor]  # [2, position_embedding_size, Hv]: x rows, y rows
    # (a quantized export: the x and the y table, int8, `g4.export.position_tables`)


@attrs.frozen
class Encoder:
    """The vision encoder's layers (HF nests them under `encoder`)."""

    layers: tuple[VisionLayer, ...]


@attrs.frozen
class VisionTower:
    """`Gemma4VisionModel`: patch embedder, encoder, (parameter-free) pooler, optional standardisation."""

    patch_embedder: PatchEmbedder
    encoder: Encoder
    std_bias: Tensor | None = None  # [Hv]
    std_scale: Tensor | None = None  # [Hv]


@attrs.frozen
class Embedder:
    """`Gemma4MultimodalEmbedder`: a weightless RMSNorm, then this projection to the text width."""

    embedding_projection: Tensor  # [H, Hv]


@attrs.frozen
class SubsampleLayer:
    """A 3x3 stride-2 convolution over (time, mel), then a LayerNorm over channels (weight only) and ReLU."""

    conv: Tensor  # [C, C_in, 3, 3]
    norm: Tensor  # [C]


@attrs.frozen
class Subsample:
    """Two stride-2 convolutions (4x fewer frames and mel bins), then a projection to the tower's width."""

    layer0: SubsampleLayer
    layer1: SubsampleLayer
    input_proj_linear: Tensor  # [Ha, C1 * mel/4]


@attrs.frozen
class AudioFeedForward:
    """A conformer half-step feed-forward: norm, 4x SiLU MLP, norm, scaled residual."""

    ffw_layer_1: Clipped
    ffw_layer_2: Clipped
    pre_layer_norm: Tensor
    post_layer_norm: Tensor


@attrs.frozen
class AudioAttention:
    """Chunked local attention with relative position keys and a learned per-dimension query scale."""

    q_proj: Clipped
    k_proj: Clipped
    v_proj: Clipped
    post: Clipped
    relative_k_proj: Tensor  # [Ha, Ha]: sinusoids of relative positions -> keys
    per_dim_scale: Tensor  # [d]


@attrs.frozen
class LightConv:
    """Norm, gated projection, causal depthwise convolution over time, norm, SiLU, projection."""

    linear_start: Clipped  # [2Ha, Ha]: value and gate halves
    linear_end: Clipped
    depthwise_conv1d: Tensor  # [Ha, 1, K]
    pre_layer_norm: Tensor
    conv_norm: Tensor


@attrs.frozen
class AudioLayer:
    """One conformer layer: feed-forward, attention, light convolution, feed-forward, norm."""

    feed_forward1: AudioFeedForward
    feed_forward2: AudioFeedForward
    self_attn: AudioAttention
    lconv1d: LightConv
    norm_pre_attn: Tensor
    norm_post_attn: Tensor
    norm_out: Tensor


@attrs.frozen
class Affine:
    """A linear layer with a bias (`nn.Linear(bias=True)`)."""

    weight: Tensor  # [out, in]
    bias: Tensor  # [out]


@attrs.frozen
class AudioTower:
    """`Gemma4AudioModel`: subsampling, conformer layers, an output projection."""

    subsample_conv_projection: Subsample
    layers: tuple[AudioLayer, ...]
    output_proj: Affine  # [output_proj_dims, Ha]


@attrs.frozen
class Params:
    """The whole text decoder, and the towers if loaded; the LM head is tied to `embed_tokens`."""

    embed_tokens: Tensor  # [V, H]
    embed_tokens_per_layer: Tensor | None  # [V_ple, L*P], layer-major columns
    per_layer_model_projection: Tensor | None  # [L*P, H]
    per_layer_projection_norm: Tensor | None  # [P]
    norm: Tensor  # [H]
    layers: tuple[Layer, ...]
    # None: tied to embed_tokens (checkpoints); the exporter sets a quantized copy, in blocks of rows
    lm_head: Tensor | tuple[Tensor, ...] | None = None
    vision_tower: VisionTower | None = None
    embed_vision: Embedder | None = None
    audio_tower: AudioTower | None = None
    embed_audio: Embedder | None = None


@attrs.frozen
class Assistant:
    """An assistant drafter: its layers read the target's K/V, so their attention has no k/v weights."""

    embed_tokens: Tensor  # [V, h]: the drafter's tied LM head (its inputs are projections, not ids)
    norm: Tensor  # [h]
    layers: tuple[Layer, ...]
    pre_projection: Tensor  # [h, 2 * Hb]: target embedding ++ target hidden state -> drafter width
    post_projection: Tensor  # [Hb, h]: drafter hidden -> the next round's "target hidden state"
    centroids: Tensor | None = None  # [C, h] ordered embeddings only
    token_ordering: Tensor | None = None  # [V] int64: token ids, cluster by cluster


NODES: tuple[type, ...] = (Attention, Mlp, Router, Experts, Layer, Params, Assistant)
NODES += (Clipped, VisionAttention, VisionMlp, VisionLayer, PatchEmbedder, Encoder, VisionTower, Embedder)
AUDIO_NODES = (SubsampleLayer, Subsample, AudioFeedForward, AudioAttention, LightConv, AudioLayer, Affine, AudioTower)
NODES += AUDIO_NODES
NODE_TYPES = {c.__name__: c for c in NODES}


def _flatten(node: Any) -> tuple[list[Any], tuple[str, ...]]:
    names = tuple(f.name for f in attrs.fields(type(node)) if getattr(node, f.name) is not None)
    return [getattr(node, n) for n in names], names


def _unflatten_fn(cls: type) -> Callable[[Iterable[Any], Any], Any]:
    def unflatten(children: Iterable[Any], names: Any) -> Any:
        return cls(**({f.name: None for f in attrs.fields(cls)} | dict(zip(names, children, strict=True))))

    return unflatten


def register_node(cls: type) -> None:
    """Lets torch.func (grad, vmap) and torch.utils._pytree see an attrs node's tensors; None is no leaf."""
    _pytree.register_pytree_node(
        cls, _flatten, _unflatten_fn(cls), serialized_type_name=f"{cls.__module__}.{cls.__name__}"
    )


for _cls in NODES:
    register_node(_cls)


def tree_map_with_path(fn: Callable[[str, Tensor], Any], tree: T, prefix: str = "") -> T:
    """Maps `fn(path, leaf)` over the tensor leaves of a tree of attrs nodes and tuples; None stays None."""
    node: Any = tree
    if node is None:
        return tree
    if isinstance(node, Tensor):
        leaf: Any = fn(prefix, node)
        return leaf
    if isinstance(node, tuple):
        out: Any = type(node)(tree_map_with_path(fn, x, _join(prefix, str(i))) for i, x in enumerate(node))
        return out
    if attrs.has(type(node)):
        kids = {
            f.name: tree_map_with_path(fn, getattr(node, f.name), _join(prefix, f.name))
            for f in attrs.fields(type(node))
        }
        return attrs.evolve(node, **kids)
    raise TypeError(f"tree_map: unexpected node {type(node).__name__} at {prefix!r}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def tree_map(fn: Callable[[Tensor], Any], tree: T) -> T:
    """Maps `fn(leaf)` over the tensor leaves of a tree."""
    return tree_map_with_path(lambda _, x: fn(x), tree)


def leaves_with_path(tree: Any) -> Iterator[tuple[str, Tensor]]:
    """Yields `(path, tensor)` for every tensor leaf, in field order."""
    out: list[tuple[str, Tensor]] = []
    tree_map_with_path(lambda p, x: out.append((p, x)), tree)
    return iter(out)


NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def param_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Path -> shape of every weight the config has, in tree order (no tensors allocated)."""
    H, P, L = cfg.hidden_size, cfg.hidden_size_per_layer_input, cfg.num_hidden_layers
    s: dict[str, tuple[int, ...]] = {"embed_tokens": (cfg.vocab_size, H)}
    if P:
        s["embed_tokens_per_layer"] = (cfg.vocab_size_per_layer_input, L * P)
        s["per_layer_model_projection"] = (L * P, H)
        s["per_layer_projection_norm"] = (P,)
    s["norm"] = (H,)
    for i, spec in enumerate(cfg.layers):
        d, nq, nkv, inter = spec.head_dim, cfg.num_attention_heads, spec.num_kv_heads, spec.intermediate_size
        owns_kv = spec.kv_source == i
        p = f"layers.{i}."
        s[p + "self_attn.q_proj"] = (nq * d, H)
        if owns_kv:
            s[p + "self_attn.k_proj"] = (nkv * d, H)
            if not spec.k_eq_v:
                s[p + "self_attn.v_proj"] = (nkv * d, H)
        s[p + "self_attn.o_proj"] = (H, nq * d)
        s[p + "self_attn.q_norm"] = (d,)
        if owns_kv:
            s[p + "self_attn.k_norm"] = (d,)
        s[p + "mlp.gate_proj"] = (inter, H)
        s[p + "mlp.up_proj"] = (inter, H)
        s[p + "mlp.down_proj"] = (H, inter)
        for n in NORMS:
            s[p + n] = (H,)
        if P:
            s[p + "per_layer_input_gate"] = (P, H)
            s[p + "per_layer_projection"] = (H, P)
            s[p + "post_per_layer_input_norm"] = (H,)
        s[p + "layer_scalar"] = (1,)
        if cfg.enable_moe_block:
            E, I = cfg.num_experts, cfg.moe_intermediate_size
            s[p + "router.proj"] = (E, H)
            s[p + "router.scale"] = (H,)
            s[p + "router.per_expert_scale"] = (E,)
            s[p + "experts.gate_up_proj"] = (E, 2 * I, H)
            s[p + "experts.down_proj"] = (E, H, I)
            for n in ("pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"):
                s[p + n] = (H,)
    if cfg.towers is not None and (v := cfg.towers.vision) is not None:
        s |= vision_shapes(v, H)
    if cfg.towers is not None and (a := cfg.towers.audio) is not None:
        s |= audio_shapes(a, H)
    return s


CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")
VISION_LINEARS = tuple(f"self_attn.{n}_proj" for n in "qkvo") + tuple(f"mlp.{n}_proj" for n in ("gate", "up", "down"))


def vision_shapes(v: VisionConfig, text_hidden: int) -> dict[str, tuple[int, ...]]:
    """Path -> shape of the vision tower's and its embedder's weights (`vision_tower.`, `embed_vision.`)."""
    Hv, d, nq, nkv, inter = v.hidden_size, v.head_dim, v.num_attention_heads, v.num_key_value_heads, v.intermediate_size
    s: dict[str, tuple[int, ...]] = {
        "vision_tower.patch_embedder.input_proj": (Hv, 3 * v.patch_size**2),
        "vision_tower.patch_embedder.position_embedding_table": (2, v.position_embedding_size, Hv),
    }
    outs = {"q": nq * d, "k": nkv * d, "v": nkv * d, "o": Hv, "gate": inter, "up": inter, "down": Hv}
    ins = {"q": Hv, "k": Hv, "v": Hv, "o": nq * d, "gate": Hv, "up": Hv, "down": inter}
    for i in range(v.num_hidden_layers):
        p = f"vision_tower.encoder.layers.{i}."
        for lin in VISION_LINEARS:
            n = lin.split(".")[1][: -len("_proj")]
            s[f"{p}{lin}.linear"] = (outs[n], ins[n])
            if v.use_clipped_linears:
                s |= {f"{p}{lin}.{b}": () for b in CLIP_BOUNDS}
        s[p + "self_attn.q_norm"] = s[p + "self_attn.k_norm"] = (d,)
        for n in NORMS:
            s[p + n] = (Hv,)
    if v.standardize:
        s["vision_tower.std_bias"] = s["vision_tower.std_scale"] = (Hv,)
    s["embed_vision.embedding_projection"] = (text_hidden, Hv)
    return s


def audio_shapes(a: AudioConfig, text_hidden: int) -> dict[str, tuple[int, ...]]:
    """Path -> shape of the audio tower's and its embedder's weights (`audio_tower.`, `embed_audio.`)."""
    Ha, (c0, c1), p = a.hidden_size, a.subsampling_conv_channels, "audio_tower.subsample_conv_projection."
    s: dict[str, tuple[int, ...]] = {
        p + "layer0.conv": (c0, 1, 3, 3),
        p + "layer0.norm": (c0,),
        p + "layer1.conv": (c1, c0, 3, 3),
        p + "layer1.norm": (c1,),
        p + "input_proj_linear": (Ha, c1 * (a.mel_bins // 4)),  # mel bins after two stride-2 convolutions
    }

    def clipped(path: str, out: int, inp: int) -> None:
        s[path + ".linear"] = (out, inp)
        if a.use_clipped_linears:
            s.update({f"{path}.{b}": () for b in CLIP_BOUNDS})

    for i in range(a.num_hidden_layers):
        p = f"audio_tower.layers.{i}."
        for f in ("feed_forward1", "feed_forward2"):
            clipped(f"{p}{f}.ffw_layer_1", 4 * Ha, Ha)
            clipped(f"{p}{f}.ffw_layer_2", Ha, 4 * Ha)
            s[f"{p}{f}.pre_layer_norm"] = s[f"{p}{f}.post_layer_norm"] = (Ha,)
        for n in ("q_proj", "k_proj", "v_proj", "post"):
            clipped(f"{p}self_attn.{n}", Ha, Ha)
        s[p + "self_attn.relative_k_proj"] = (Ha, Ha)
        s[p + "self_attn.per_dim_scale"] = (a.head_dim,)
        clipped(p + "lconv1d.linear_start", 2 * Ha, Ha)
        clipped(p + "lconv1d.linear_end", Ha, Ha)
        s[p + "lconv1d.depthwise_conv1d"] = (Ha, 1, a.conv_kernel_size)
        s[p + "lconv1d.pre_layer_norm"] = s[p + "lconv1d.conv_norm"] = (Ha,)
        for n in ("norm_pre_attn", "norm_post_attn", "norm_out"):
            s[p + n] = (Ha,)
    s["audio_tower.output_proj.weight"] = (a.output_proj_dims, Ha)
    s["audio_tower.output_proj.bias"] = (a.output_proj_dims,)
    s["embed_audio.embedding_projection"] = (text_hidden, a.output_proj_dims)
    return s


VISION_TOWER, AUDIO_TOWER = ("vision_tower", "embed_vision"), ("audio_tower", "embed_audio")
TOWERS = VISION_TOWER + AUDIO_TOWER  # Params fields outside the text decoder
KV_WEIGHTS = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.k_norm")


def assistant_shapes(acfg: AssistantConfig) -> dict[str, tuple[int, ...]]:
    """Path -> shape of every weight of an assistant drafter."""
    t = acfg.text
    s = {p: v for p, v in param_shapes(t).items() if not p.endswith(KV_WEIGHTS)}
    s["pre_projection"] = (t.hidden_size, 2 * acfg.backbone_hidden_size)
    s["post_projection"] = (acfg.backbone_hidden_size, t.hidden_size)
    if acfg.use_ordered_embeddings:
        s["centroids"] = (acfg.num_centroids, t.hidden_size)
        s["token_ordering"] = (t.vocab_size,)
    return s


Get = Callable[[str, tuple[int, ...]], Tensor]  # (path, shape) -> the weight


def build_assistant(acfg: AssistantConfig, get: Get) -> Assistant:
    """Builds a drafter's tree by calling `get(path, shape)` for every weight it has."""
    shapes = assistant_shapes(acfg)
    layers = _build_layers(acfg.text, shapes, get)
    top: dict[str, Any] = {n: get(n, s) for n, s in shapes.items() if "." not in n}
    return Assistant(**top, layers=layers)


def build(cfg: Config, get: Get) -> Params:
    """Builds the tree by calling `get(path, shape)` for every weight the config has."""
    shapes = param_shapes(cfg)
    layers = _build_layers(cfg, shapes, get)  # first: random weights are drawn in this order
    names = [n for n in attrs.fields_dict(Params) if n not in ("layers", "lm_head", *TOWERS)]
    top: dict[str, Any] = {n: get(n, shapes[n]) if n in shapes else None for n in names}
    params = Params(**top, layers=layers)
    if cfg.towers is not None and cfg.towers.vision is not None:
        params = attrs.evolve(params, **_build_vision(cfg.towers.vision, shapes, get))
    if cfg.towers is not None and cfg.towers.audio is not None:
        g = _optional(shapes, get)
        tower = _node(AudioTower, "audio_tower", g, cfg.towers.audio.num_hidden_layers)
        params = attrs.evolve(params, audio_tower=tower, embed_audio=_node(Embedder, "embed_audio", g, 0))
    return params


def _node(cls: type[T], path: str, g: Callable[[str], Any], n_layers: int) -> T:
    """A tower's node at `path`, fields by their names: nodes recursively, `layers` `n_layers` of them, the
    rest leaves (`g(path)`)."""
    kids: dict[str, Any] = {}
    for f in attrs.fields(cast(Any, cls)):
        kid = NODE_TYPES.get(f.type.split(" |")[0].removeprefix("tuple[").removesuffix(", ...]"))
        p = f"{path}.{f.name}"
        if f.name == "layers":
            kids[f.name] = tuple(_node(cast(type, kid), f"{p}.{i}", g, 0) for i in range(n_layers))
        else:
            kids[f.name] = g(p) if kid is None else _node(kid, p, g, 0)
    return cls(**kids)


def _optional(shapes: dict[str, tuple[int, ...]], get: Get) -> Callable[[str], Any]:
    """`get` for a path, None where the config has no such weight."""
    return lambda path: get(path, shapes[path]) if path in shapes else None


def _build_vision(v: VisionConfig, shapes: dict[str, tuple[int, ...]], get: Get) -> dict[str, Any]:
    g = _optional(shapes, get)

    def clipped(p: str) -> Clipped:
        return Clipped(g(p + ".linear"), *(g(f"{p}.{b}") for b in CLIP_BOUNDS))

    layers = []
    for i in range(v.num_hidden_layers):
        p = f"vision_tower.encoder.layers.{i}."
        lin = {n: clipped(p + n) for n in VISION_LINEARS}
        attn = VisionAttention(
            **{n.split(".")[1]: lin[n] for n in VISION_LINEARS[:4]},
            q_norm=g(p + "self_attn.q_norm"),
            k_norm=g(p + "self_attn.k_norm"),
        )
        mlp = VisionMlp(**{n.split(".")[1]: lin[n] for n in VISION_LINEARS[4:]})
        layers.append(VisionLayer(attn, mlp, **{n: g(p + n) for n in NORMS}))
    pe = "vision_tower.patch_embedder."
    tower = VisionTower(
        PatchEmbedder(g(pe + "input_proj"), g(pe + "position_embedding_table")),
        Encoder(tuple(layers)),
        g("vision_tower.std_bias"),
        g("vision_tower.std_scale"),
    )
    return {"vision_tower": tower, "embed_vision": Embedder(g("embed_vision.embedding_projection"))}


def _build_layers(cfg: Config, shapes: dict[str, tuple[int, ...]], get: Get) -> tuple[Layer, ...]:
    g = _optional(shapes, get)

    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        nodes = {"self_attn": Attention, "mlp": Mlp, "router": Router, "experts": Experts}
        kids = {k: node(**{n: g(f"{p}{k}.{n}") for n in attrs.fields_dict(node)}) for k, node in nodes.items()}
        if not cfg.enable_moe_block:
            kids["router"] = kids["experts"] = None
        layers.append(Layer(**kids, **{n: g(p + n) for n in attrs.fields_dict(Layer) if n not in nodes}))
    return tuple(layers)


def init_value(path: str, shape: tuple[int, ...], cfg: Config, gen: torch.Generator) -> Tensor:
    """A well-conditioned random fp32 value for one weight (used by tests and random checkpoints).

    Every weight is randomized (the HF reference initializes norms and layer_scalar to ones, which
    would hide bugs exactly where Gemma 4 is unusual): norms near 1 but not 1, layer_scalar not 1,
    q/k norm weights scaled by head_dim**-0.25 so that attention at scale 1.0 is not one-hot, and
    the towers' clip bounds finite (+-1.5..2.5).
    """
    name = path.rsplit(".", 1)[-1]
    if name in CLIP_BOUNDS:  # finite and tight enough to clip the tails of unit-scale activations
        return (1.5 + torch.rand(shape, generator=gen)) * (-1 if name.endswith("min") else 1)
    if name == "position_embedding_table":  # as large as a patch's projection
        return 0.5 * torch.randn(shape, generator=gen)
    if name == "layer_scalar":
        return 0.5 + torch.rand(shape, generator=gen)
    if name in ("q_norm", "k_norm"):
        return (1.0 + 0.1 * torch.randn(shape, generator=gen)) * shape[0] ** -0.25
    if len(shape) == 1:
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name in ("conv", "depthwise_conv1d"):  # [out, in, *kernel]: fan-in is all but the first dim
        return torch.randn(shape, generator=gen).mul_(math.prod(shape[1:]) ** -0.5)
    # scaled in place: a scaled copy of a full-size per-layer table would double its fp32 peak
    if name == "embed_tokens_per_layer":  # looked up per layer in slices of width P
        return torch.randn(shape, generator=gen).mul_(cfg.hidden_size_per_layer_input**-0.5)
    return torch.randn(shape, generator=gen).mul_(shape[-1] ** -0.5)  # [..., out, in]


def init_params(cfg: Config, seed: int = 0, dtype: torch.dtype = torch.float32) -> Params:
    """Deterministic random parameters for `cfg` (same seed, same values on every machine)."""
    gen = torch.Generator().manual_seed(seed)
    return build(cfg, lambda path, shape: init_value(path, shape, cfg, gen).to(dtype))


def init_assistant(acfg: AssistantConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> Assistant:
    """Deterministic random drafter weights; `token_ordering` a random permutation of the vocabulary."""
    gen = torch.Generator().manual_seed(seed)

    def get(path: str, shape: tuple[int, ...]) -> Tensor:
        if path == "token_ordering":
            return torch.randperm(shape[0], generator=gen)
        return init_value(path, shape, acfg.text, gen).to(dtype)

    return build_assistant(acfg, get)
