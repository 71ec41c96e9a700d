"""Weight quantization, leaf by leaf, with torchao's configs (the ones ExecuTorch's LLM export uses).

Each weight is quantized on its own (wrapped in a throw-away `nn.Linear`/`nn.Embedding` for
`torchao.quantize_`), so a checkpoint can be quantized as it is loaded, one tensor at a time. The
result is a torchao tensor subclass that `F.linear` / `F.embedding` in the pure forward dispatch on;
`torch.export` then emits the dequantize patterns XNNPACK and ExecuTorch's quantized kernels match.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from g4.checkpoint import release_pages

LINEAR_MODES = ("none", "8da8w", "8da4w")
EMBEDDING_BITS = (0, 8, 4)
EMBEDDING_TABLES = ("embed_tokens", "embed_tokens_per_layer")
# Linear weights kept in float: routing is discontinuous (a rounding difference sends a token to
# another expert) and the router is small.
FLOAT_LINEARS = ("router.proj",)
INT = {8: torch.int8, 4: getattr(torch, "int4")}  # noqa: B009 (torch.int4 is missing from the stubs)


def scale_algorithm(bits: int) -> str:
    """How torchao picks scales: HQQ's optimizer (scale only, zero point fixed) for 4 bits, min/max for 8.

    HQQ is ExecuTorch's own LLM export choice and lowers int4 error at no runtime cost; at 8 bits it
    gains little and costs much more time on Gemma 4's per-layer embedding table (README, Export).
    """
    return "hqq_scale_only" if bits == 4 else "affine"


CHUNK_ELEMENTS = 1 << 24  # rows are quantized in blocks of at most this many values


def chunked(quantize: Callable[[Tensor], Tensor], w: Tensor, dtype: torch.dtype) -> Tensor:
    """Quantizes `w` (any float dtype, e.g. a memory-mapped bf16 table) in blocks of rows, converting
    each block to `dtype` first, and joins the blocks into one quantized tensor.

    Peak memory is the result plus one block (for tensors `load_checkpoint` maps, the pages of rows
    already quantized are released too); it also keeps torchao's kernels away from tensors of
    more than 2**31 elements (Gemma 4's per-layer embedding tables have more).
    """
    rows = max(1, CHUNK_ELEMENTS // w.shape[1])
    if w.shape[0] <= rows:
        return quantize(w.to(dtype))
    first: Any = None  # a torchao tensor subclass: qdata, scale, zero_point (rows first) + attributes
    out: list[Tensor] = []
    for i in range(0, w.shape[0], rows):
        part = quantize(w[i : i + rows].to(dtype))
        release_pages(w, i, i + rows)  # a memory-mapped checkpoint tensor: drop the rows just read
        if first is None:  # filled in place: joining blocks with torch.cat would need twice the result
            first = part
            out = [
                torch.empty((w.shape[0], *getattr(part, n).shape[1:]), dtype=getattr(part, n).dtype)
                for n in first.tensor_data_names
            ]
        for o, n in zip(out, first.tensor_data_names, strict=True):
            o[i : i + rows] = getattr(part, n)
    return with_data(first, out)


def with_data(like: Any, data: list[Tensor]) -> Tensor:
    """A torchao quantized tensor of `like`'s class and attributes holding `data` (its `tensor_data_names`)."""
    return type(like)(*data, *(getattr(like, n) for n in like.tensor_attribute_names))


def row_blocks(w: Tensor, rows: int) -> tuple[Tensor, ...]:
    """`w` (plain or torchao-quantized, rows first in every data tensor) as blocks of at most `rows` rows."""
    names = getattr(w, "tensor_data_names", None)
    cut = range(0, w.shape[0], rows)
    if names is None:
        return tuple(w[i : i + rows].clone() for i in cut)
    return tuple(with_data(w, [getattr(w, n)[i : i + rows].clone() for n in names]) for i in cut)


def quantize_linear(w: Tensor, mode: str, group_size: int) -> Tensor:
    """8-bit dynamic activations with int8 (per output channel) or int4 (per group) weights."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    if mode == "none":
        return w
    bits = 8 if mode == "8da8w" else 4
    gran = PerAxis(0) if bits == 8 else PerGroup(group_size)
    cfg = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=INT[bits], weight_granularity=gran, intx_choose_qparams_algorithm=scale_algorithm(bits)
    )
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    quantize_(lin, cfg)
    return lin.weight


def quantize_embedding(w: Tensor, bits: int, group_size: int) -> Tensor:
    """Weight-only int8 (per row) or int4 (per group of columns) embedding table."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    if not bits:
        return w
    gran = PerAxis(0) if bits == 8 else PerGroup(group_size)
    emb = nn.Embedding(w.shape[0], w.shape[1], device="meta")
    emb.weight = nn.Parameter(w, requires_grad=False)
    quantize_(
        emb,
        IntxWeightOnlyConfig(
            weight_dtype=INT[bits], granularity=gran, intx_choose_qparams_algorithm=scale_algorithm(bits)
        ),
        filter_fn=lambda m, _: isinstance(m, nn.Embedding),
    )
    return emb.weight
