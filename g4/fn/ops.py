"""Elementwise and small building blocks: RMSNorm, GELU-tanh MLP, softcap."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from g4.params import Mlp


def rms_norm(x: Tensor, w: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim, computed in at least fp32 (`wide`); `w` is used as is (Gemma 4: w, not 1 + w).

    `w=None` is the scale-free norm Gemma 4 applies to V. HF computes `pow(mean + eps, -0.5)`
    (not rsqrt); we do the same so fp32 results are bit-identical.
    """
    xf = _widen(x)
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if w is not None:
        y = y * _widen(w)
    return y if y.dtype == x.dtype else y.type_as(x)


def wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms and softmaxes compute in: fp32, or float64 for float64 (HF: always fp32)."""
    return torch.promote_types(dtype, torch.float32)


def _widen(x: Tensor) -> Tensor:
    # Cast only where it converts: in fp32 the traced graph then carries no no-op casts.
    return x if x.dtype == wide(x.dtype) else x.to(wide(x.dtype))


def gelu(x: Tensor) -> Tensor:
    """GELU with the tanh approximation (HF `gelu_pytorch_tanh`)."""
    return F.gelu(x, approximate="tanh")


def mlp(p: Mlp, x: Tensor) -> Tensor:
    """down(gelu(gate(x)) * up(x)), no biases."""
    return F.linear(gelu(F.linear(x, p.gate_proj)) * F.linear(x, p.up_proj), p.down_proj)


def softcap(x: Tensor, cap: float | None) -> Tensor:
    """Final-logit soft capping: cap * tanh(x / cap), in the input dtype (as HF)."""
    return x if cap is None else torch.tanh(x / cap) * cap
