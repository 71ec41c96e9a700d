"""Gemma 4's mixture of experts (26B-A4B): a router picks `top_k_experts` experts per token."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from g4.config import Config
from g4.fn.ops import gelu, rms_norm, wide
from g4.params import Experts, Layer, Router


def route(r: Router, x: Tensor, cfg: Config) -> tuple[Tensor, Tensor]:
    """Expert weights (fp32) and ids `[N, K]`: weightless RMSNorm, `scale`, H**-0.5, fp32 softmax, top-k,
    renormalised to sum 1, then `per_expert_scale`."""
    u = rms_norm(x, None, cfg.rms_norm_eps) * r.scale * cfg.hidden_size**-0.5
    probs = torch.softmax(F.linear(u, r.proj), dim=-1, dtype=wide(u.dtype))
    w, ids = torch.topk(probs, cfg.top_k_experts, dim=-1)
    return w / w.sum(-1, keepdim=True) * r.per_expert_scale[ids], ids


Run = Callable[[Experts, Tensor, Tensor, Tensor], Tensor]  # (experts, x [N, H], weights, ids [N, K]) -> [N, H]


def experts_loop(e: Experts, x: Tensor, w: Tensor, ids: Tensor) -> Tensor:
    """Each expert that was chosen, on its tokens, as transformers' eager loop runs them: `[N, H]`.

    No weights are copied (eager decode reads only the chosen experts), but the shapes depend on
    the routing, so a static graph takes `experts_gathered` instead.
    """
    out = torch.zeros_like(x)
    for ex in ids.unique().tolist():  # in increasing expert id
        k, tok = torch.where(ids.T == ex)  # by top-k slot, then token: transformers' order
        gate, up = F.linear(x[tok], e.gate_up_proj[ex]).chunk(2, -1)
        y = F.linear(gelu(gate) * up, e.down_proj[ex]) * w[tok, k, None]
        out = out.index_add(0, tok, y.to(out.dtype))
    return out


def experts_gathered(e: Experts, x: Tensor, w: Tensor, ids: Tensor) -> Tensor:
    """Each token `[N, H]` through its K experts, whose weights are gathered: `[N, H]`; no data-dependent shape.

    Contributions are rounded to x's dtype one by one and added in increasing expert id, as
    transformers' `index_add_` loop does (in bf16 the order changes the sum once K > 2). The ids are
    put in order with `topk` (ExecuTorch has no `sort` kernel).
    """
    order = torch.topk(-ids.float(), ids.shape[-1], dim=-1).indices  # ascending ids
    ids, w = ids.gather(-1, order), w.gather(-1, order)
    gate, up = (e.gate_up_proj[ids] @ x[:, None, :, None]).squeeze(-1).chunk(2, -1)  # [N, K, I] each
    y = (e.down_proj[ids] @ (gelu(gate) * up).unsqueeze(-1)).squeeze(-1)  # [N, K, H]
    contrib = (y * w.unsqueeze(-1)).to(x.dtype)
    out = contrib[:, 0]
    for k in range(1, contrib.shape[1]):
        out = out + contrib[:, k]
    return out


def moe(p: Layer, cfg: Config, h: Tensor, run: Run = experts_loop) -> Tensor:
    """The expert branch of a layer, on the residual stream `h` `[B, T, H]` (not the MLP's normed input)."""
    assert p.router is not None and p.experts is not None
    x = h.reshape(-1, h.shape[-1])
    w, ids = route(p.router, x, cfg)
    y = run(p.experts, rms_norm(x, p.pre_feedforward_layernorm_2, cfg.rms_norm_eps), w, ids)
    return rms_norm(y.view(h.shape), p.post_feedforward_layernorm_2, cfg.rms_norm_eps)
