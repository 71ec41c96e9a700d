"""Rotary position embeddings: "default" (sliding layers) and "proportional" (full layers)."""

from __future__ import annotations

from collections.abc import Callable

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
    """cos, sin `[T, 1, d]` (broadcast over heads) for `positions [T]`: fp32, then cast to `dtype` (as HF)."""
    angles = positions.float()[:, None, None] * freqs  # [T, 1, d/2]
    emb = torch.cat([angles, angles], dim=-1)  # [T, 1, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim (HF's rotate_half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, rotate: Callable[[Tensor], Tensor] = rotate_half) -> Tensor:
    """Rotate-half RoPE on `x [B, T, heads, d]`, in x's dtype (HF rotates in the activation dtype)."""
    return x * cos + rotate(x) * sin
