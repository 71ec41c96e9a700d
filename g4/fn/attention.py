"""Attention: masks from slot positions, grouped-query attention at scale 1.0, the KV cache."""

from __future__ import annotations

import attrs
import torch
from torch import Tensor
from torch.utils import _pytree

from g4.config import Config, LayerSpec

# Gemma 4 q and k are RMS-normed per head, so the softmax scale is 1.0: no 1/sqrt(head_dim),
# no query_pre_attn_scalar, no attention-logit softcap.
ATTENTION_SCALE = 1.0
EMPTY = -1  # key position of a cache slot that holds nothing yet


def mask(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """Bool `[T, S]`: query at q_pos[t] may see key at k_pos[s] (causal; sliding: q - k < window).

    Keys come from slot positions, so a ring that has wrapped, a half-filled cache and a plain
    prefill are all handled the same way. A sliding query sees exactly `window` keys, itself included.
    """
    q, k = q_pos[:, None], k_pos[None, :]
    m = (k != EMPTY) & (k <= q)
    if window is not None:
        m = m & (q - k < window)
    return m


def sdpa(q: Tensor, k: Tensor, v: Tensor, m: Tensor, spec: LayerSpec | None = None) -> Tensor:
    """Eager GQA attention. q `[B, T, nq, d]`, k/v `[B, S, nkv, d]`, m `[T, S]` -> `[B, T, nq, d]`.

    Query heads `[j*g, (j+1)*g)` share kv head j. Scores are in the activation dtype, softmax in
    fp32 then cast back (as the HF eager path).
    """
    B, T, nq, d = q.shape
    nkv = k.shape[2]
    qg = q.transpose(1, 2).reshape(B, nkv, nq // nkv, T, d)
    kt = k.transpose(1, 2)[:, :, None]  # [B, nkv, 1, S, d]
    vt = v.transpose(1, 2)[:, :, None]
    s = (qg @ kt.transpose(-1, -2)) * ATTENTION_SCALE  # [B, nkv, g, T, S]
    s = s.masked_fill(~m, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return (p @ vt).reshape(B, nq, T, d).transpose(1, 2)


@attrs.frozen
class Cache:
    """KV cache for the layers that own K/V (`0 .. cfg.first_shared - 1`); KV-shared layers own none.

    Sliding layers keep a ring of at least `sliding_window` slots (slot = position % slots), full
    layers one slot per position up to `max_seq_len`. Layout `[B, slots, nkv, d]`.
    """

    k: tuple[Tensor, ...]
    v: tuple[Tensor, ...]
    # 1 + position of the token held by each slot, 0 if empty: an all-zero cache (which is how
    # ExecuTorch allocates mutable buffers) is an empty one.
    ring_end: Tensor  # [R] sliding-layer ring slots
    full_end: Tensor  # [max_seq_len] full-layer slots

    @property
    def max_seq_len(self) -> int:
        """Number of full-attention slots: the longest context this cache can hold."""
        return self.full_end.shape[0]


_pytree.register_pytree_node(
    Cache,
    lambda c: ([c.k, c.v, c.ring_end, c.full_end], None),
    lambda xs, _: Cache(*xs),
    serialized_type_name="g4.fn.attention.Cache",
)


def init_cache(
    cfg: Config, batch: int = 1, max_seq_len: int = 4096, dtype: torch.dtype = torch.float32, max_chunk: int = 0
) -> Cache:
    """An empty cache for `batch` sequences of up to `max_seq_len` tokens.

    The sliding ring has `max(sliding_window, max_chunk)` slots (capped at max_seq_len): a prefill
    chunk of up to `max_chunk` tokens is then written whole, with distinct slots.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    ring = min(max(cfg.sliding_window, max_chunk), max_seq_len)
    shapes = [
        (batch, ring if s.is_sliding else max_seq_len, s.num_kv_heads, s.head_dim)
        for s in cfg.layers[: cfg.first_shared]
    ]
    return Cache(
        k=tuple(torch.zeros(s, dtype=dtype) for s in shapes),
        v=tuple(torch.zeros(s, dtype=dtype) for s in shapes),
        ring_end=torch.zeros(ring, dtype=torch.int64),
        full_end=torch.zeros(max_seq_len, dtype=torch.int64),
    )


def write(buf: Tensor, slots: Tensor, new: Tensor) -> Tensor:
    """`buf` with `new` written at `slots` along dim 1 (dim 0 for position vectors); out of place."""
    return buf.index_copy(1 if buf.dim() > 1 else 0, slots, new)


def join(new: Tensor, ring: Tensor) -> Tensor:
    """Sliding-layer keys (or values) to attend over: this step's `[B, T, ...]` ++ the ring's `[B, R, ...]`."""
    return torch.cat([new, ring], 1)
