"""Gemma 4's assistant drafter: a few layers that attend to the target's K/V from one position.

One draft step takes the target's (scaled) embedding of the last token ++ a hidden state `[B, 1, 2 Hb]`
(the target's last hidden state in the first step of a round, then the drafter's own projected one),
and returns draft logits and the next hidden state. Every step of a round sits at the same position,
the last token's, and reads the same K/V: the target's last K/V-owning layer of each type.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from g4.config import AssistantConfig, Config
from g4.fn.attention import EMPTY
from g4.fn.cache import Cache, key_positions
from g4.fn.model import EAGER, Hooks, finish_layer, project_q
from g4.fn.ops import rms_norm
from g4.fn.rope import inv_freq, rope_table
from g4.params import Assistant

# HF builds the drafter's sliding mask as a bidirectional window (|q - k| <= W) flipped to look back:
# a sliding layer sees the last W + 1 keys before the drafted position, one more than the target's.
DRAFT_WINDOW_EXTRA = 1

TargetKV = dict[str, tuple[Tensor, Tensor, Tensor]]  # layer type -> k, v `[B, S, nkv, d]`, key positions `[S]`


def draft_ring(cfg: Config, n: int) -> int:
    """Ring slots a target needs for drafting `n` tokens a round: a verify call of 1 + n tokens may be
    rolled back to its first, and the drafter then sees W + 1 keys before its position."""
    return cfg.sliding_window + n + DRAFT_WINDOW_EXTRA


def target_kv(cfg: Config, cache: Cache) -> TargetKV:
    """What a drafter reads of a target's (plain) cache: each type's store layer's K/V and slot positions."""
    return {
        t: (cast(Tensor, cache.k[i]), cast(Tensor, cache.v[i]), key_positions(cache, t))
        for t, i in cfg.kv_stores.items()
    }


def draft_mask(key_pos: Tensor, position: Tensor, window: int | None) -> Tensor:
    """Bool `[1, S]`: the keys a drafter query at `position` `[1]` sees (held, before it; sliding: the last W + 1)."""
    m = (key_pos != EMPTY) & (key_pos < position)
    if window is not None:
        m = m & (key_pos >= position - window - DRAFT_WINDOW_EXTRA)
    return m[None]


def draft_step(
    a: Assistant, acfg: AssistantConfig, x: Tensor, position: Tensor, kv: TargetKV, hooks: Hooks = EAGER
) -> tuple[Tensor, Tensor]:
    """Draft logits `[B, 1, V]` (no softcap, as HF's assistant) and the next hidden state `[B, 1, Hb]`.

    `position` `[1]` int64: the drafted token's; `hooks`: attention, mask and rotate-half (ExecuTorch's
    in the .pte's `draft` method, `g4.export.et.draft_hooks`).
    """
    cfg, eps = acfg.text, acfg.text.rms_norm_eps
    h = F.linear(x, a.pre_projection)  # [B, 1, h]
    ropes, masks = {}, {}
    for s in {s.type: s for s in cfg.layers}.values():  # per layer type: RoPE at `position`, the mask
        cos_sin = rope_table(position, inv_freq(s.head_dim, s.rope_theta, s.partial_rotary_factor), h.dtype)
        ropes[s.type] = (*cos_sin, hooks.rotate)
        masks[s.type] = hooks.mask(draft_mask(kv[s.type][2], position, s.window), s)  # window: None if full
    for p, spec in zip(a.layers, cfg.layers, strict=True):
        k, v, _ = kv[spec.type]
        q = project_q(p.self_attn, spec, rms_norm(h, p.input_layernorm, eps), ropes[spec.type], eps)
        h = finish_layer(p, cfg, h, hooks.attend(q, k, v, masks[spec.type], spec), None)
    h = rms_norm(h, a.norm, eps)
    return draft_logits(a, acfg, h), F.linear(h, a.post_projection)


def draft_logits(a: Assistant, acfg: AssistantConfig, h: Tensor) -> Tensor:
    """Logits `[B, T, V]` of the tied head; ordered embeddings score only the top centroids' tokens."""
    if not acfg.use_ordered_embeddings:
        return F.linear(h, a.embed_tokens)
    assert a.centroids is not None and a.token_ordering is not None
    B, T, _ = h.shape
    top = torch.topk(F.linear(h, a.centroids), acfg.centroid_intermediate_top_k, dim=-1).indices  # [B, T, k]
    ids = a.token_ordering.view(acfg.num_centroids, -1)[top].reshape(B, T, -1)  # [B, T, k * V/C]
    rows = F.embedding(ids, a.embed_tokens)  # [B, T, k * V/C, h]: ExecuTorch runs this far faster than index (README)
    scores = (h.unsqueeze(-2) @ rows.transpose(-1, -2)).squeeze(-2)  # [B, T, k * V/C]
    floor = scores.min() - 1.0  # every other token: below the lowest score computed, as HF
    return floor.expand(B, T, acfg.text.vocab_size).scatter(-1, ids, scores)
