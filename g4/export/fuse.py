"""q/k/v as one GEMM at export: fewer, larger XNNPACK calls per decode step.

`fuse` turns each KV-owning layer's `Attention` into a `FusedAttention` (the users' tree stays
HF-shaped; this one is the exporter's own). `project_fused` runs it as one GEMM, then the per-head
norm and RoPE over all `nq + 2 nkv` heads at once (V's heads get weight 1 and the identity rotation:
bit for bit the weightless norm and no RoPE), and splits q, k, v last. The split sits where the
delegate already ends (before the cache writes and attention), because XNNPACK cannot slice a
tensor of dynamic length.
"""

from __future__ import annotations

from typing import Any, cast

import attrs
import torch
from torch import Tensor

from g4.config import Config, LayerSpec
from g4.export.quant import with_data
from g4.fn.model import QKV, Rope, project
from g4.fn.ops import rms_norm
from g4.params import Attention, Params, register_node


@attrs.frozen
class FusedAttention:
    """A KV-owning layer's attention with q, k, v stacked (export only)."""

    qkv_proj: Tensor  # [(nq + 2 nkv) * d, H]: q rows, then k, then v
    qkv_norm: Tensor  # [nq + 2 nkv, d]: q_norm per q head, k_norm per k head, ones for v
    rope_on: Tensor  # [nq + 2 nkv, 1]: 1 for q and k heads, 0 for v
    o_proj: Tensor  # [H, nq*d]


register_node(FusedAttention)


def cat_rows(ws: list[Tensor]) -> Tensor:
    """Weights stacked by output rows; a torchao quantized weight (rows quantized independently:
    per-channel or per-group along the input) by stacking its data tensors."""
    first: Any = ws[0]
    if not hasattr(first, "tensor_data_names"):
        return torch.cat(ws)
    return with_data(first, [torch.cat([getattr(w, n) for w in ws]) for n in first.tensor_data_names])


def fusable(spec: LayerSpec, i: int) -> bool:
    """A layer that owns its KV and has a separate V projection (k_eq_v layers take V from K's rows)."""
    return spec.kv_source == i and not spec.k_eq_v


def fuse_attention(p: Attention, spec: LayerSpec, nq: int) -> FusedAttention:
    """One layer's q/k/v stacked, with the per-head norm weights and RoPE switch that go with them."""
    assert p.k_proj is not None and p.v_proj is not None and p.k_norm is not None
    nkv, d = spec.num_kv_heads, spec.head_dim
    dtype = p.q_norm.dtype
    norm = torch.cat([p.q_norm.expand(nq, d), p.k_norm.expand(nkv, d), torch.ones(nkv, d, dtype=dtype)])
    on = torch.cat([torch.ones(nq + nkv, 1, dtype=dtype), torch.zeros(nkv, 1, dtype=dtype)])
    return FusedAttention(cat_rows([p.q_proj, p.k_proj, p.v_proj]), norm, on, p.o_proj)


def fuse(params: Params, cfg: Config) -> Params:
    """The tree with every fusable layer's attention as a `FusedAttention` (in `Attention`'s place)."""
    nq = cfg.num_attention_heads
    layers = tuple(
        attrs.evolve(p, self_attn=cast(Attention, fuse_attention(p.self_attn, s, nq))) if fusable(s, i) else p
        for i, (p, s) in enumerate(zip(params.layers, cfg.layers, strict=True))
    )
    return attrs.evolve(params, layers=layers)


def project_fused(p: Any, spec: LayerSpec, x: Tensor, rope: Rope, eps: float, kv: bool) -> QKV:
    """`g4.fn.model.project` for a `FusedAttention` (others: the plain one)."""
    if not isinstance(p, FusedAttention):
        return project(p, spec, x, rope, eps, kv)
    cos, sin, rotate = rope  # [T, 1, d]
    y = torch.nn.functional.linear(x, p.qkv_proj).unflatten(-1, (-1, spec.head_dim))  # [B, T, nq + 2 nkv, d]
    y = rms_norm(y, p.qkv_norm, eps)
    y = y * (cos * p.rope_on + (1 - p.rope_on)) + rotate(y) * (sin * p.rope_on)  # V: y * 1 + rot(y) * 0
    nkv = spec.num_kv_heads
    q, k, v = y.split([y.shape[2] - 2 * nkv, nkv, nkv], dim=2)
    return q, (k, v)
