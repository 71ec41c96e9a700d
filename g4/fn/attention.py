"""Attention: masks from key positions, grouped-query attention at scale 1.0."""

from __future__ import annotations

import torch
from torch import Tensor

from g4.config import LayerSpec
from g4.fn.ops import wide

# Gemma 4 q and k are RMS-normed per head, so the softmax scale is 1.0: no 1/sqrt(head_dim),
# no query_pre_attn_scalar, no attention-logit softcap.
ATTENTION_SCALE = 1.0
EMPTY = -1  # key position of a cache slot that holds nothing yet


def mask(q_pos: Tensor, k_pos: Tensor, window: int | None, blocks: Tensor | None = None) -> Tensor:
    """Bool `[T, S]`: query at q_pos[t] may see key at k_pos[s] (causal; sliding: q - k < window).

    Keys come from slot positions, so a ring that has wrapped, a half-filled cache and a plain
    prefill are all handled the same way. A sliding query sees exactly `window` keys, itself included.
    With `blocks` (`[B, T]`, see `same_block`) a query also sees the later keys of its block:
    `[B, 1, 1, T, S]`.
    """
    q, k = q_pos[:, None], k_pos[None, :]
    m = (k != EMPTY) & (k <= q)
    if blocks is not None:
        m = (m | same_block(q_pos, k_pos, blocks))[:, None, None]
    if window is not None:
        m = m & (q - k < window)
    return m


def same_block(q_pos: Tensor, k_pos: Tensor, blocks: Tensor) -> Tensor:
    """Bool `[B, T, S]`: query t and key s are in the same block of this call (`blocks [B, T]`: a block id per
    query, -1 outside any). Keys from earlier calls belong to no block: an image is fed in one call."""
    T = q_pos.shape[0]
    i = k_pos - q_pos[0]  # the key's index in this call (positions are consecutive)
    mine = (k_pos != EMPTY) & (i >= 0) & (i < T)
    kb = torch.where(mine, blocks[:, i.clamp(0, T - 1)], -1)  # [B, S]
    return (blocks[:, :, None] == kb[:, None, :]) & (blocks[:, :, None] >= 0)


def sdpa(q: Tensor, k: Tensor, v: Tensor, m: Tensor, spec: LayerSpec | None = None) -> Tensor:
    """Eager GQA attention. q `[B, T, nq, d]`, k/v `[B, S, nkv, d]`, m `[T, S]` -> `[B, T, nq, d]`.

    Query heads `[j*g, (j+1)*g)` share kv head j. Scores are in the activation dtype, softmax in
    fp32 (`wide`) then cast back (as the HF eager path).
    """
    B, T, nq, d = q.shape
    nkv = k.shape[2]
    qg = q.transpose(1, 2).reshape(B, nkv, nq // nkv, T, d)
    kt = k.transpose(1, 2)[:, :, None]  # [B, nkv, 1, S, d]
    vt = v.transpose(1, 2)[:, :, None]
    s = (qg @ kt.transpose(-1, -2)) * ATTENTION_SCALE  # [B, nkv, g, T, S]
    s = s.masked_fill(~m, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1, dtype=wide(s.dtype)).to(q.dtype)
    return (p @ vt).reshape(B, nq, T, d).transpose(1, 2)
