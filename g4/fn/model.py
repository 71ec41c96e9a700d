"""The whole Gemma 4 text forward: embeddings, per-layer embeddings, decoder layers, tied head."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from g4.config import Config, LayerSpec
from g4.fn import cache as kv
from g4.fn.attention import mask, sdpa
from g4.fn.cache import KV, Cache, Step
from g4.fn.moe import Run, experts_loop, moe
from g4.fn.ops import gelu, mlp, rms_norm, softcap
from g4.fn.rope import apply_rope, inv_freq, rope_table, rotate_half
from g4.params import Attention, Layer, Params

PLE_COMBINE_SCALE = 2**-0.5  # (context projection + token table) / sqrt(2)


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


Soft = tuple[Tensor, Tensor]  # where [B, T] bool, embeddings [B, T, H]: used in place of the tokens' there
Rotate = Callable[[Tensor], Tensor]
Rope = tuple[Tensor, Tensor, Rotate]  # cos, sin, rotate_half
QKV = tuple[Tensor, tuple[Tensor, Tensor] | None]  # q, and k, v for a KV-owning layer
Project = Callable[[Any, LayerSpec, Tensor, Rope, float, bool], QKV]


def project_q(p: Attention, spec: LayerSpec, x: Tensor, rope: Rope, eps: float) -> Tensor:
    """Queries `[B, T, nq, d]`: per-head q_norm, then RoPE."""
    q = F.linear(x, p.q_proj).unflatten(-1, (-1, spec.head_dim))
    return apply_rope(rms_norm(q, p.q_norm, eps), *rope)


def project_kv(p: Attention, spec: LayerSpec, x: Tensor, rope: Rope, eps: float) -> tuple[Tensor, Tensor]:
    """Keys and values `[B, T, nkv, d]`: k_norm before RoPE; V gets a weightless RMSNorm.

    With `k_eq_v` (31B, 26B-A4B full layers) V is the raw key projection, before k_norm and RoPE.
    """
    assert p.k_proj is not None, "KV-shared layers have no k/v projections"
    k = F.linear(x, p.k_proj).unflatten(-1, (-1, spec.head_dim))
    if spec.k_eq_v:
        v = k
    else:
        assert p.v_proj is not None, "only values-from-keys layers have no v_proj"
        v = F.linear(x, p.v_proj).unflatten(-1, (-1, spec.head_dim))
    return apply_rope(rms_norm(k, p.k_norm, eps), *rope), rms_norm(v, None, eps)


def project(p: Attention, spec: LayerSpec, x: Tensor, rope: Rope, eps: float, kv: bool) -> QKV:
    """Queries, and keys and values if the layer owns its KV (`kv`)."""
    return project_q(p, spec, x, rope, eps), project_kv(p, spec, x, rope, eps) if kv else None


@attrs.frozen
class Hooks:
    """The parts of `forward` an exporter swaps (ExecuTorch's ops, an int8 cache); HF's eager ops by default."""

    attend: Callable[[Tensor, Any, Any, Any, LayerSpec], Tensor] = sdpa  # (q, k, v, mask, spec) -> [B, T, nq, d]
    mask: Callable[[Tensor, LayerSpec], Any] = lambda m, spec: m  # bool [T, S] -> what `attend` takes
    store: Callable[[Tensor], KV] = lambda x: x  # new K/V rows -> the cache's representation
    write: kv.Write = kv.write  # K/V rows into a cache buffer at slots
    join: kv.Join = kv.join  # new rows ++ ring rows
    tag: kv.Tag = kv.tag  # 1 + position into slot tags
    forget: kv.Forget = kv.forget  # slot tags without the positions from a call's start on
    rotate: Rotate = rotate_half  # RoPE's rotate-half
    experts: Run = experts_loop  # the chosen experts on their tokens (export: `experts_gathered`)
    project: Project = project  # q, and k, v (export: one fused GEMM, `g4.export.fuse`)


EAGER = Hooks()


def finish_layer(
    p: Layer, cfg: Config, h: Tensor, attn: Tensor, ple: Tensor | None, experts: Run = experts_loop
) -> Tensor:
    """Everything after attention: o_proj, both residual blocks, the PLE branch, layer_scalar."""
    eps = cfg.rms_norm_eps
    h = h + rms_norm(F.linear(attn.flatten(-2), p.self_attn.o_proj), p.post_attention_layernorm, eps)
    m = mlp(p.mlp, rms_norm(h, p.pre_feedforward_layernorm, eps))
    if cfg.enable_moe_block:  # 26B-A4B: the experts' branch, normed, beside the normed dense MLP
        m = rms_norm(m, p.post_feedforward_layernorm_1, eps) + moe(p, cfg, h, experts)
    h = h + rms_norm(m, p.post_feedforward_layernorm, eps)
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
        if cache.batch != tokens.shape[0]:
            raise ValueError(f"cache: batch {cache.batch} does not match tokens batch {tokens.shape[0]}")
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


@attrs.frozen
class View:
    """What every layer of one type shares in a call: RoPE tables and the attention mask."""

    spec: LayerSpec  # the type's first layer
    rope: Rope
    allowed: Tensor  # bool [T, S]: query t may see key s ([B, 1, 1, T, S] with image blocks)
    mask: Any  # `allowed` as the attend hook takes it

    def last(self, hooks: Hooks, n: int) -> View:
        """The view of the last `n` queries only."""
        cos, sin, rotate = self.rope
        allowed = tail(self.allowed, n, self.allowed.dim() - 2)
        return View(self.spec, (tail(cos, n, 0), tail(sin, n, 0), rotate), allowed, hooks.mask(allowed, self.spec))


def tail(x: Tensor, n: int, dim: int = 1) -> Tensor:
    """The last `n` entries of `x` along `dim`, all of them if fewer."""
    size = x.shape[dim]
    if isinstance(size, int):
        n = min(size, n)
    elif n > 1:  # torch.export, a symbolic size: a gather (a narrow's bounds would need guards)
        k = torch.sym_min(size, n)
        return x.index_select(dim, torch.arange(k) + (size - k))
    return x.narrow(dim, size - n, n)


def views(
    cfg: Config, positions: Tensor, step: Step | None, dtype: torch.dtype, hooks: Hooks, blocks: Tensor | None = None
) -> dict[str, View]:
    """Layer type -> its `View` for queries at `positions` (keys: themselves, or the cache's slots).

    `blocks [B, T]`: image blocks that sliding layers attend within both ways (`bidirectional_vision`).
    """
    out = {}
    for t in dict.fromkeys(cfg.layer_types):  # in order of first appearance: a deterministic graph
        s = cfg.layers[cfg.layer_types.index(t)]
        cos, sin = rope_table(positions, inv_freq(s.head_dim, s.rope_theta, s.partial_rotary_factor), dtype)
        keys = positions if step is None else step.key_positions[t]
        allowed = mask(positions, keys, s.window, blocks if s.is_sliding else None)
        out[t] = View(s, (cos, sin, hooks.rotate), allowed, hooks.mask(allowed, s))
    return out


def head(params: Params, cfg: Config, h: Tensor) -> Tensor:
    """Tied LM head (the UNSCALED embedding matrix, or the exporter's copy), softcap; `h` is final-normed."""
    w = params.embed_tokens if params.lm_head is None else params.lm_head
    logits = F.linear(h, w) if isinstance(w, Tensor) else torch.cat([F.linear(h, b) for b in w], -1)  # row blocks
    return softcap(logits, cfg.final_logit_softcapping)


def forward(
    params: Params,
    cfg: Config,
    tokens: Tensor,
    positions: Tensor,
    cache: Cache | None = None,
    *,
    hooks: Hooks = EAGER,
    last: int | None = None,
    soft: Soft | None = None,
    blocks: Tensor | None = None,
) -> tuple[Tensor, Cache | None]:
    """Logits `[B, T, V]` (`[B, min(T, last), V]` with `last`: a prefill's last, a verify step's 1 + N) and the
    updated cache.

    tokens `[B, T]` int64, positions `[T]` int64 absolute positions shared by the batch. Without a
    cache this is a plain causal forward; with one, prefill of any length and one-token decode are
    the same call. `soft` puts embeddings (an image's soft tokens) in place of the tokens' where it
    says; `blocks` makes them attend both ways on sliding layers (`g4.fn.multimodal`).
    """
    h, cache = hidden_states(params, cfg, tokens, positions, cache, hooks=hooks, last=last, soft=soft, blocks=blocks)
    return head(params, cfg, h), cache


def hidden_states(
    params: Params,
    cfg: Config,
    tokens: Tensor,
    positions: Tensor,
    cache: Cache | None = None,
    *,
    hooks: Hooks = EAGER,
    last: int | None = None,
    soft: Soft | None = None,
    blocks: Tensor | None = None,
) -> tuple[Tensor, Cache | None]:
    """`forward` up to the LM head: the final-normed hidden states `[B, T, H]` (HF's last hidden state)."""
    check_inputs(cfg, tokens, positions, cache)
    eps = cfg.rms_norm_eps
    h = embed(params.embed_tokens, tokens, cfg.hidden_size**0.5)  # [B, T, H]
    if soft is not None:  # the PLE token table still reads `tokens` there (pad), its projection the soft tokens
        h = torch.where(soft[0][..., None], soft[1].to(h.dtype), h)
    ple = per_layer_inputs(params, cfg, tokens, h)  # [B, T, L, P] or None
    step = None if cache is None else kv.plan(cache, positions, hooks.tag, hooks.forget)
    view = views(cfg, positions, step, params.embed_tokens.dtype, hooks, blocks)
    made: dict[int, tuple[KV, KV]] = {}  # this call's K/V by owning layer; KV-shared layers read their donor's
    for i, (p, spec) in enumerate(zip(params.layers, cfg.layers, strict=True)):
        if last and i == cfg.first_shared:  # KV-shared layers write no cache: only the last queries matter
            h, ple = tail(h, last), None if ple is None else tail(ple, last)
            view = {t: v.last(hooks, last) for t, v in view.items()}
        x = rms_norm(h, p.input_layernorm, eps)
        q, new = hooks.project(p.self_attn, spec, x, view[spec.type].rope, eps, spec.kv_source == i)
        if new is not None:
            k, v = (hooks.store(t) for t in new)
            if step is None or cache is None:
                made[i] = k, v
            else:
                made[i], cache = kv.put(cache, step, i, spec.is_sliding, k, v, hooks.write, hooks.join)
        a = hooks.attend(q, *made[spec.kv_source], view[spec.type].mask, spec)
        h = finish_layer(p, cfg, h, a, None if ple is None else ple[:, :, i], hooks.experts)
    if last and not cfg.num_kv_shared_layers:
        h = tail(h, last)
    h = rms_norm(h, params.norm, eps)
    return h, None if cache is None or step is None else kv.commit(cache, step)
