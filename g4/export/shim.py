"""The thin `nn.Module` around `g4.forward` that `torch.export` traces, with ExecuTorch's cache ops.

No model logic lives here: the module holds the tree's leaves and the cache as buffers, rebuilds the
tree in `forward(tokens, input_pos)` and calls `g4.forward` with two swapped-in hooks:

- `write`: in-place cache writes with `llama::update_cache_with_indices` (ExecuTorch's custom op), so
  a decode step writes T rows and never copies a whole cache;
- `attend`: `llama::custom_sdpa` (tiled flash attention). Full layers attend causally over the first
  `start_pos + T` slots of their cache; sliding layers over `new ++ filled ring slots` with the mask.
"""

from __future__ import annotations

from typing import cast

import attrs
import torch
from torch import Tensor, nn

from g4.config import Config, LayerSpec
from g4.fn.attention import ATTENTION_SCALE, Cache, init_cache, sdpa
from g4.fn.model import Attend, forward
from g4.params import Params, build, leaves_with_path


def _load_custom_ops() -> None:
    """Registers ExecuTorch's `llama::` ops (custom_sdpa, update_cache_with_indices) with torch."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


def et_write(buf: Tensor, slots: Tensor, new: Tensor) -> Tensor:
    """In-place cache write; K/V `[B, S, H, D]` through ExecuTorch's op, slot positions with index_copy_."""
    if buf.dim() == 4:
        idx = slots[None] if buf.shape[0] == 1 else slots[None].expand(buf.shape[0], -1)  # [B, T]
        torch.ops.llama.update_cache_with_indices(new, buf, 0, idx)
        return buf
    return buf.index_copy_(0, slots, new)


def inplace_write(buf: Tensor, slots: Tensor, new: Tensor) -> Tensor:
    """In-place `index_copy_` along the slot dim (for exports without ExecuTorch's custom ops)."""
    return buf.index_copy_(1 if buf.dim() > 1 else 0, slots, new)


def et_attend(start_pos: int, T: int) -> Attend:
    """`attend` for the export: custom_sdpa at Gemma 4's scale 1.0 (fp32 only, as the op).

    Full layers: the cache slot is the position, so causal attention over the first `start + T`
    slots. Sliding layers: k/v are `new (T) ++ ring (R)`; the ring fills slot 0 first, so only its
    first `min(start, R)` slots hold anything, and custom_sdpa reads just `T + min(start, R)` keys.
    """
    float_masks: dict[int, Tensor] = {}  # one additive mask per bool mask (per layer type)

    def attend(q: Tensor, k: Tensor, v: Tensor, m: Tensor, spec: LayerSpec) -> Tensor:
        if spec.window is None:  # queries are the last q.shape[1] of the T new tokens
            q_start = start_pos + T - q.shape[1]
            return torch.ops.llama.custom_sdpa(q, k, v, q_start, None, 0.0, True, ATTENTION_SCALE)
        filled = torch.sym_min(start_pos, k.shape[1] - T)
        if id(m) not in float_masks:
            fm = torch.zeros(m.shape, dtype=torch.float32).masked_fill(~m, float("-inf"))
            float_masks[id(m)] = fm[:, : T + filled]
        n = T + filled  # narrowed explicitly: the op's ATen and runtime kernels slice differently
        return torch.ops.llama.custom_sdpa(
            q, k[:, :n], v[:, :n], filled, float_masks[id(m)], 0.0, False, ATTENTION_SCALE
        )

    return attend


def _name(path: str) -> str:
    return "p_" + path.replace(".", "_")


class Shim(nn.Module):
    """`forward(tokens [1, T], input_pos [1]) -> logits [1, V]` of the last position, cache as buffers."""

    def __init__(self, cfg: Config, params: Params, max_seq_len: int, max_chunk: int, custom_ops: bool = True):
        super().__init__()
        self.cfg = cfg
        self.custom_ops = custom_ops
        self.tied = params.lm_head is None
        for path, t in leaves_with_path(params):
            self.register_buffer(_name(path), t)
        dtype = torch.float32 if custom_ops else params.norm.dtype
        cache = init_cache(cfg, batch=1, max_seq_len=max_seq_len, dtype=dtype, max_chunk=max_chunk)
        for i, (k, v) in enumerate(zip(cache.k, cache.v, strict=True)):
            self.register_buffer(f"k_{i}", k)
            self.register_buffer(f"v_{i}", v)
        self.register_buffer("ring_end", cache.ring_end)
        self.max_seq_len, self.ring_slots = max_seq_len, cache.ring_end.shape[0]
        self.register_buffer("full_end", cache.full_end)
        if custom_ops:
            _load_custom_ops()

    def params(self) -> Params:
        """The parameter tree, rebuilt from the buffers."""
        p = build(self.cfg, lambda path, _: self._buf(_name(path)))
        return p if self.tied else attrs.evolve(p, lm_head=self._buf("p_lm_head"))

    def _buf(self, name: str) -> Tensor:
        t = getattr(self, name)
        assert isinstance(t, Tensor)
        return t

    def cache(self) -> Cache:
        """The cache, as views of the buffers."""
        n = self.cfg.first_shared
        return Cache(
            k=tuple(self._buf(f"k_{i}") for i in range(n)),
            v=tuple(self._buf(f"v_{i}") for i in range(n)),
            ring_end=self._buf("ring_end"),
            full_end=self._buf("full_end"),
        )

    def forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        """Runs T tokens starting at position `input_pos[0]`; updates the cache buffers in place."""
        T = tokens.shape[1]
        start = cast(int, input_pos[0].item())  # a SymInt under torch.export, bounded for the custom ops
        torch._check_is_size(start)
        torch._check(start + T <= self.max_seq_len)
        torch._check(T <= self.ring_slots)
        positions = torch.arange(start, start + T, dtype=torch.int64)
        attend, write = (et_attend(start, T), et_write) if self.custom_ops else (sdpa, inplace_write)
        logits, _ = forward(
            self.params(), self.cfg, tokens, positions, self.cache(), attend=attend, write=write, last_only=True
        )
        return logits[:, -1]
