"""Golden snapshots (golden/test_golden/*.txt) of every function in g4/fn, the tiny model and its .pte."""

import collections
from pathlib import Path

import attrs
import pytest
import torch
from conftest import CTX

import g4
from g4.config import FULL, SLIDING
from g4.fn import apply_rope, embed, inv_freq, mask, per_layer_inputs, rms_norm, rope_table
from g4.fn.model import finish_layer, project_kv, project_q
from g4.fn.rope import rotate_half
from g4.params import param_shapes
from golden import Approx, GoldenExtension, differences, render

CFG = g4.CONFIGS["tiny"]


@pytest.fixture
def golden(snapshot):
    return snapshot.use_extension(GoldenExtension)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # goldens are produced with a fixed thread count
    yield
    torch.set_num_threads(n)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def params():
    return g4.init_params(CFG, seed=0)


def test_rms_norm(golden):
    x = rand(3, 16)
    assert golden == {"scaled": Approx(rms_norm(x, 1 + 0.1 * rand(16, seed=1))), "unscaled": Approx(rms_norm(x))}


def test_rope(golden):
    pos = torch.tensor([0, 1, 7, 100, 4095])
    default = inv_freq(32, 1e4)
    proportional = inv_freq(64, 1e6, 0.25)
    cos_d, sin_d = rope_table(pos, default, torch.float32)
    cos_p, sin_p = rope_table(pos, proportional, torch.float32)
    x = rand(1, 5, 2, 64, seed=2)
    assert golden == {
        "inv_freq_default": Approx(default),
        "inv_freq_proportional": Approx(proportional),
        "zero_frequencies_proportional": int((proportional == 0).sum()),
        "cos_default": Approx(cos_d),
        "sin_default": Approx(sin_d),
        "cos_proportional": Approx(cos_p),
        "sin_proportional": Approx(sin_p),
        "applied_default": Approx(apply_rope(x[..., :32], cos_d, sin_d)),
        "applied_proportional": Approx(apply_rope(x, cos_p, sin_p)),
    }


def test_masks(golden):
    q = torch.arange(20, 23)
    ring_keys = torch.cat([torch.tensor([16, 17, 18, 19, 12, 13, 14, 15]), q])  # wrapped ring of 8 slots + new
    stale = torch.tensor([16, 17, 18, 19, 4, 5, 6, 15])  # slots holding positions outside the window
    assert golden == {
        "full_prefill": mask(torch.arange(6), torch.arange(6), None).int(),
        "sliding_prefill_w3": mask(torch.arange(6), torch.arange(6), 3).int(),
        "sliding_wrapped_ring_w8": mask(q, ring_keys, 8).int(),
        "with_empty_slots": mask(q, torch.tensor([-1, 19, -1, 21, 22]), None).int(),
        "stale_slots_w4": mask(q, stale, 4).int(),
    }


def test_per_layer_inputs(golden, params):
    tokens = torch.tensor([[2, 17, 42, 511]])
    h0 = embed(params.embed_tokens, tokens, CFG.hidden_size**0.5)
    assert golden == {"h0": Approx(h0), "ple": Approx(per_layer_inputs(params, CFG, tokens, h0))}


@pytest.mark.parametrize("layer", [0, 3, 5, 7], ids=["sliding", "full", "sliding-shared", "full-shared"])
def test_decoder_layer(golden, params, layer):
    spec, p = CFG.layers[layer], params.layers[layer]
    T = 5
    h = rand(1, T, CFG.hidden_size, seed=layer)
    cos, sin = rope_table(
        torch.arange(T), inv_freq(spec.head_dim, spec.rope_theta, spec.partial_rotary_factor), torch.float32
    )
    rope = (cos, sin, rotate_half)
    x = rms_norm(h, p.input_layernorm)
    q = project_q(p.self_attn, spec, x, rope, CFG.rms_norm_eps)
    donor = params.layers[spec.kv_source]
    k, v = project_kv(donor.self_attn, spec, x, rope, CFG.rms_norm_eps)  # donor K/V from the same input
    a = g4.fn.sdpa(q, k, v, mask(torch.arange(T), torch.arange(T), spec.window))
    ple = rand(1, T, CFG.hidden_size_per_layer_input, seed=9)
    out = finish_layer(p, CFG, h, a, ple)
    assert golden == {
        "type": spec.type,
        "kv_source": spec.kv_source,
        "q": Approx(q),
        "k": Approx(k),
        "v": Approx(v),
        "attention": Approx(a),
        "out": Approx(out),
    }


def greedy_ids(params, tokens, steps=16):
    cache = g4.init_cache(CFG, max_seq_len=64)
    with torch.no_grad():
        logits, cache = g4.forward(params, CFG, tokens, torch.arange(tokens.shape[1]), cache)
        ids = [int(logits[0, -1].argmax())]
        for t in range(tokens.shape[1], tokens.shape[1] + steps - 1):
            logits, cache = g4.forward(params, CFG, torch.tensor([ids[-1:]]), torch.tensor([t]), cache)
            ids.append(int(logits[0, -1].argmax()))
    return ids


def test_tiny_model(golden, params):
    tokens = torch.randint(0, CFG.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    cache = g4.init_cache(CFG, max_seq_len=64)
    with torch.no_grad():
        logits, cache = g4.forward(params, CFG, tokens, torch.arange(24), cache)
        after_prefill = {f"cache_k{i}_prefill": Approx(k) for i, k in enumerate(cache.k)}
        ids = []
        nxt = logits[:, -1:].argmax(-1)
        for t in range(24, 40):
            ids.append(int(nxt))
            out, cache = g4.forward(params, CFG, nxt, torch.tensor([t]), cache)
            nxt = out[:, -1:].argmax(-1)
    moving = greedy_ids(params, torch.randint(0, CFG.vocab_size, (1, 24), generator=torch.Generator().manual_seed(28)))
    assert len(set(moving)) >= 4  # a run that moves (random weights make most prompts repeat one token)
    assert golden == {
        "prefill_logits": Approx(logits),
        "prefill_argmax": logits.argmax(-1),
        "prefill_top5_last": torch.topk(logits[0, -1], 5).indices,
        "greedy_16_of_prompt_seed_28": moving,
        **after_prefill,
        **{f"cache_k{i}_decode": Approx(k) for i, k in enumerate(cache.k)},
        "ring_end": cache.ring_end,
    }


def test_tiny_vision(golden):
    # The tiny vision tower: an image's soft tokens and the logits of a prompt around it.
    from g4.fn.multimodal import image_features, multimodal_logits

    towers = g4.config.TOWERS["tiny"]
    cfg = attrs.evolve(CFG, towers=towers)
    params = g4.init_params(cfg, seed=0)
    h, w, n = 6, 9, 81  # patches: 6 rows of 9, padded to 81 (6 soft tokens)
    pixels = torch.rand(1, n, 48, generator=torch.Generator().manual_seed(0))
    gx, gy = torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy")
    pos = torch.cat([torch.stack([gx, gy], -1).reshape(h * w, 2), torch.full((n - h * w, 2), -1)])[None]
    ids = torch.tensor([[2, 5, towers.boi_token_id, *[towers.image_token_id] * 6, towers.eoi_token_id, 9, 10]])
    with torch.no_grad():
        soft = image_features(params, cfg, pixels, pos)
        logits = multimodal_logits(params, cfg, ids, pixel_values=pixels, image_position_ids=pos)
    assert golden == {"soft_tokens": Approx(soft), "logits": Approx(logits), "argmax": logits.argmax(-1)}


def test_tiny_audio(golden):
    # The tiny audio tower: a 1 s clip's features (from samples), its soft tokens, the logits of a prompt around it.
    import numpy as np

    from g4.audio import features
    from g4.fn.multimodal import audio_features, multimodal_logits

    towers = g4.config.TOWERS["tiny"]
    cfg = attrs.evolve(CFG, towers=towers)
    params = g4.init_params(cfg, seed=0)
    t = np.arange(16000) / 16000
    x, real = features([(0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)])
    ids = torch.tensor([[2, 5, towers.boa_token_id, *[towers.audio_token_id] * 25, towers.eoa_token_id, 9, 10]])
    with torch.no_grad():
        soft = audio_features(params, cfg, x, real)
        logits = multimodal_logits(params, cfg, ids, input_features=x, input_features_mask=real)
    assert golden == {
        "features": Approx(x),
        "soft_tokens": Approx(soft),
        "logits": Approx(logits),
        "argmax": logits.argmax(-1),
    }


def test_tiny_26b_model(golden):
    # The 26B-A4B kind (experts, values from keys on full layers): logits and routing locked.
    from g4.fn.moe import route

    cfg = g4.CONFIGS["tiny-26b"]
    params = g4.init_params(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = g4.forward(params, cfg, tokens, torch.arange(24))
        h = g4.fn.embed(params.embed_tokens, tokens, cfg.hidden_size**0.5)[0]
        weights, experts = route(params.layers[0].router, h, cfg)
    assert golden == {
        "logits": Approx(logits),
        "argmax": logits.argmax(-1),
        "layer0_experts_of_embeddings": experts,
        "layer0_expert_weights_of_embeddings": Approx(weights),
    }


@pytest.mark.parametrize("name", ["tiny", "e2b", "e4b", "31b", "26b-a4b"])
def test_structure(golden, name):
    cfg = g4.CONFIGS[name]
    assert golden == {
        "kv_source": [s.kv_source for s in cfg.layers],
        "layer_types": [t[0] for t in cfg.layer_types],
        "params": {p: list(s) for p, s in param_shapes(cfg).items()},
    }


def pte_logits(path, tokens):
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.kernels import quantized  # noqa: F401
    from executorch.runtime import Runtime

    m = Runtime.get().load_program(str(path)).load_method("forward")
    out = [m.execute([tokens[:, :20], torch.tensor([0])])[0]]
    for t in range(20, tokens.shape[1]):
        out.append(m.execute([tokens[:, t : t + 1], torch.tensor([t])])[0])
    return torch.stack(out, 1)


PTE_TOKENS = torch.randint(0, CFG.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))


def program(path) -> dict:
    """The .pte's `forward`: its XNNPACK delegate calls and each kernel that runs outside them, counted.

    An op that falls out of the delegate (a new graph op XNNPACK cannot take) shows up here.
    """
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(Path(path).read_bytes())
    plan = next(p for p in getattr(pte, "program", pte).execution_plan if p.name == "forward")
    calls: collections.Counter = collections.Counter()
    for ins in plan.chains[0].instructions:
        kind, args = type(ins.instr_args).__name__, ins.instr_args
        if kind == "DelegateCall":
            calls["xnnpack delegate"] += 1
        elif kind == "KernelCall":
            op = plan.operators[args.op_index]
            calls[f"{op.name}.{op.overload}" if op.overload else op.name] += 1
    return dict(sorted(calls.items()))


def test_tiny_pte_fp32(golden, pte_fp32):
    logits = pte_logits(pte_fp32, PTE_TOKENS)
    # XNNPACK's kernels differ from eager by ~1e-5 and may change with the runtime: looser.
    assert golden == {
        "context": CTX,
        "logits": Approx(logits, rtol=1e-4, atol=1e-4),
        "argmax": logits.argmax(-1),
        "program": program(pte_fp32),
    }


def test_tiny_pte_8da4w(golden, pte_8da4w):
    logits = pte_logits(pte_8da4w[0], PTE_TOKENS)
    # Dynamic int8 activation quantization rounds at kernel level: looser still.
    assert golden == {
        "logits": Approx(logits, rtol=1e-3, atol=1e-3),
        "argmax": logits.argmax(-1),
        "program": program(pte_8da4w[0]),
    }


# --- the extension itself -----------------------------------------------------------------------------


def test_extension_reports_tensor_position_and_values():
    t = rand(2, 6)
    old = render({"x": Approx(t)})
    moved = t.clone()
    moved[1, 4] += 1e-3
    diffs = list(differences(render({"x": Approx(moved)}), old))
    assert diffs and any(d.startswith("x [row 1, col 4]: golden ") and "now" in d for d in diffs)
    assert any("x [stats, " in d for d in diffs)


def test_extension_tolerance_and_shape():
    t = rand(3, 5)
    old = render({"x": Approx(t), "ids": [1, 2, 3]})
    assert not list(differences(render({"x": Approx(t * (1 + 2e-6)), "ids": [1, 2, 3]}), old))  # within rtol
    assert list(differences(render({"x": Approx(t), "ids": [1, 2, 4]}), old))  # exact entries are exact
    calls = {"xnnpack delegate": 9, "llama::custom_sdpa.out": 4}
    moved = list(differences(render({"calls": calls | {"aten::cat.out": 2}}), render({"calls": calls})))
    assert moved == ["calls: golden [], now ['aten::cat.out: 2']"]
    shape = list(differences(render({"x": Approx(t[:2]), "ids": [1, 2, 3]}), old))
    assert any("missing now: ## x shape=[3, 5]" in d for d in shape)
    assert list(differences(render({"x": Approx(t, rtol=1e-3)}), render({"x": Approx(t)})))  # tolerance is data


def test_extension_matches_and_explains():
    ext = GoldenExtension.__new__(GoldenExtension)  # matches/diff_lines need no test location
    old = render({"x": Approx(torch.ones(2, 2))})
    new = render({"x": Approx(torch.ones(2, 2) * 1.5)})
    assert ext.matches(serialized_data=old, snapshot_data=old)
    assert not ext.matches(serialized_data=new, snapshot_data=old)
    assert any("golden 1.00000000e+00, now 1.50000000e+00" in line for line in ext.diff_lines(new, old))


def test_kv_shared_layers_have_no_kv_weights(params):
    # Structure check that goes with the goldens: None where a layer has no such weight.
    for i, layer in enumerate(params.layers):
        owns = CFG.layers[i].kv_source == i
        assert (layer.self_attn.k_proj is not None) == owns
    assert attrs.fields_dict(g4.Params)["lm_head"].default is None
    assert {SLIDING, FULL} == set(CFG.layer_types)


def test_extension_sees_every_value():
    t = rand(24, 512)
    moved = t.clone()
    moved[5, 300] += 1e-2  # far from the first rows and columns
    diffs = list(differences(render({"x": Approx(moved)}), render({"x": Approx(t)})))
    assert diffs and diffs[0].startswith("x [row 5, col 300]: golden ")
