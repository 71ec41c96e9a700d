"""Rotary position embeddings: "default" (sliding layers) and "proportional" (full layers)."""

from __future__ import annotations

import torch
from torch import Tensor


def inv_freq(head_dim: int, theta: float, partial_rotary_factor: float = 1.0) -> Tensor:
    """Inverse frequencies `[head_dim // 2]` (fp32).

    Proportional RoPE (Gemma 4 full layers, factor 0.25 of 512 dims): the first
    `int(factor * head_dim // 2)` pairs rotate with exponent denominator = the FULL head_dim;
    the remaining pairs get frequency 0 (cos 1, sin 0: identity). Rotated pairs are
    `(t, t + head_dim/2)`, so it is not "the first 128 contiguous dims". With factor 1.0 this is
    the default RoPE.
    """
    n_rot = int(partial_rotary_factor * head_dim // 2)
    f = 1.0 / (theta ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.int64).float() / head_dim))
    return torch.cat([f, torch.zeros(head_dim // 2 - n_rot)])


def rope_table(positions: Tensor, freqs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin `[T, d]` for absolute `positions [T]`, computed in fp32 then cast to `dtype` (as HF)."""
    angles = positions.float()[:, None] * freqs[None, :]  # [T, d/2]
    emb = torch.cat([angles, angles], dim=-1)  # [T, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on `x [B, T, heads, d]`, in x's dtype (HF rotates in the activation dtype)."""
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, d], broadcast over heads
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
