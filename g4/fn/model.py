"""The whole Gemma 4 text forward: embeddings, per-layer embeddings, decoder layers, tied head."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from g4.config import FULL, SLIDING, Config, LayerSpec
from g4.fn.attention import Cache, join, mask, sdpa, write
from g4.fn.ops import gelu, mlp, rms_norm, softcap
from g4.fn.rope import apply_rope, inv_freq, rope_table, rotate_half
from g4.params import Attention, Layer, Params

PLE_COMBINE_SCALE = 2**-0.5  # (context projection + token table) / sqrt(2)

Attend = Callable[[Tensor, Tensor, Tensor, Tensor, LayerSpec], Tensor]
Write = Callable[[Tensor, Tensor, Tensor], Tensor]
Join = Callable[[Tensor, Tensor], Tensor]


def embed(table: Tensor, tokens: Tensor, scale: float) -> Tensor:
    """Scaled embedding lookup. HF rounds the scale to the table dtype first (bf16: sqrt(1536) -> 39.25)."""
    return F.embedding(tokens, table) * float(torch.tensor(scale).to(table.dtype))


def per_layer_inputs(p: Params, cfg: Config, tokens: Tensor, h0: Tensor) -> Tensor | None:
    """PLE `[B, T, L, P]`: (norm(proj(h0) / sqrt(H)) + table[tokens] * sqrt(P)) / sqrt(2); None without PLE."""
    P, L = cfg.hidden_size_per_layer_input, cfg.num_hidden_layers
    if not P:
        return None
    assert p.embed_tokens_per_layer is not None and p.per_layer_model_projection is not None
    B, T = tokens.shape
    tok = embed(p.embed_tokens_per_layer, tokens, P**0.5).view(B, T, L, P)  # layer-major columns
    proj = F.linear(h0, p.per_layer_model_projection) * cfg.hidden_size**-0.5  # input is the SCALED h0
    proj = rms_norm(proj.view(B, T, L, P), p.per_layer_projection_norm, cfg.rms_norm_eps)
    return (proj + tok) * PLE_COMBINE_SCALE


Rotate = Callable[[Tensor], Tensor]
Rope = tuple[Tensor, Tensor, Rotate]  # cos, sin, rotate_half


def project_q(p: Attention, spec: LayerSpec, x: Tensor, rope: Rope, eps: float) -> Tensor:
    """Queries `[B, T, nq, d]`: per-head q_norm, then RoPE."""
    q = F.linear(x, p.q_proj).unflatten(-1, (-1, spec.head_dim))
    return apply_rope(rms_norm(q, p.q_norm, eps), *rope)


def project_kv(p: Attention, spec: LayerSpec, x: Tensor, rope: Rope, eps: float) -> tuple[Tensor, Tensor]:
    """Keys and values `[B, T, nkv, d]`: k_norm before RoPE; V gets a weightless RMSNorm."""
    assert p.k_proj is not None and p.v_proj is not None, "KV-shared layers have no k/v projections"
    k = F.linear(x, p.k_proj).unflatten(-1, (-1, spec.head_dim))
    v = F.linear(x, p.v_proj).unflatten(-1, (-1, spec.head_dim))
    return apply_rope(rms_norm(k, p.k_norm, eps), *rope), rms_norm(v, None, eps)


def finish_layer(p: Layer, cfg: Config, h: Tensor, attn: Tensor, ple: Tensor | None) -> Tensor:
    """Everything after attention: o_proj, both residual blocks, the PLE branch, layer_scalar."""
    eps = cfg.rms_norm_eps
    h = h + rms_norm(F.linear(attn.flatten(-2), p.self_attn.o_proj), p.post_attention_layernorm, eps)
    h = h + rms_norm(mlp(p.mlp, rms_norm(h, p.pre_feedforward_layernorm, eps)), p.post_feedforward_layernorm, eps)
    if ple is not None:  # per-layer input branch, AFTER the MLP residual
        assert p.per_layer_input_gate is not None and p.per_layer_projection is not None
        z = gelu(F.linear(h, p.per_layer_input_gate)) * ple
        h = h + rms_norm(F.linear(z, p.per_layer_projection), p.post_per_layer_input_norm, eps)
    return h * p.layer_scalar  # scales the whole residual stream, not just a branch


def check_inputs(cfg: Config, tokens: Tensor, positions: Tensor, cache: Cache | None) -> None:
    """Raises ValueError naming the argument at fault."""
    if not isinstance(tokens, Tensor) or tokens.dtype != torch.int64 or tokens.dim() != 2:
        got = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be an int64 tensor [B, T], got {got}")
    T = tokens.shape[1]
    if not isinstance(positions, Tensor) or positions.dtype != torch.int64 or positions.shape != (T,):
        got = f"{positions.dtype} {tuple(positions.shape)}" if isinstance(positions, Tensor) else positions
        raise ValueError(f"positions must be an int64 tensor [T] with T={T} (tokens.shape[1]), got {got}")
    if cache is not None:
        if T > cache.max_seq_len:
            raise ValueError(
                f"tokens: prefill of {T} tokens is longer than the cache (max_seq_len={cache.max_seq_len})"
            )
        if cache.k[0].shape[0] != tokens.shape[0]:
            raise ValueError(f"cache: batch {cache.k[0].shape[0]} does not match tokens batch {tokens.shape[0]}")
    if not torch.compiler.is_compiling() and T:  # data-dependent checks, eager only
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"tokens: ids must be in [0, {cfg.vocab_size}), got [{lo}, {hi}]")
        if int(positions.min()) < 0:
            raise ValueError("positions must be >= 0")
        if cache is not None and int(positions.max()) >= cache.max_seq_len:
            raise ValueError(
                f"positions: {int(positions.max())} does not fit a cache of max_seq_len={cache.max_seq_len}"
            )


def forward(
    params: Params,
    cfg: Config,
    tokens: Tensor,
    positions: Tensor,
    cache: Cache | None = None,
    *,
    attend: Attend = sdpa,
    write: Write = write,
    join: Join = join,
    rotate: Rotate = rotate_half,
    last_only: bool = False,
) -> tuple[Tensor, Cache | None]:
    """Logits `[B, T, V]` (`[B, 1, V]` with last_only) and the updated cache.

    tokens `[B, T]` int64, positions `[T]` int64 absolute positions shared by the batch. Without a
    cache this is a plain causal forward; with one, prefill of any length and one-token decode are
    the same call. `attend(q, k, v, mask, spec)`, `write(buf, slots, new)`, `join(new, ring)` and
    `rotate(x)` can be swapped (the exporter passes ExecuTorch's fused, in-place and int8-cache
    versions, and a rotate-half that XNNPACK can take).
    """
    check_inputs(cfg, tokens, positions, cache)
    dt = params.embed_tokens.dtype
    T = tokens.shape[1]
    h = embed(params.embed_tokens, tokens, cfg.hidden_size**0.5)
    ple = per_layer_inputs(params, cfg, tokens, h)

    # Once per layer type: RoPE tables, key positions, masks.
    first = {t: cfg.layers[cfg.layer_types.index(t)] for t in set(cfg.layer_types)}
    rope = {
        t: (*rope_table(positions, inv_freq(s.head_dim, s.rope_theta, s.partial_rotary_factor), dt), rotate)
        for t, s in first.items()
    }
    new_cache = cache
    if cache is None:
        k_pos = {SLIDING: positions, FULL: positions}
    else:
        R = cache.ring_end.shape[0]  # ring slots (>= sliding_window); slot = position % R
        # Only the last R new tokens can stay in the ring. Under torch.export T <= R is known from
        # the chunk bound, so no slicing (and no shape guard) enters the graph.
        keep = slice(T - R, None) if T > R else None
        kept = positions if keep is None else positions[keep]
        ring_slots = kept % R
        full_end = write(cache.full_end, positions, positions + 1)
        k_pos = {SLIDING: torch.cat([positions, cache.ring_end - 1]), FULL: full_end - 1}
        new_k, new_v = list(cache.k), list(cache.v)
    masks = {t: mask(positions, k_pos[t], s.window) for t, s in first.items()}

    kv: dict[int, tuple[Tensor, Tensor]] = {}  # K/V produced this step by each owning layer
    for i, (p, spec) in enumerate(zip(params.layers, cfg.layers, strict=True)):
        if last_only and i == cfg.first_shared and cfg.num_kv_shared_layers:
            # KV-shared layers write no cache, so when only the last logits are wanted they need only
            # the last query (HF does the same): their K/V are the donors', computed for every token.
            h, ple = h[:, -1:], None if ple is None else ple[:, -1:]
            rope = {t: (cos[-1:], sin[-1:], r) for t, (cos, sin, r) in rope.items()}
            masks = {t: m[-1:] for t, m in masks.items()}
        x = rms_norm(h, p.input_layernorm, cfg.rms_norm_eps)
        q = project_q(p.self_attn, spec, x, rope[spec.type], cfg.rms_norm_eps)
        if spec.kv_source == i:  # owns K/V; otherwise a donor earlier in the loop produced them
            k, v = project_kv(p.self_attn, spec, x, rope[spec.type], cfg.rms_norm_eps)
            if cache is not None and spec.is_sliding:  # attend over new ++ ring, then keep the last R
                kv[i] = join(k, cache.k[i]), join(v, cache.v[i])
                new_k[i] = write(cache.k[i], ring_slots, k if keep is None else k[:, keep])
                new_v[i] = write(cache.v[i], ring_slots, v if keep is None else v[:, keep])
            elif cache is not None:  # full: write into the slot of each position, attend over all slots
                kv[i] = new_k[i], new_v[i] = write(cache.k[i], positions, k), write(cache.v[i], positions, v)
            else:
                kv[i] = k, v
        a = attend(q, *kv[spec.kv_source], masks[spec.type], spec)
        h = finish_layer(p, cfg, h, a, None if ple is None else ple[:, :, i])

    if cache is not None:
        new_cache = Cache(
            tuple(new_k),
            tuple(new_v),
            write(cache.ring_end, ring_slots, kept + 1),
            full_end,
        )
    if last_only and not cfg.num_kv_shared_layers:
        h = h[:, -1:]
    h = rms_norm(h, params.norm, cfg.rms_norm_eps)
    head = params.embed_tokens if params.lm_head is None else params.lm_head
    logits = F.linear(h, head)  # tied head: the UNSCALED embedding matrix
    return softcap(logits, cfg.final_logit_softcapping), new_cache
