"""The thin `nn.Module` around `g4.forward` that `torch.export` traces, with ExecuTorch's cache ops.

No model logic lives here: the module holds the tree's leaves and the cache as buffers, rebuilds the
tree in `forward(tokens, input_pos)` and calls `g4.forward` with swapped-in hooks (`EtKv`):

- `write`: in-place cache writes with `llama::update_cache_with_indices` (ExecuTorch's custom op), so
  a decode step writes T rows and never copies a whole cache;
- `attend`: `llama::custom_sdpa` (tiled flash attention). Full layers attend causally over the first
  `start_pos + T` slots of their cache; sliding layers over `new ++ filled ring slots` with the mask;
- with an int8 cache, K/V are quantized per token and head (asymmetric, as ExecuTorch's
  `QuantizedKVCache`), written with their scales and zero points, and read by
  `llama::custom_quantized_sdpa`, which also quantizes q per token.
"""

from __future__ import annotations

import functools
from typing import cast

import attrs
import torch
from torch import Tensor, nn

from g4.config import Config, LayerSpec
from g4.fn.attention import ATTENTION_SCALE, Cache, init_cache, join, sdpa
from g4.fn.model import Attend, Join, Write, forward
from g4.fn.rope import rotate_half_by_matmul, rotate_half_matrix
from g4.params import Params, build, leaves_with_path

KV_CACHES = ("fp32", "int8")


def _load_custom_ops() -> None:
    """Registers ExecuTorch's `llama::` ops and the `quantized_decomposed::` per-token ops (with the
    out variants `to_executorch` needs) with torch."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.kernels import quantized  # noqa: F401


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """int8 `x` with fp32 scales and int8 zero points `[..., 1]`: asymmetric, one pair per last-dim row."""
    scale, zp = torch.ops.quantized_decomposed.choose_qparams_per_token_asymmetric.default(x, torch.int8)
    xq = torch.ops.quantized_decomposed.quantize_per_token(x, scale, zp, -128, 127, torch.int8)
    return xq, scale.to(torch.float32), zp.to(torch.int8)


def inplace_write(buf: Tensor, slots: Tensor, new: Tensor) -> Tensor:
    """In-place `index_copy_` along the slot dim (for exports without ExecuTorch's custom ops)."""
    return buf.index_copy_(1 if buf.dim() > 1 else 0, slots, new)


def _update(buf: Tensor, slots: Tensor, new: Tensor) -> None:
    """`buf[:, slots] = new` in place for `[B, S, H, D]` with ExecuTorch's op."""
    idx = slots[None] if buf.shape[0] == 1 else slots[None].expand(buf.shape[0], -1)  # [B, T]
    torch.ops.llama.update_cache_with_indices(new, buf, 0, idx)


class EtKv:
    """`forward`'s write/join/attend hooks on ExecuTorch's cache ops, for one call of T tokens at `start`.

    Full layers: the cache slot is the position, so causal attention over the first `start + T`
    slots. Sliding layers: k/v are `new (T) ++ ring (R)`; the ring fills slot 0 first, so only its
    first `min(start, R)` slots hold anything, and the kernel reads just `T + min(start, R)` keys.

    With `int8`, K/V tensors stay int8 through forward; their scales and zero points travel in a side
    table keyed by the tensor's id (the tensor is kept in the table too, so the id stays unique).
    """

    def __init__(self, start: int, T: int, int8: dict[int, tuple[Tensor, Tensor, Tensor]] | None = None):
        self.start, self.T, self.int8 = start, T, int8
        self.masks: dict[int, tuple[Tensor, Tensor]] = {}  # id(bool mask) -> (mask, additive float mask)
        self.quantized: dict[int, tuple[Tensor, tuple[Tensor, Tensor, Tensor]]] = {}  # id(x) -> (x, int8 x)

    def _q8(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`quantize_per_token(x)`, once per tensor (a sliding layer's new K/V are both joined and written)."""
        if id(x) not in self.quantized:
            self.quantized[id(x)] = x, quantize_per_token(x)
        return self.quantized[id(x)][1]

    def write(self, buf: Tensor, slots: Tensor, new: Tensor) -> Tensor:
        """In-place cache write; K/V through ExecuTorch's op (with scales and zero points if int8)."""
        if buf.dim() != 4:  # slot positions
            return buf.index_copy_(0, slots, new)
        if self.int8 is None:
            _update(buf, slots, new)
            return buf
        for b, n in zip(self.int8[id(buf)], self._q8(new), strict=True):
            _update(b, slots, n)
        return buf

    def join(self, new: Tensor, ring: Tensor) -> Tensor:
        """`new ++ ring`; with int8, the new rows quantized and the scales and zero points joined alike."""
        if self.int8 is None:
            return join(new, ring)
        parts = [join(n, r) for n, r in zip(self._q8(new), self.int8[id(ring)], strict=True)]
        self.int8[id(parts[0])] = cast(tuple[Tensor, Tensor, Tensor], tuple(parts))
        return parts[0]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, m: Tensor, spec: LayerSpec) -> Tensor:
        """custom_sdpa (or custom_quantized_sdpa) at Gemma 4's scale 1.0; fp32 only, as the ops."""
        if spec.window is None:  # queries are the last q.shape[1] of the T new tokens
            q_start, n, fm = self.start + self.T - q.shape[1], k.shape[1], None
        else:
            q_start = filled = torch.sym_min(self.start, k.shape[1] - self.T)
            n = self.T + filled  # narrowed explicitly: the ops' ATen and runtime kernels slice differently
            if id(m) not in self.masks:
                add = torch.zeros(m.shape, dtype=torch.float32).masked_fill(~m, float("-inf"))
                self.masks[id(m)] = m, add[:, :n]
            fm = self.masks[id(m)][1]
        keys = (lambda t: t) if fm is None else (lambda t: t[:, :n])
        if self.int8 is None:
            return torch.ops.llama.custom_sdpa(q, keys(k), keys(v), q_start, fm, 0.0, fm is None, ATTENTION_SCALE)
        qq, qs, qz = quantize_per_token(q)
        kq, ks, kz = (keys(t) for t in self.int8[id(k)])  # kq is k itself
        vq, vs, vz = (keys(t) for t in self.int8[id(v)])
        return torch.ops.llama.custom_quantized_sdpa(
            qq, kq, vq, q_start, fm, 0.0, fm is None, ATTENTION_SCALE, qz, qs, kz, ks, vz, vs
        )


def _name(path: str) -> str:
    return "p_" + path.replace(".", "_")


class Shim(nn.Module):
    """`forward(tokens [1, T], input_pos [1]) -> logits [1, V]` of the last position, cache as buffers.

    `custom_ops=False` (bf16 exports: ExecuTorch's attention ops are fp32-only) uses the eager
    attention and `index_copy_` writes; `kv_cache="int8"` needs the custom ops.
    """

    def __init__(
        self,
        cfg: Config,
        params: Params,
        max_seq_len: int,
        max_chunk: int,
        custom_ops: bool = True,
        kv_cache: str = "fp32",
    ):
        super().__init__()
        if kv_cache not in KV_CACHES or (kv_cache == "int8" and not custom_ops):
            raise ValueError(f"kv_cache must be one of {KV_CACHES} (int8 with fp32 activations), got {kv_cache!r}")
        self.cfg, self.custom_ops, self.int8 = cfg, custom_ops, kv_cache == "int8"
        self.tied = params.lm_head is None
        for path, t in leaves_with_path(params):
            self.register_buffer(_name(path), t)
        dtype = torch.float32 if custom_ops else params.norm.dtype
        cache = init_cache(cfg, batch=1, max_seq_len=max_seq_len, dtype=dtype, max_chunk=max_chunk)
        for i, (k, v) in enumerate(zip(cache.k, cache.v, strict=True)):
            for name, t in ((f"k_{i}", k), (f"v_{i}", v)):
                if self.int8:  # int8 rows, an fp32 scale and an int8 zero point per slot and head
                    self.register_buffer(name, t.to(torch.int8))
                    self.register_buffer(f"{name}_scale", torch.zeros(t.shape[:-1] + (1,)))
                    self.register_buffer(f"{name}_zp", torch.zeros(t.shape[:-1] + (1,), dtype=torch.int8))
                else:
                    self.register_buffer(name, t)
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
        """The cache, as the buffers themselves (int8 data if the cache is int8)."""
        n = self.cfg.first_shared
        return Cache(
            k=tuple(self._buf(f"k_{i}") for i in range(n)),
            v=tuple(self._buf(f"v_{i}") for i in range(n)),
            ring_end=self._buf("ring_end"),
            full_end=self._buf("full_end"),
        )

    def _int8_table(self, cache: Cache) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
        """id(int8 K/V buffer) -> (buffer, scales, zero points), the side table `EtKv` reads."""
        names = [f"{kv}_{i}" for i in range(self.cfg.first_shared) for kv in "kv"]
        return {id(self._buf(n)): (self._buf(n), self._buf(f"{n}_scale"), self._buf(f"{n}_zp")) for n in names}

    def forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        """Runs T tokens starting at position `input_pos[0]`; updates the cache buffers in place."""
        T = tokens.shape[1]
        start = cast(int, input_pos[0].item())  # a SymInt under torch.export, bounded for the custom ops
        torch._check_is_size(start)
        torch._check(start + T <= self.max_seq_len)
        torch._check(T <= self.ring_slots)
        positions = torch.arange(start, start + T, dtype=torch.int64)
        cache = self.cache()
        hooks: tuple[Attend, Write, Join] = (sdpa, inplace_write, join)
        if self.custom_ops:
            et = EtKv(start, T, self._int8_table(cache) if self.int8 else None)
            hooks = (et.attend, et.write, et.join)
        attend, write, join_ = hooks
        params = self.params()
        rot = rotate_half_matrix(params.norm.dtype)  # built once per call, used by every layer
        logits, _ = forward(
            params,
            self.cfg,
            tokens,
            positions,
            cache,
            attend=attend,
            write=write,
            join=join_,
            rotate=functools.partial(rotate_half_by_matmul, rot=rot),
            last_only=True,
        )
        return logits[:, -1]
