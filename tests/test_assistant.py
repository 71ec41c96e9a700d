"""The assistant drafter (MTP) against transformers' `Gemma4AssistantForCausalLM`, and speculative decoding."""

import attrs
import pytest
import torch
import transformers
from reference import hf_model
from safetensors.torch import load_file, save_file
from transformers.models.gemma4 import configuration_gemma4

import g4
from g4.checkpoint import CheckpointError, load_assistant
from g4.fn.draft import draft_step, target_kv
from g4.fn.model import embed, hidden_states
from g4.generation import Drafter, EagerModel, GenerateError, PteDrafter, PteModel, Sampler, generate
from g4.hf import assistant_config_to_hf, assistant_name
from g4.params import init_assistant, leaves_with_path

TARGET = g4.CONFIGS["tiny"]  # 2 KV heads, head_dim 32 (sliding) / 64 (full), window 16, hidden 128
ASSISTANT = g4.config.ASSISTANTS["tiny"]  # its K/V heads and head dims are the tiny target's
PROMPT = 24  # longer than the window: the drafter's sliding layers see only the last W + 1 keys


def all_shared_kv_modes(original):
    """transformers 5.23's `Gemma4TextConfig.kv_sharing_modes` raises when every layer is KV-shared (no
    layer stores K/V for the others); an assistant's config is exactly that, and means "reuse" for all."""

    def modes(self):
        if self.num_kv_shared_layers == self.num_hidden_layers:
            return ["reuse"] * self.num_hidden_layers
        return original.fget(self)

    return property(modes)


@pytest.fixture(autouse=True)
def _assistant_config_patch(monkeypatch):
    cls = configuration_gemma4.Gemma4TextConfig
    monkeypatch.setattr(cls, "kv_sharing_modes", all_shared_kv_modes(cls.kv_sharing_modes))


def hf_assistant(acfg, a):
    """A `Gemma4AssistantForCausalLM` (eager attention) holding exactly `a`."""
    hf_cfg = transformers.Gemma4AssistantConfig(**assistant_config_to_hf(acfg))
    hf_cfg.text_config._attn_implementation = "eager"
    model = transformers.Gemma4AssistantForCausalLM(hf_cfg).eval()
    sd = {assistant_name(p): t for p, t in leaves_with_path(a)}
    sd["lm_head.weight"] = a.embed_tokens
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


@pytest.fixture(scope="module")
def target():
    params = g4.init_params(TARGET, seed=3)
    return params, hf_model(TARGET, params)


@pytest.mark.parametrize("ordered", [False, True])
@torch.no_grad()
def test_drafter_matches_transformers(target, ordered, tmp_path, monkeypatch):
    params, ref = target
    acfg = attrs.evolve(ASSISTANT, use_ordered_embeddings=ordered)
    hf = hf_assistant(acfg, init_assistant(acfg, seed=4))
    hf.save_pretrained(tmp_path)  # the loader reads what transformers writes
    got_cfg, a = load_assistant(tmp_path)
    assert got_cfg == acfg

    tokens = torch.randint(0, TARGET.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(5))
    out = ref(input_ids=tokens, output_hidden_states=True, return_shared_kv_states=True, use_cache=True)
    last = out.logits[0, -1].argmax().view(1, 1)  # the token the drafter continues from, at position PROMPT
    shared = {t: (k, v) for t, (k, v) in out.shared_kv_states.items()}
    x_hf = torch.cat([ref.get_input_embeddings()(last), out.hidden_states[-1][:, -1:]], -1)

    cache = g4.init_cache(TARGET, max_seq_len=64, max_chunk=TARGET.sliding_window + 5)
    h, cache = hidden_states(params, TARGET, tokens, torch.arange(PROMPT), cache)
    kv = target_kv(TARGET, cache)
    x = torch.cat([embed(params.embed_tokens, last, TARGET.hidden_size**0.5), h[:, -1:]], -1)
    assert torch.equal(x, x_hf)

    for _ in range(3):  # a round of drafts: same position and K/V, the drafter's own hidden state fed back
        want = hf(inputs_embeds=x_hf, position_ids=torch.tensor([[PROMPT]]), shared_kv_states=shared)
        logits, nxt = draft_step(a, acfg, x, torch.tensor([PROMPT]), kv)
        for ours, theirs in ((logits, want.logits), (nxt, want.last_hidden_state)):
            assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-6  # measured 4.6e-7
        tok = want.logits.argmax(-1)
        assert torch.equal(logits.argmax(-1), tok)
        x_hf = torch.cat([ref.get_input_embeddings()(tok), want.last_hidden_state], -1)
        x = torch.cat([embed(params.embed_tokens, tok, TARGET.hidden_size**0.5), nxt], -1)


def test_assistant_checkpoint_errors(tmp_path):
    acfg = attrs.evolve(ASSISTANT, use_ordered_embeddings=True)
    hf_assistant(acfg, init_assistant(acfg, seed=4)).save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["masked_embedding.token_ordering"] = torch.zeros_like(sd["masked_embedding.token_ordering"])
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="'masked_embedding.token_ordering' is not a permutation"):
        load_assistant(tmp_path)
    del sd["pre_projection.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor 'pre_projection.weight'"):
        load_assistant(tmp_path)
    (tmp_path / "generation_config.json").write_text("{")
    with pytest.raises(CheckpointError, match="generation_config.json: not valid JSON"):
        load_assistant(tmp_path)
    (tmp_path / "generation_config.json").write_text("{}")
    (tmp_path / "config.json").write_text('{"model_type": "gemma4_text"}')
    with pytest.raises(CheckpointError, match="config.json: model_type 'gemma4_text' is not a Gemma 4 assistant"):
        load_assistant(tmp_path)


def test_drafter_must_fit_its_target():
    with pytest.raises(g4.ConfigError, match="backbone_hidden_size"):
        attrs.evolve(ASSISTANT, backbone_hidden_size=64).check_target(TARGET)
    ASSISTANT.check_target(TARGET)


# --- speculative decoding -------------------------------------------------------------------------------

N = 4  # draft tokens per round


@pytest.fixture(scope="module")
def models(target):
    params, _ = target
    drafter = Drafter(ASSISTANT, init_assistant(ASSISTANT, seed=4), tokens=N)
    return EagerModel(TARGET, params, max_context=128, ring=drafter.ring(TARGET)), drafter


def plain(model, prompt, n):
    return generate(model, prompt, n, stop=()).ids


class Oracle:
    """Proposes the target's own greedy continuation (`future`), with every `wrong`-th draft replaced."""

    def __init__(self, drafter, prompt_len, future, wrong=0):
        self.tokens, self.prompt_len = drafter.tokens, prompt_len
        self.future, self.wrong, self.calls = future, wrong, 0

    def propose(self, target, token, hidden, position, n):
        start = position - self.prompt_len + 1  # index in `future` of the first draft
        out = list(self.future[start : start + n])
        for i in range(len(out)):
            self.calls += 1
            if self.wrong and self.calls % self.wrong == 0:
                out[i] = (out[i] + 1) % TARGET.vocab_size
        return out


PROMPTS = [[2, *range(10, 10 + n)] for n in (5, 19)]  # 6 and 20 tokens: before and past the window


@pytest.mark.parametrize("prompt", PROMPTS, ids=["short", "long"])
def test_speculative_greedy_is_the_targets_greedy(models, prompt):
    model, drafter = models
    want = plain(model, prompt, 48)  # 48 new tokens: the ring wraps several times, rolled back each round
    g = generate(model, prompt, 48, stop=(), drafter=drafter)  # a random drafter: nearly everything rejected
    assert g.ids == want
    assert g.drafted > 0 and g.target_steps + g.accepted == len(want) - 1


@pytest.mark.parametrize("wrong", [0, 3])
def test_accepted_drafts_keep_the_targets_greedy(models, wrong):
    """An oracle drafter: every draft accepted (wrong=0), or every third one wrong (cache rolled back)."""
    model, drafter = models
    prompt = PROMPTS[1]
    want = plain(model, prompt, 41)
    g = generate(model, prompt, 41, stop=(), drafter=Oracle(drafter, len(prompt), want, wrong))
    assert g.ids == want
    if wrong == 0:
        assert g.accepted == g.drafted == 40 - 40 // (N + 1)  # 8 rounds of 4 drafts + the target's own token
        assert g.target_steps == 40 // (N + 1)
    else:
        assert 0 < g.accepted < g.drafted


def test_drafting_needs_a_ring_for_rollback(target):
    params, _ = target
    drafter = Drafter(ASSISTANT, init_assistant(ASSISTANT, seed=4), tokens=N)
    with pytest.raises(GenerateError, match="ring=21"):
        generate(EagerModel(TARGET, params, max_context=128), [2, 5, 6], 8, drafter=drafter)


@pytest.mark.parametrize("sampler", [Sampler(0.8, seed=7), Sampler(1.0, top_k=4, top_p=0.9, seed=7)])
def test_rejection_rule_keeps_the_targets_distribution(sampler):
    """Whatever token is drafted, accept-or-resample draws from the target's distribution."""
    logits = torch.randn(6, generator=torch.Generator().manual_seed(0)) * 2
    p = sampler.probs(logits)
    trials = 20_000
    for draft in (int(p.argmax()), int(p.argmin()), 2):
        verify = attrs.evolve(sampler, seed=draft).make_verifier()
        counts = torch.bincount(torch.tensor([verify(logits, draft)[1] for _ in range(trials)]), minlength=6)
        freq = counts.double() / trials
        sigma = (p.double() * (1 - p.double()) / trials).sqrt()
        assert ((freq - p.double()).abs() <= 5 * sigma + 1e-12).all(), (draft, freq, p)


def test_sampled_speculation_runs_and_counts(models):
    model, drafter = models
    g = generate(model, PROMPTS[0], 24, Sampler(0.7, seed=1), stop=(), drafter=drafter)
    assert len(g.ids) == 24 and g.target_steps + g.accepted == 23 and "accepted" in g.stats


def test_run_drafts_with_an_assistant_and_prints_the_same_tokens(tmp_path, capsys):
    from g4.checkpoint import write_random_assistant
    from g4.run import main

    write_random_assistant(ASSISTANT, tmp_path, seed=4)
    args = ["--eager", "--size", "tiny", "--tokens", "2,17,42", "--max-new-tokens", "24"]
    assert main([*args, "--assistant", str(tmp_path), "--draft-tokens", "3"]) == 0
    drafted = capsys.readouterr()
    assert main([*args, "--assistant", str(tmp_path), "--no-draft"]) == 0
    plain = capsys.readouterr()
    assert drafted.out == plain.out and len(drafted.out.split()) == 24  # token ids, as without drafting
    assert "| accepted 0/" in drafted.err and "target steps per token" in drafted.err
    assert "accepted" not in plain.err


def test_a_chat_drafts_over_its_cache_and_says_the_same(models):
    """Two chat turns with a drafter (the second continues the cache, rolled back after each round)
    give the same replies as without one."""
    from tiny_tokenizer import build as build_tokenizer

    from g4 import chat
    from g4.run import TINY

    model, drafter = models
    tok, tpl, special = build_tokenizer(), chat.template(TINY), chat.special_tokens(TINY)
    replies = {}
    for name, d in (("plain", None), ("draft", drafter)):
        session = chat.Chat(model, tok, tpl, special, drafter=d)
        gs = [session.reply([{"role": "user", "content": t}], 12) for t in ("yooqsg zqp zfdoje rz", "mouxtu")]
        fed_new_only = gs[1].prompt_tokens < len(session.cached) - len(gs[1].ids)
        replies[name] = [g.ids for g in gs], fed_new_only, all(g.drafted > 0 for g in gs) == (d is not None)
    assert replies["draft"] == replies["plain"]
    assert replies["draft"][1:] == (True, True)  # the second turn fed only the new tokens; both turns drafted


# --- the drafter inside the .pte ----------------------------------------------------------------------


class Recorder:
    """A drafter that records each round's position and proposals."""

    def __init__(self, drafter):
        self.drafter, self.tokens, self.rounds = drafter, drafter.tokens, []

    def propose(self, target, token, row, position, n):
        out = self.drafter.propose(target, token, row, position, n)
        self.rounds.append((position, out))
        return out


@pytest.fixture(scope="module")
def pte_models(pte_draft):
    """The .pte with a drafter, and the same target (`tiny`, seed 0) and assistant as eager models."""
    out, asst = pte_draft
    acfg, a = load_assistant(asst)
    drafter = Drafter(acfg, a, tokens=N)
    eager = EagerModel(TARGET, g4.init_params(TARGET, seed=0), max_context=96, ring=drafter.ring(TARGET))
    return PteModel(out), eager, drafter


@pytest.mark.parametrize("prompt", PROMPTS, ids=["short", "long"])
def test_pte_drafts_what_the_eager_drafter_drafts(pte_models, prompt):
    """The `draft` method (ExecuTorch's attention over `forward`'s cache buffers, shared across methods)
    proposes the eager drafter's tokens round after round, rollbacks and ring wraps included; the
    greedy output is the target's own, on both."""
    pte, eager, drafter = pte_models
    want = plain(eager, prompt, 40)
    assert plain(pte, prompt, 40) == want
    rounds = {}
    for name, model, d in (("pte", pte, PteDrafter(pte)), ("eager", eager, drafter)):
        r = Recorder(d)
        assert generate(model, prompt, 40, stop=(), drafter=r).ids == want
        rounds[name] = r.rounds
    assert rounds["pte"] == rounds["eager"] and len(rounds["pte"]) >= 10


@pytest.mark.parametrize("wrong", [0, 3])
def test_pte_accepts_an_oracles_drafts(pte_models, wrong):
    """Verify steps of 1 + 4 tokens in the .pte: every draft accepted, or every third one wrong."""
    pte = pte_models[0]
    prompt = PROMPTS[1]
    want = plain(pte, prompt, 41)
    g = generate(pte, prompt, 41, stop=(), drafter=Oracle(PteDrafter(pte), len(prompt), want, wrong))
    assert g.ids == want
    if wrong == 0:
        assert g.accepted == g.drafted == 32 and g.target_steps == 8
    else:
        assert 0 < g.accepted < g.drafted


@torch.no_grad()
def test_pte_drafts_after_an_image_prompt(pte_models):
    """The drafter program also has the towers: after `text_decoder` prefills a prompt with an image, `draft`
    reads the hidden state it left and proposes the eager drafter's tokens, round for round."""
    pte, _, drafter = pte_models
    cfg = attrs.evolve(TARGET, towers=g4.config.TOWERS["tiny"])  # the export draws the towers after the text
    eager = EagerModel(cfg, g4.init_params(cfg, seed=0), max_context=96, ring=drafter.ring(cfg))
    gx, gy = torch.meshgrid(torch.arange(9), torch.arange(6), indexing="xy")  # 6 x 9 patches: 6 soft tokens
    pixels = torch.rand(1, 54, 48, generator=torch.Generator().manual_seed(0))
    soft = pte.encode(pixels, torch.stack([gx, gy], -1).reshape(1, 54, 2))  # the same soft tokens on both
    prompt = [2, *range(10, 25), *pte.vision.placeholders(6), 9, 10]
    runs = {}
    for name, model, d in (("pte", pte, PteDrafter(pte)), ("eager", eager, drafter)):
        r = Recorder(d)
        runs[name] = generate(model, prompt, 24, stop=(), drafter=r, soft=soft).ids, r.rounds
    assert runs["pte"] == runs["eager"] and len(runs["pte"][1]) >= 5
    assert runs["pte"][0] == generate(pte, prompt, 24, stop=(), soft=soft).ids


def test_run_drafts_with_a_pte_drafter(pte_draft, capsys):
    from g4.run import main

    args = [str(pte_draft[0]), "--tokens", "2,17,42", "--max-new-tokens", "24"]
    outs = []
    for extra in ([], ["--draft-tokens", "2"], ["--no-draft"]):  # drafts by itself, unless told not to
        assert main([*args, *extra]) == 0
        out, err = capsys.readouterr()
        assert len(out.split()) == 24 and ("| accepted 0/" in err) == (extra != ["--no-draft"]), err
        outs.append(out)
    assert outs[0] == outs[1] == outs[2]
