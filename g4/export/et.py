"""ExecuTorch's ops as `forward` hooks: in-place cache writes, flash attention, an int8 KV cache.

- `write`: `llama::update_cache_with_indices` (ExecuTorch's custom op) writes a call's T rows in
  place, so a decode step never copies a whole cache;
- `attend`: `llama::custom_sdpa` (tiled flash attention). Full layers attend causally over the first
  `start + T` slots of their cache; sliding layers over `new ++ filled ring slots` with the mask;
- int8: K/V are quantized per token and head (asymmetric, as ExecuTorch's `QuantizedKVCache`) into
  `Q8` values, written with their scales and zero points, and read by `llama::custom_quantized_sdpa`,
  which also quantizes q per token;
- `rotate`: rotate-half as a 2x2 matmul, which XNNPACK takes (it cannot slice a dynamic length) when
  the matrix is a buffer of the module (`Shim.rot`).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.utils import _pytree

from g4.config import LayerSpec
from g4.export.fuse import project_fused
from g4.fn.attention import ATTENTION_SCALE
from g4.fn.cache import KV, Q8, rows
from g4.fn.model import Hooks
from g4.fn.moe import experts_gathered


def load_custom_ops() -> None:
    """Registers ExecuTorch's `llama::` ops and the `quantized_decomposed::` per-token ops (with the
    out variants `to_executorch` needs) with torch."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.kernels import quantized  # noqa: F401


def quantize_per_token(x: Tensor) -> Q8:
    """int8 `x` with fp32 scales and int8 zero points `[..., 1]`: asymmetric, one pair per last-dim row."""
    scale, zp = torch.ops.quantized_decomposed.choose_qparams_per_token_asymmetric.default(x, torch.int8)
    xq = torch.ops.quantized_decomposed.quantize_per_token(x, scale, zp, -128, 127, torch.int8)
    return Q8(xq, scale.to(torch.float32), zp.to(torch.int8))


def rotate_half_matrix(dtype: torch.dtype) -> Tensor:
    """[[0, -1], [1, 0]]. The exporter holds it as a module buffer: built from ops in the forward it
    kept the matmul out of XNNPACK (a weight must be constant), and ExecuTorch 1.5.1 mishandles lifted
    tensor constants inside XNNPACK partitions."""
    return torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=dtype)


def rotate_half_by_matmul(x: Tensor, rot: Tensor) -> Tensor:
    """`rotate_half` as a 2x2 matmul over the pair axis: XNNPACK cannot slice tensors of dynamic length
    (the prefill length). `rot` is `rotate_half_matrix(x.dtype)`; its entries are 0 and +-1, so the
    result is exactly `rotate_half(x)` (slower eagerly: a matmul with K = 2)."""
    pairs = x.unflatten(-1, (2, -1)).transpose(-1, -2)  # [B, T, h, d/2, 2]: (x1[t], x2[t])
    # A 2-D matmul ([N, 2] x [2, 2]); a 5-D one would lower to a batched matmul over a broadcast weight.
    rotated = torch.nn.functional.linear(pairs.reshape(-1, 2), rot).view(pairs.shape)
    return rotated.transpose(-1, -2).flatten(-2)


def _tag(tags: Tensor, slots: Tensor, ends: Tensor) -> Tensor:
    return tags.index_copy_(0, slots, ends)


def _forget(tags: Tensor, start: Tensor) -> Tensor:
    return tags.mul_(tags <= start)


def _update(buf: Tensor, slots: Tensor, new: Tensor) -> None:
    """`buf[:, slots] = new` in place for `[B, S, H, D]` with ExecuTorch's op."""
    idx = slots[None] if buf.shape[0] == 1 else slots[None].expand(buf.shape[0], -1)  # [B, T]
    torch.ops.llama.update_cache_with_indices(new, buf, 0, idx)


def _write(buf: KV, slots: Tensor, new: KV) -> KV:
    _pytree.tree_map(lambda b, n: _update(b, slots, n), buf, new)
    return buf


def inplace_hooks(rot: Tensor) -> Hooks:
    """Eager attention with in-place `index_copy_` cache writes (bf16: ExecuTorch's attention ops are fp32-only)."""
    return Hooks(
        write=lambda buf, slots, new: _pytree.tree_map(lambda b, n: b.index_copy_(1, slots, n), buf, new),
        tag=_tag,
        forget=_forget,
        rotate=functools.partial(rotate_half_by_matmul, rot=rot),
        experts=experts_gathered,
        project=project_fused,
    )


def draft_hooks(position: int, rot: Tensor) -> Hooks:
    """ExecuTorch's attention for a drafter query at `position` (`g4.fn.draft.draft_step`), over the
    target's cache buffers as they are: full layers read the slots before `position` causally (slot =
    position); sliding layers the whole ring, masked by the positions its slots hold."""

    def mask(m: Tensor, spec: LayerSpec) -> Tensor | None:
        return None if spec.window is None else torch.zeros(m.shape).masked_fill(~m, float("-inf"))

    def attend(q: Tensor, k: Tensor, v: Tensor, m: Tensor | None, spec: LayerSpec) -> Tensor:
        q_start = position - 1 if m is None else k.shape[1] - 1  # the kernel reads q_start + 1 keys
        return torch.ops.llama.custom_sdpa(
            q, k, v, q_start, attn_mask=m, drpout_p=0.0, is_causal=m is None, scale=ATTENTION_SCALE
        )

    return Hooks(attend=attend, mask=mask, rotate=functools.partial(rotate_half_by_matmul, rot=rot))


def et_hooks(start: int, T: int, rot: Tensor, int8: bool = False) -> Hooks:
    """ExecuTorch's cache and attention ops for one call of T tokens at `start` (fp32 activations).

    `rot` is `rotate_half_matrix(torch.float32)`, held by the caller as a module buffer.

    Full layers: the cache slot is the position, so causal attention over the first `start + T`
    slots. Sliding layers: k/v are `new (T) ++ ring (R)`; the ring fills slot 0 first, so only its
    first `min(start, R)` slots hold anything, and the kernel reads just `T + min(start, R)` keys.
    """

    def filled(keys: int) -> int:  # ring slots holding something, of a sliding layer's T + R keys
        return torch.sym_min(start, keys - T)

    def mask(m: Tensor, spec: LayerSpec) -> Tensor | None:
        """Sliding layers: the additive mask over the keys the kernel reads; full layers: causal, none."""
        if spec.window is None:
            return None
        if m.dim() > 2:  # [1, 1, 1, T, S] with image blocks (batch 1)
            m = m.reshape(m.shape[-2:])
        add = torch.zeros(m.shape, dtype=torch.float32).masked_fill(~m, float("-inf"))
        return add[:, : T + filled(m.shape[1])]  # narrowed explicitly: ATen and runtime kernels slice differently

    def attend(q: Tensor, k: KV, v: KV, m: Tensor | None, spec: LayerSpec) -> Tensor:
        """custom_sdpa (or custom_quantized_sdpa) at Gemma 4's scale 1.0."""
        if m is None:  # full: queries are the last q.shape[1] of the T new tokens
            q_start = start + T - q.shape[1]
        else:
            q_start = filled((k.data if isinstance(k, Q8) else k).shape[1])
            k, v = rows(k, slice(None, T + q_start)), rows(v, slice(None, T + q_start))
        common = dict(attn_mask=m, drpout_p=0.0, is_causal=m is None, scale=ATTENTION_SCALE)  # sic: the op spells it
        if not isinstance(k, Q8) or not isinstance(v, Q8):
            return torch.ops.llama.custom_sdpa(q, k, v, q_start, **common)
        q8 = quantize_per_token(q)
        return torch.ops.llama.custom_quantized_sdpa(
            q8.data, k.data, v.data, q_start, **common,
            q_zero_points=q8.zp, q_scales=q8.scale,
            k_zero_points=k.zp, k_scales=k.scale, v_zero_points=v.zp, v_scales=v.scale,
        )  # fmt: skip

    return Hooks(
        attend=attend,
        mask=mask,
        store=quantize_per_token if int8 else (lambda x: x),
        write=_write,
        tag=_tag,
        forget=_forget,
        rotate=functools.partial(rotate_half_by_matmul, rot=rot),
        experts=experts_gathered,  # static shapes: the chosen experts' weights gathered
        project=project_fused,  # q/k/v as one GEMM where `g4.export.fuse` stacked them
    )
