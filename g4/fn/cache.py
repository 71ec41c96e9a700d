"""The KV cache as a value: its layout, where a call's tokens go (`plan`), and how a layer writes (`put`).

Sliding layers keep a ring of at least `sliding_window` slots (slot = position % slots); full layers
one slot per position up to `max_seq_len`. Each slot is tagged with 1 + the position it holds (0:
empty), so an all-zero cache (which is how ExecuTorch allocates mutable buffers) is an empty one, and
masks come from the tags. K/V rows are plain tensors, or `Q8` (int8 rows with their scales and zero
points) for an int8 cache: the representation travels with the value, so hooks need no side tables.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import Tensor
from torch.utils import _pytree

from g4.config import FULL, SLIDING, Config


@attrs.frozen
class Q8:
    """int8 K/V rows `[B, S, nkv, d]` with an fp32 scale and an int8 zero point per row `[B, S, nkv, 1]`."""

    data: Tensor
    scale: Tensor
    zp: Tensor


KV = Tensor | Q8  # rows of one cache buffer, or this step's new rows, in the cache's representation


@attrs.frozen
class Cache:
    """K/V for the layers that own K/V (`0 .. cfg.first_shared - 1`), layout `[B, slots, nkv, d]`."""

    k: tuple[KV, ...]
    v: tuple[KV, ...]
    ring_end: Tensor  # [R] 1 + position held by each sliding-layer ring slot, 0 if empty
    full_end: Tensor  # [max_seq_len] the same for full-layer slots

    @property
    def max_seq_len(self) -> int:
        """Number of full-attention slots: the longest context this cache can hold."""
        return self.full_end.shape[0]

    @property
    def ring_slots(self) -> int:
        """Slots of the sliding-layer ring."""
        return self.ring_end.shape[0]

    @property
    def batch(self) -> int:
        """Sequences held."""
        k = self.k[0]
        return (k if isinstance(k, Tensor) else k.data).shape[0]


_pytree.register_pytree_node(
    Q8, lambda q: ([q.data, q.scale, q.zp], None), lambda xs, _: Q8(*xs), serialized_type_name="g4.fn.cache.Q8"
)
_pytree.register_pytree_node(
    Cache,
    lambda c: ([c.k, c.v, c.ring_end, c.full_end], None),
    lambda xs, _: Cache(*xs),
    serialized_type_name="g4.fn.cache.Cache",
)


def init_cache(
    cfg: Config,
    batch: int = 1,
    max_seq_len: int = 4096,
    dtype: torch.dtype = torch.float32,
    max_chunk: int = 0,
    int8: bool = False,
) -> Cache:
    """An empty cache for `batch` sequences of up to `max_seq_len` tokens (`int8`: `Q8` rows).

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

    def empty(s: tuple[int, ...]) -> KV:
        if not int8:
            return torch.zeros(s, dtype=dtype)
        row = (*s[:-1], 1)
        return Q8(torch.zeros(s, dtype=torch.int8), torch.zeros(row), torch.zeros(row, dtype=torch.int8))

    return Cache(
        k=tuple(empty(s) for s in shapes),
        v=tuple(empty(s) for s in shapes),
        ring_end=torch.zeros(ring, dtype=torch.int64),
        full_end=torch.zeros(max_seq_len, dtype=torch.int64),
    )


def rows(x: KV, index: Any) -> KV:
    """`x[:, index]` of plain or `Q8` rows."""
    return _pytree.tree_map(lambda t: t[:, index], x)


def write(buf: KV, slots: Tensor, new: KV) -> KV:
    """`buf` with the rows `new` written at `slots` along dim 1; out of place."""
    return _pytree.tree_map(lambda b, n: b.index_copy(1, slots, n), buf, new)


def join(new: KV, ring: KV) -> KV:
    """Sliding-layer keys (or values) to attend over: this step's `[B, T, ...]` ++ the ring's `[B, R, ...]`."""
    return _pytree.tree_map(lambda n, r: torch.cat([n, r], 1), new, ring)


def tag(tags: Tensor, slots: Tensor, ends: Tensor) -> Tensor:
    """`tags` with `ends` (1 + position) at `slots`; out of place."""
    return tags.index_copy(0, slots, ends)


def forget(tags: Tensor, start: Tensor) -> Tensor:
    """`tags` without positions `>= start`; out of place."""
    return tags * (tags <= start)


Tag = Callable[[Tensor, Tensor, Tensor], Tensor]
Forget = Callable[[Tensor, Tensor], Tensor]
Write = Callable[[KV, Tensor, KV], KV]
Join = Callable[[KV, KV], KV]


@attrs.frozen
class Step:
    """Where one call's tokens go: the ring slots of the tokens it keeps, and the tags after the call."""

    positions: Tensor  # [T] of this call
    keep: slice | None  # only the last R of T > R new tokens stay in the ring
    ring_slots: Tensor  # [min(T, R)] ring slot of each kept token
    ring_end: Tensor  # tags after this call
    full_end: Tensor
    key_positions: dict[str, Tensor]  # layer type -> position of each key attended over, -1 if empty


def plan(cache: Cache, positions: Tensor, tag: Tag = tag, forget: Forget = forget) -> Step:
    """The slots of `positions` in `cache`, and the tags once they are written.

    A call at `start` forgets whatever the cache held from `start` on (`forget`): rejected draft tokens,
    a rewound conversation. Their K/V rows stay until overwritten; the tags decide what attention sees.
    """
    R, T = cache.ring_slots, positions.shape[0]
    # Under torch.export T <= R is known from the chunk bound: no slicing (and no shape guard) in the graph.
    keep = slice(T - R, None) if T > R else None
    kept = positions if keep is None else positions[keep]
    ring_slots = kept % R
    start = positions[:1]
    ring_end = forget(cache.ring_end, start)
    full_end = tag(forget(cache.full_end, start), positions, positions + 1)
    key_positions = {SLIDING: torch.cat([positions, ring_end - 1]), FULL: full_end - 1}  # new ++ ring
    return Step(positions, keep, ring_slots, tag(ring_end, ring_slots, kept + 1), full_end, key_positions)


def put(
    cache: Cache, step: Step, i: int, sliding: bool, k: KV, v: KV, write: Write = write, join: Join = join
) -> tuple[tuple[KV, KV], Cache]:
    """Layer `i`'s new K/V written into `cache`; returns the K/V to attend over and the new cache.

    Sliding: attend over new ++ ring, then keep the last R new rows in the ring. Full: write each
    position's row into its slot and attend over all slots.
    """
    if sliding:
        attend = join(k, cache.k[i]), join(v, cache.v[i])
        kept = (k, v) if step.keep is None else (rows(k, step.keep), rows(v, step.keep))
        new = write(cache.k[i], step.ring_slots, kept[0]), write(cache.v[i], step.ring_slots, kept[1])
    else:
        attend = new = write(cache.k[i], step.positions, k), write(cache.v[i], step.positions, v)
    ks, vs = list(cache.k), list(cache.v)
    ks[i], vs[i] = new
    return attend, attrs.evolve(cache, k=tuple(ks), v=tuple(vs))


def commit(cache: Cache, step: Step) -> Cache:
    """`cache` with the tags of `step`: its new tokens now count as held."""
    return attrs.evolve(cache, ring_end=step.ring_end, full_end=step.full_end)


def slot_positions(slots: int, last: int, ring: bool) -> Tensor:
    """Position `[slots]` each slot holds once positions `0..last` were written in order (a ring: slot =
    position % slots), -1 if none: the tags' values, from arithmetic (later, rejected positions aside)."""
    s = torch.arange(slots)
    p = last - (last + slots - s) % slots if ring else s.masked_fill(s > last, -1)  # % of non-negatives: any % agrees
    return p.clamp(min=-1)


def key_positions(cache: Cache, layer_type: str) -> Tensor:
    """Position held by each slot of a layer type's cache buffers `[S]` (-1: empty)."""
    return (cache.ring_end if layer_type == SLIDING else cache.full_end) - 1
