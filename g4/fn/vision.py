"""Gemma 4's vision tower (`Gemma4VisionModel` + `Gemma4MultimodalEmbedder`) as pure functions.

Patches in, soft tokens in the text model's width out: patch embedding plus x/y position tables,
a bidirectional encoder with axial 2-D RoPE, k x k average pooling by patch position, optional
standardisation, then a weightless RMSNorm and a projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from g4.config import VisionConfig
from g4.fn.attention import sdpa
from g4.fn.ops import gelu, rms_norm
from g4.fn.rope import apply_rope
from g4.params import Clipped, Embedder, VisionLayer, VisionTower

PIXEL_SCALE = 2.0  # pixels in [0, 1] -> [-1, 1] in the model (the processor does not normalise)
PADDING = -1  # (x, y) of a padding patch


def clipped(p: Clipped, x: Tensor) -> Tensor:
    """`Gemma4ClippableLinear`: clamp the input to its bounds, project, clamp the output (bounds if stored)."""
    if p.input_min is not None:
        x = torch.clamp(x, p.input_min, p.input_max)
    y = F.linear(x, p.linear)
    return y if p.output_min is None else torch.clamp(y, p.output_min, p.output_max)


def axial_rope(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin `[B, N, 1, d]` for patch positions `[B, N, 2]`: the first d/2 dims rotate with x, the rest with y.

    Each half is an ordinary rotate-half RoPE of d/2 dims (d/4 frequencies with denominator d/2), so
    `apply_rope` on a half at a time is HF's `apply_multidimensional_rope`.
    """
    half = head_dim // 2
    inv = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))  # [d/4]
    f = positions[..., None].float() * inv  # [B, N, 2, d/4]
    f = torch.cat([f[:, :, 0], f[:, :, 0], f[:, :, 1], f[:, :, 1]], -1)[:, :, None]  # [B, N, 1, d]: x x y y
    return f.cos().to(dtype), f.sin().to(dtype)


def rope_2d(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Axial RoPE on `x [B, N, heads, d]`: each half rotated on its own."""
    h = x.shape[-1] // 2
    halves = [apply_rope(x[..., s], cos[..., s], sin[..., s]) for s in (slice(0, h), slice(h, None))]
    return torch.cat(halves, -1)


def encoder_layer(p: VisionLayer, vc: VisionConfig, h: Tensor, rope: tuple[Tensor, Tensor], keys: Tensor) -> Tensor:
    """One bidirectional layer over `h [B, N, Hv]`; `keys [B, 1, 1, 1, N]` marks the patches attended to."""
    eps, d, a = vc.rms_norm_eps, vc.head_dim, p.self_attn
    x = rms_norm(h, p.input_layernorm, eps)
    q = rope_2d(rms_norm(clipped(a.q_proj, x).unflatten(-1, (-1, d)), a.q_norm, eps), *rope)
    k = rope_2d(rms_norm(clipped(a.k_proj, x).unflatten(-1, (-1, d)), a.k_norm, eps), *rope)
    v = rms_norm(clipped(a.v_proj, x).unflatten(-1, (-1, d)), None, eps)
    o = clipped(a.o_proj, sdpa(q, k, v, keys).flatten(-2))
    h = h + rms_norm(o, p.post_attention_layernorm, eps)
    x = rms_norm(h, p.pre_feedforward_layernorm, eps)
    m = p.mlp
    x = clipped(m.down_proj, gelu(clipped(m.gate_proj, x)) * clipped(m.up_proj, x))
    return h + rms_norm(x, p.post_feedforward_layernorm, eps)


def pool(h: Tensor, positions: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Average each k x k block of patches by position: `[B, N, Hv]` -> `[B, N/k^2, Hv]` and which outputs
    hold a patch `[B, N/k^2]`. Padding patches count at (0, 0) with zero states (as HF)."""
    N = h.shape[1]
    pos = positions.clamp(min=0)
    width = pos[..., 0].max(-1, keepdim=True).values + 1  # patches per row, per image
    block = torch.div(pos, k, rounding_mode="floor")
    idx = block[..., 0] + torch.div(width, k, rounding_mode="floor") * block[..., 1]  # raster order of the blocks
    w = (idx[..., None] == torch.arange(N // (k * k))).float() / (k * k)  # [B, N, L]: HF's one_hot / k^2
    return (w.transpose(1, 2) @ h.float()).to(h.dtype), (w != 0).any(1)


def encode_images(t: VisionTower, vc: VisionConfig, pixel_values: Tensor, positions: Tensor) -> Tensor:
    """Soft tokens `[n, Hv]` of every image, in order, padding dropped (`encode`'s real rows)."""
    out, real = encode(t, vc, pixel_values, positions)
    return out[real]


def encode(t: VisionTower, vc: VisionConfig, pixel_values: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Soft tokens `[B, N/k^2, Hv]` and which are real `[B, N/k^2]` (the rest: blocks of padding only).

    pixel_values `[B, N, 3 * patch**2]` in [0, 1] (HF's processor output), positions `[B, N, 2]` (x, y),
    (-1, -1) for padding patches.
    """
    k = vc.pooling_kernel_size
    pad = (positions == PADDING).all(-1)  # [B, N]
    x = F.linear(
        (PIXEL_SCALE * (pixel_values - 0.5)).to(t.patch_embedder.input_proj.dtype), t.patch_embedder.input_proj
    )
    table, xy = t.patch_embedder.position_embedding_table, positions.clamp(min=0)
    pe = F.embedding(xy[..., 0], table[0]) + F.embedding(xy[..., 1], table[1])
    h = x + torch.where(pad[..., None], 0.0, pe)
    rope = axial_rope(positions, vc.head_dim, vc.rope_theta, h.dtype)
    keys = ~pad[:, None, None, None, :]  # bidirectional: every patch sees every real patch
    for p in t.encoder.layers:
        h = encoder_layer(p, vc, h, rope, keys)
    h, real = pool(h.masked_fill(pad[..., None], 0.0), positions, k)
    out = h.float() * vc.hidden_size**0.5  # fp32: the scale can leave fp16's range
    if t.std_bias is not None and t.std_scale is not None:
        out = (out - t.std_bias.float()) * t.std_scale.float()
    return out.to(x.dtype), real


def embed_soft(e: Embedder, x: Tensor, eps: float) -> Tensor:
    """Soft tokens into the text model's width: weightless RMSNorm, then the projection."""
    return F.linear(rms_norm(x, None, eps), e.embedding_projection)
