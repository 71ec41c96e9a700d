"""Weight quantization, leaf by leaf, with torchao's configs (the ones ExecuTorch's LLM export uses).

Each weight is quantized on its own (wrapped in a throw-away `nn.Linear`/`nn.Embedding` for
`torchao.quantize_`), so a checkpoint can be quantized as it is loaded, one tensor at a time. The
result is a torchao tensor subclass that `F.linear` / `F.embedding` in the pure forward dispatch on;
`torch.export` then emits the dequantize patterns XNNPACK and ExecuTorch's quantized kernels match.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

LINEAR_MODES = ("none", "8da8w", "8da4w")
EMBEDDING_BITS = (0, 8, 4)
EMBEDDING_TABLES = ("embed_tokens", "embed_tokens_per_layer")
INT = {8: torch.int8, 4: getattr(torch, "int4")}  # noqa: B009 (torch.int4 is missing from the stubs)


def quantize_linear(w: Tensor, mode: str, group_size: int) -> Tensor:
    """8-bit dynamic activations with int8 (per output channel) or int4 (per group) weights."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    if mode == "none":
        return w
    gran = PerAxis(0) if mode == "8da8w" else PerGroup(group_size)
    cfg = Int8DynamicActivationIntxWeightConfig(weight_dtype=INT[8 if mode == "8da8w" else 4], weight_granularity=gran)
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
        IntxWeightOnlyConfig(weight_dtype=INT[bits], granularity=gran),
        filter_fn=lambda m, _: isinstance(m, nn.Embedding),
    )
    return emb.weight


def linear_ok(shape: tuple[int, ...], mode: str, group_size: int) -> bool:
    """Whether a `[out, in]` weight can take `mode` (int4 groups must divide the input width)."""
    return mode == "8da8w" or (mode == "8da4w" and shape[1] % group_size == 0)
