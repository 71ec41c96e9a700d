import attrs
import pytest
import torch
from reference import hf_cached_logits, hf_logits, hf_model

import g4
from g4.config import FULL, SLIDING
from g4.fn import ATTENTION_SCALE, sdpa

S, F = SLIDING, FULL
SMALL = dict(
    vocab_size=256,
    vocab_size_per_layer_input=256,
    hidden_size=64,
    num_attention_heads=4,
    head_dim=16,
    global_head_dim=32,
    hidden_size_per_layer_input=16,
    max_position_embeddings=512,
)
CASES = {
    # 1 kv head, 4:1 pattern, double-wide MLP on the 4 KV-shared layers.
    "e2b-like": attrs.evolve(
        g4.CONFIGS["e2b"],
        **SMALL,
        intermediate_size=96,
        num_hidden_layers=10,
        num_key_value_heads=1,
        layer_types=(S, S, S, S, F) * 2,
        sliding_window=16,
        num_kv_shared_layers=4,
    ),
    # 2 kv heads, 5:1 pattern, no double-wide MLP.
    "e4b-like": attrs.evolve(
        g4.CONFIGS["e4b"],
        **SMALL,
        intermediate_size=128,
        num_hidden_layers=12,
        num_key_value_heads=2,
        layer_types=(S, S, S, S, S, F) * 2,
        sliding_window=16,
        num_kv_shared_layers=4,
    ),
    # Window much shorter than the sequence.
    "window-8": attrs.evolve(g4.CONFIGS["tiny"], sliding_window=8),
    # 31B: full layers take their values from k_proj and have their own (fewer) KV heads; no PLE.
    "31b-like": attrs.evolve(
        g4.CONFIGS["31b"],
        **SMALL | dict(hidden_size_per_layer_input=0),
        intermediate_size=96,
        num_hidden_layers=12,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        layer_types=(S, S, S, S, S, F) * 2,
        sliding_window=16,
    ),
}
# 26B-A4B: 31B's attention, and 8 experts (4 per token) beside a narrower dense MLP in every layer.
CASES["26b-like"] = attrs.evolve(
    CASES["31b-like"],
    intermediate_size=48,
    enable_moe_block=True,
    num_experts=8,
    top_k_experts=4,
    moe_intermediate_size=24,
)
PROMPT, STEPS = 48, 60


def rel(a, b):
    """max |a - b| relative to max |b|: fp32 on these configs sits ~2e-6 from fp64 (test_fp32_floor)."""
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    cfg = CASES[request.param]
    params = g4.init_params(cfg, seed=1)
    return cfg, params, hf_model(cfg, params)


def prompt(cfg, n=PROMPT, batch=1, seed=0):
    return torch.randint(0, cfg.vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))


def greedy(params, cfg, tokens, steps, max_seq_len=256):
    """Prefill then `steps` one-token decode steps; returns all logits [B, n+steps, V] and the ids."""
    cache = g4.init_cache(cfg, batch=tokens.shape[0], max_seq_len=max_seq_len, dtype=params.norm.dtype)
    n = tokens.shape[1]
    logits, cache = g4.forward(params, cfg, tokens, torch.arange(n), cache)
    out, ids = [logits], tokens
    for t in range(n, n + steps):
        nxt = out[-1][:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        if t == n + steps - 1:
            break
        logits, cache = g4.forward(params, cfg, nxt, torch.tensor([t]), cache)
        out.append(logits)
    return torch.cat(out, 1), ids


@torch.no_grad()
def test_parity_with_transformers(case):
    cfg, params, ref = case
    tokens = prompt(cfg)
    want = hf_logits(ref, tokens)
    got, _ = g4.forward(params, cfg, tokens, torch.arange(PROMPT))
    assert torch.equal(got, want)  # no cache: the same ops in the same order, bit for bit

    # With a cache, then 60 single-token decode steps past the window and through the shared layers.
    logits, ids = greedy(params, cfg, tokens, STEPS)
    assert ids.shape[1] == PROMPT + STEPS > cfg.sliding_window
    want = hf_logits(ref, ids)[:, :-1]  # the reference on the whole grown sequence
    # Cached attention reduces over the keys in another order: measured <= 2.9e-6 relative.
    assert rel(logits, want) <= 1e-5
    assert torch.equal(logits[:, PROMPT - 1 :].argmax(-1), want[:, PROMPT - 1 :].argmax(-1))
    # transformers' own cached greedy decoding picks the same tokens.
    hf_ids = ref.generate(tokens, max_new_tokens=STEPS, do_sample=False, min_new_tokens=STEPS)
    assert torch.equal(hf_ids, ids)


@torch.no_grad()
def test_batch_of_two_matches_single_rows(case):
    cfg, params, _ = case
    tokens = prompt(cfg, n=24, batch=2)
    both, _ = greedy(params, cfg, tokens, 8)
    for b in range(2):
        one, _ = greedy(params, cfg, tokens[b : b + 1], 8)
        assert rel(both[b : b + 1], one) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("name", ["window-8", "e2b-like"])
def test_chunked_prefill_equals_one_shot(name):
    cfg = CASES[name]
    params = g4.init_params(cfg, seed=2)
    W = cfg.sliding_window
    n = 40
    tokens = prompt(cfg, n=n)
    want, _ = g4.forward(params, cfg, tokens, torch.arange(n))
    for chunk in (1, 3, W - 1, W + 1):
        cache = g4.init_cache(cfg, max_seq_len=64)
        outs, t = [], 0
        while t < 30:  # chunked prefill of 30 tokens, then one-token decode to n
            step = chunk if t + chunk <= 30 else 30 - t
            o, cache = g4.forward(params, cfg, tokens[:, t : t + step], torch.arange(t, t + step), cache)
            outs.append(o)
            t += step
        for t in range(30, n):
            o, cache = g4.forward(params, cfg, tokens[:, t : t + 1], torch.tensor([t]), cache)
            outs.append(o)
        assert rel(torch.cat(outs, 1), want) <= 1e-5, chunk


@torch.no_grad()
@pytest.mark.parametrize("name", list(CASES))
def test_fp32_floor(name):
    # How far any fp32 implementation sits from exact arithmetic on these random configs; the
    # tolerances above are set from it.
    cfg = CASES[name]
    params = g4.init_params(cfg, seed=2)
    tokens = prompt(cfg)
    a, _ = g4.forward(params, cfg, tokens, torch.arange(PROMPT))
    b, _ = g4.forward(g4.tree_map(torch.Tensor.double, params), cfg, tokens, torch.arange(PROMPT))
    assert rel(a.double(), b) <= 5e-6


@torch.no_grad()
def test_prefill_longer_than_window_then_decode():
    cfg = CASES["window-8"]
    params = g4.init_params(cfg, seed=3)
    tokens = prompt(cfg, n=30)
    want, _ = g4.forward(params, cfg, tokens, torch.arange(30))
    cache = g4.init_cache(cfg, max_seq_len=32)
    a, cache = g4.forward(params, cfg, tokens[:, :25], torch.arange(25), cache)  # 25 > 3 windows
    assert sorted(cache.ring_end.tolist()) == list(range(18, 26))  # the ring keeps the last W positions
    outs = [a]
    for t in range(25, 30):
        o, cache = g4.forward(params, cfg, tokens[:, t : t + 1], torch.tensor([t]), cache)
        outs.append(o)
    assert rel(torch.cat(outs, 1), want) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("name", list(CASES))
def test_bf16_against_reference(name):
    cfg = CASES[name]
    params = g4.init_params(cfg, seed=4)
    ref = hf_model(cfg, params, dtype=torch.bfloat16)
    tokens = prompt(cfg)
    want = hf_logits(ref, tokens)
    bf16 = g4.tree_map(lambda x: x.to(torch.bfloat16), params)
    got, _ = g4.forward(bf16, cfg, tokens, torch.arange(PROMPT))
    assert got.dtype == torch.bfloat16
    # g4 follows every HF rounding step in bf16 (embedding scale rounded to bf16, RoPE tables in fp32
    # cast to bf16 before rotating, norms and softmax in fp32, the rest in bf16): bit-identical.
    assert torch.equal(got, want)
    # With a cache: bit-identical to transformers' own cached decoding of the same tokens.
    logits, ids = greedy(bf16, cfg, tokens, 24)
    assert torch.equal(logits, hf_cached_logits(ref, ids, PROMPT))
    # Against a cacheless forward, attention reduces over differently ordered key sets and bf16 rounds
    # each sum: 0 on three configs, 0.96 % of the logit range on e4b-like (2.9 % over 60 steps; README,
    # Numerics). With experts, such a difference can flip a near-tied routing choice: 39 % on 26b-like,
    # and transformers' cached decoding differs from its cacheless forward exactly as much.
    if not cfg.enable_moe_block:
        assert rel(logits.float(), hf_logits(ref, ids)[:, :-1].float()) <= 0.03


def test_embedding_scale_rounds_like_hf_in_bf16():
    # HF casts sqrt(H) to the weight dtype before multiplying (Gemma4TextScaledWordEmbedding).
    from g4.fn import embed

    table = torch.ones(4, 1536, dtype=torch.bfloat16)
    assert embed(table, torch.tensor([[1]]), 1536**0.5)[0, 0, 0].item() == 39.25
    assert embed(table.float(), torch.tensor([[1]]), 1536**0.5)[0, 0, 0].item() == pytest.approx(39.19184, 1e-6)


def grads_and_reference(name):
    """`torch.func.grad` over the tree of a logsumexp loss, and transformers' autograd on the same weights."""
    cfg = CASES[name]
    params = g4.init_params(cfg, seed=5)
    ref = hf_model(cfg, params)
    tokens = prompt(cfg, n=12)

    def loss(p):
        logits, _ = g4.forward(p, cfg, tokens, torch.arange(12))
        return logits.logsumexp(-1).mean()

    grads = torch.func.grad(loss)(params)
    ref.model.zero_grad()
    ref(input_ids=tokens, use_cache=False).logits.logsumexp(-1).mean().backward()
    return grads, ref


def test_grad_matches_reference_autograd():
    grads, ref = grads_and_reference("e2b-like")
    assert isinstance(grads, g4.Params)
    named = dict(ref.named_parameters())
    named_buffers = dict(ref.named_buffers())
    for ours, theirs in [
        (grads.layers[0].self_attn.q_norm, named["model.layers.0.self_attn.q_norm.weight"].grad),
        (grads.layers[8].mlp.down_proj, named["model.layers.8.mlp.down_proj.weight"].grad),
        (grads.per_layer_model_projection, named["model.per_layer_model_projection.weight"].grad),
        (grads.layers[4].self_attn.k_proj, named["model.layers.4.self_attn.k_proj.weight"].grad),
    ]:
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    assert grads.layers[3].layer_scalar.abs().sum() > 0  # a buffer in HF, a leaf here
    assert "model.layers.3.layer_scalar" in named_buffers


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gathered_experts_match_the_loop(dtype):
    # The export's static form (each token's experts gathered) against eager's loop over the experts hit.
    from g4.fn.moe import experts_gathered

    cfg = CASES["26b-like"]
    params = g4.tree_map(lambda x: x.to(dtype), g4.init_params(cfg, seed=6))
    tokens = prompt(cfg)
    want, _ = g4.forward(params, cfg, tokens, torch.arange(PROMPT))
    got, _ = g4.forward(params, cfg, tokens, torch.arange(PROMPT), hooks=g4.Hooks(experts=experts_gathered))
    # fp32: batched matmuls reduce in another order (measured 8.8e-7 of the logit range); bf16: the
    # same rounding steps, the experts' outputs added in the same (increasing id) order.
    assert torch.equal(got, want) if dtype == torch.bfloat16 else rel(got, want) <= 3e-6


def test_grad_through_router_and_experts_matches_reference():
    grads, ref = grads_and_reference("26b-like")
    named = dict(ref.named_parameters())
    layer = grads.layers[5]  # a full layer: values from k_proj
    assert layer.self_attn.v_proj is None
    for ours, theirs in [
        (layer.router.proj, "router.proj.weight"),
        (layer.router.scale, "router.scale"),
        (layer.router.per_expert_scale, "router.per_expert_scale"),
        (layer.experts.gate_up_proj, "experts.gate_up_proj"),
        (layer.experts.down_proj, "experts.down_proj"),
        (layer.post_feedforward_layernorm_2, "post_feedforward_layernorm_2.weight"),
        (layer.self_attn.k_proj, "self_attn.k_proj.weight"),
    ]:
        assert torch.allclose(ours, named[f"model.layers.5.{theirs}"].grad, rtol=1e-4, atol=1e-6), theirs
    assert layer.experts.gate_up_proj.abs().sum() > 0


@torch.no_grad()
def test_research_tweaks_with_evolve():
    cfg = g4.CONFIGS["tiny"]
    params = g4.init_params(cfg, seed=6)
    tokens = prompt(cfg, n=16)
    base, _ = g4.forward(params, cfg, tokens, torch.arange(16))

    # Zeroing the last layer's layer_scalar zeroes the residual stream, so logits are softcap(0) = 0.
    last = len(params.layers) - 1
    zeroed = attrs.evolve(
        params,
        layers=tuple(
            attrs.evolve(layer, layer_scalar=torch.zeros(1)) if i == last else layer
            for i, layer in enumerate(params.layers)
        ),
    )
    out, _ = g4.forward(zeroed, cfg, tokens, torch.arange(16))
    assert out.abs().max() == 0
    assert params.layers[last].layer_scalar.item() != 0  # original untouched
    again, _ = g4.forward(params, cfg, tokens, torch.arange(16))
    assert torch.equal(again, base)

    # A different attention function: scale 1/sqrt(d) instead of Gemma 4's 1.0 moves the output.
    assert ATTENTION_SCALE == 1.0
    scaled, _ = g4.forward(
        params,
        cfg,
        tokens,
        torch.arange(16),
        hooks=g4.fn.Hooks(attend=lambda q, k, v, m, spec: sdpa(q * q.shape[-1] ** -0.5, k, v, m)),
    )
    assert (scaled - base).abs().max() > 1e-2
    same, _ = g4.forward(params, cfg, tokens, torch.arange(16), hooks=g4.fn.Hooks(attend=sdpa))
    assert torch.equal(same, base)


def test_bad_inputs_name_the_argument():
    cfg = g4.CONFIGS["tiny"]
    params = g4.init_params(cfg)
    pos = torch.arange(4)
    with pytest.raises(ValueError, match="tokens must be an int64 tensor"):
        g4.forward(params, cfg, torch.zeros(1, 4, dtype=torch.int32), pos)
    with pytest.raises(ValueError, match="tokens must be an int64 tensor"):
        g4.forward(params, cfg, torch.zeros(4, dtype=torch.int64), pos)
    with pytest.raises(ValueError, match="positions must be an int64 tensor"):
        g4.forward(params, cfg, torch.zeros(1, 4, dtype=torch.int64), torch.arange(3))
    with pytest.raises(ValueError, match="tokens: ids must be in"):
        g4.forward(params, cfg, torch.full((1, 4), 9999), pos)
    cache = g4.init_cache(cfg, max_seq_len=8)
    with pytest.raises(ValueError, match=r"prefill of 9 tokens is longer than the cache \(max_seq_len=8\)"):
        g4.forward(params, cfg, torch.zeros(1, 9, dtype=torch.int64), torch.arange(9), cache)
    with pytest.raises(ValueError, match="positions: 9 does not fit"):
        g4.forward(params, cfg, torch.zeros(1, 2, dtype=torch.int64), torch.arange(8, 10), cache)


@pytest.mark.parametrize("n", [1, 3])
@torch.no_grad()
def test_last_skips_nothing_that_matters(n):
    # `last=n` runs the KV-shared layers for the last n queries only; their logits must not change.
    cfg = CASES["window-8"]
    params = g4.init_params(cfg, seed=8)
    tokens = prompt(cfg, n=30)
    full, _ = g4.forward(params, cfg, tokens, torch.arange(30))
    last, _ = g4.forward(params, cfg, tokens, torch.arange(30), last=n)
    assert last.shape == (1, n, cfg.vocab_size) and rel(last, full[:, -n:]) <= 1e-5
    cache_a, cache_b = g4.init_cache(cfg, max_seq_len=64), g4.init_cache(cfg, max_seq_len=64)
    for t0, t1 in ((0, 12), (12, 13), (13, 30)):  # the 1-token call returns its one row
        a, cache_a = g4.forward(params, cfg, tokens[:, t0:t1], torch.arange(t0, t1), cache_a)
        b, cache_b = g4.forward(params, cfg, tokens[:, t0:t1], torch.arange(t0, t1), cache_b, last=n)
        assert b.shape[1] == min(n, t1 - t0) and rel(b, a[:, -n:]) <= 1e-5
        assert all(torch.equal(x, y) for x, y in zip(cache_a.k, cache_b.k, strict=True))


@pytest.mark.parametrize("fed", [5, 30])
def test_slot_positions_are_what_the_tags_say(fed):
    # The .pte's drafter computes the positions its slots hold instead of reading the tag buffers.
    from g4.fn.cache import key_positions, slot_positions

    cfg = CASES["window-8"]
    cache = g4.init_cache(cfg, max_seq_len=64, max_chunk=cfg.sliding_window + 6)  # a ring of 14: wraps at 30
    _, cache = g4.forward(g4.init_params(cfg, seed=8), cfg, prompt(cfg, n=fed), torch.arange(fed), cache)
    assert torch.equal(slot_positions(cache.ring_slots, fed - 1, True), key_positions(cache, SLIDING))
    assert torch.equal(slot_positions(64, fed - 1, False), key_positions(cache, FULL))


@torch.no_grad()
def test_a_call_forgets_what_the_cache_held_from_its_start_on():
    # Rejected drafts / a rewound chat: feeding at position s replaces everything from s on. Without
    # `forget` the ring's later entries stay visible to the call's later queries (fails, checked).
    cfg = CASES["window-8"]
    params = g4.init_params(cfg, seed=8)
    a, b = prompt(cfg, n=30), prompt(cfg, n=30, seed=1)
    cache = g4.init_cache(cfg, max_seq_len=64, max_chunk=cfg.sliding_window + 6)
    _, cache = g4.forward(params, cfg, a, torch.arange(30), cache)  # then rewind to 24: 6 positions replaced
    got, _ = g4.forward(params, cfg, b[:, 24:], torch.arange(24, 30), cache)
    want, _ = g4.forward(params, cfg, torch.cat([a[:, :24], b[:, 24:]], 1), torch.arange(30))
    assert rel(got, want[:, 24:]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_by_matmul_is_exactly_rotate_half(dtype):
    # The exporter's rotate-half (a 2x2 matmul XNNPACK can take) must equal HF's cat(-x2, x1) bit for bit.
    from functools import partial

    from g4.export.et import rotate_half_by_matmul, rotate_half_matrix
    from g4.fn.rope import rotate_half

    x = torch.randn(2, 5, 3, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    by_matmul = partial(rotate_half_by_matmul, rot=rotate_half_matrix(dtype))
    x1, x2 = x[..., :8], x[..., 8:]
    assert torch.equal(rotate_half(x), torch.cat([-x2, x1], -1))
    assert torch.equal(by_matmul(x), rotate_half(x))
    cfg = CASES["e2b-like"]
    params = g4.tree_map(lambda t: t.to(dtype), g4.init_params(cfg, seed=4))
    tokens = prompt(cfg)
    want, _ = g4.forward(params, cfg, tokens, torch.arange(PROMPT))
    got, _ = g4.forward(params, cfg, tokens, torch.arange(PROMPT), hooks=g4.fn.Hooks(rotate=by_matmul))
    assert torch.equal(got, want)
