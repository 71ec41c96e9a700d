"""Gemma 4's chat format, BOS and stop tokens: g4.run, transformers and ExecuTorch's stock runner agree."""

import json

import pytest
import transformers
from tiny_tokenizer import SPECIALS
from tiny_tokenizer import build as build_tokenizer

import g4
from g4 import chat
from g4.generation import EagerModel, PteModel, generate
from g4.memory import no_mlock
from g4.run import TINY, Printer, main

CFG = g4.CONFIGS["tiny"]
TOK = build_tokenizer()
TPL, SPECIAL = chat.template(TINY), chat.special_tokens(TINY)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Adds two numbers",
            "parameters": {"type": "object", "properties": {"a": {"type": "number"}}, "required": ["a"]},
        },
    }
]
CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": "two"}}}
CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "hi there"}],
    "system": [{"role": "system", "content": " be brief "}, {"role": "user", "content": "hi"}],
    "several turns": [
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "cd"},
        {"role": "user", "content": "ef"},
        {"role": "assistant", "content": "gh"},
        {"role": "user", "content": "ij"},
    ],
    "thought in the history": [
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>cd"},
        {"role": "user", "content": "ef"},
    ],
    "tool call": [{"role": "user", "content": "add 1"}, {"role": "assistant", "content": "", "tool_calls": [CALL]}],
    "tool response": [
        {"role": "system", "content": "use tools"},
        {"role": "user", "content": "add 1"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "name": "add", "content": "3"},
    ],
    "tool response, answer, next turn": [
        {"role": "user", "content": "add 1"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "name": "add", "content": "3"},
        {"role": "assistant", "content": "it is 3"},
        {"role": "user", "content": "thanks"},
    ],
}


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(TINY))


def test_tiny_tokenizer_is_built_like_gemma4s(hf_tokenizer):
    assert type(hf_tokenizer).__name__ == "GemmaTokenizer"  # tokenizer_config.json's class
    ours, gemma = json.loads(TOK.to_str()), json.loads(transformers.GemmaTokenizer()._tokenizer.to_str())
    for part in ("normalizer", "pre_tokenizer", "decoder"):
        assert ours[part] == gemma[part], part
    assert {k: v for k, v in ours["model"].items() if k not in ("vocab", "merges")} == {
        k: v for k, v in gemma["model"].items() if k not in ("vocab", "merges")
    }
    assert hf_tokenizer.convert_tokens_to_ids(list(SPECIALS.values())) == list(SPECIALS)
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (2, 1, 0)
    assert (CFG.bos_token_id, CFG.eos_token_id) == (2, (1, 106))
    for text in ["hello world", "ab cd.\nef", "<|turn>user\nhi<turn|>"]:  # the post-processor puts <bos> first
        assert (
            hf_tokenizer(text)["input_ids"]
            == TOK.encode(text).ids
            == [2, *TOK.encode(text, add_special_tokens=False).ids]
        )


def test_shipped_tiny_tokenizer_is_reproducible():
    assert json.loads((TINY / "tokenizer.json").read_text()) == json.loads(build_tokenizer().to_str())
    assert TOK.get_vocab_size() == CFG.vocab_size


@pytest.mark.parametrize("thinking", [False, True], ids=["thinking off", "thinking on"])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_renders_as_transformers_apply_chat_template(hf_tokenizer, name, thinking):
    msgs, tools = CONVERSATIONS[name], TOOLS if "tool" in name else None
    kw = dict(tools=tools, add_generation_prompt=True, enable_thinking=thinking)
    want = hf_tokenizer.apply_chat_template(msgs, tokenize=False, **kw)
    got = chat.render(TPL, msgs, SPECIAL, **kw)
    assert got == want
    ids = hf_tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, **kw)["input_ids"]
    assert TOK.encode(got, add_special_tokens=False).ids == list(ids)
    # Gemma 4's layout, as its documentation writes it.
    assert got.startswith("<bos><|turn>system\n<|think|>\n" if thinking else "<bos>")
    ends = {"tool call": "<tool_call|>", "tool response": "<tool_response|>"}  # the model's turn goes on
    assert got.endswith(ends.get(name, "<turn|>\n<|turn>model\n"))
    assert "hmm" not in got  # thoughts leave the history


# A template using what transformers' environment adds to Jinja's: a generation block, loop controls,
# its tojson, namespace, raise_exception.
EXTRAS = (
    "{%- set ns = namespace(n=0) -%}{{ bos_token }}{% for m in messages %}{% if loop.index > 2 %}{% break %}"
    "{% endif %}{% generation %}{{ m | tojson }}{% endgeneration %}{% set ns.n = ns.n + 1 %}{% endfor %}"
    "{{ ns.n }}{% if messages | length > 9 %}{{ raise_exception('too long') }}{% endif %}"
)


def test_jinja_environment_matches_transformers(hf_tokenizer):
    msgs = CONVERSATIONS["several turns"] + [{"role": "user", "content": "é <\"'>"}]
    want = hf_tokenizer.apply_chat_template(msgs, chat_template=EXTRAS, tokenize=False)
    assert chat.render(chat.Template(EXTRAS, TINY), msgs, SPECIAL, add_generation_prompt=False) == want
    with pytest.raises(g4.generation.GenerateError, match="too long"):
        chat.render(chat.Template(EXTRAS, TINY), msgs * 2, SPECIAL)
    with pytest.raises(g4.generation.GenerateError, match="chat template does not render"):  # the sandbox
        chat.render(chat.Template("{{ messages.__class__.__mro__ }}", TINY), msgs, SPECIAL)


def runner(pte):
    """ExecuTorch's stock TextLLMRunner on `pte` with the tokenizer next to it."""
    from executorch.extension.llm.runner import TextLLMRunner

    g4.generation.runtime()  # the kernels g4's programs call, as the README tells a Python app
    with no_mlock():
        return TextLLMRunner(str(pte), str(pte.parent / "tokenizer.json"))


def run_stock(r, text, n, **kw):
    """Pieces and stats of one greedy `generate` call."""
    from executorch.extension.llm.runner import GenerationConfig

    pieces, stats = [], []
    cfg = GenerationConfig(max_new_tokens=n, temperature=0.0, echo=False, **kw)
    r.generate(text, cfg, token_callback=pieces.append, stats_callback=stats.append)
    return pieces, stats[0]


def pieces_of(ids):
    return [TOK.decode([i], skip_special_tokens=False) for i in ids]


@pytest.mark.parametrize("kind", ["fp32", "8da4w", "kv8", "draft"])
def test_stock_runner_and_g4_run_generate_the_same_tokens(kind, request):
    """`draft`: a program with a drafter (forward returns 1 + N rows of logits) keeps the runner's contract."""
    pte = {"fp32": "pte_fp32", "8da4w": "pte_8da4w", "kv8": "pte_kv8", "draft": "pte_draft"}[kind]
    pte = request.getfixturevalue(pte)
    pte = pte[0] if isinstance(pte, tuple) else pte
    folder, r, model = pte.parent, runner(pte), PteModel(pte)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {p.name for p in folder.iterdir()}
    assert model.eos_ids == (1, 106, 50) and model.bos_id == 2  # <eos>, <turn|>, <|tool_response>
    # A chat turn: the template's text (it starts with <bos>) goes to the stock runner as it is.
    session = chat.Chat(model, TOK, chat.template(folder), chat.special_tokens(folder))
    g = session.reply([{"role": "user", "content": "hello world"}], 12)
    text = chat.render(chat.template(folder), [{"role": "user", "content": "hello world"}], SPECIAL)
    pieces, stats = run_stock(r, text, 12)
    assert pieces == pieces_of(g.ids) and stats.num_prompt_tokens == g.prompt_tokens == 20
    # A plain prompt: g4.run puts <bos> first; the stock runner, given it in the text or num_bos=1.
    ids = [2, *TOK.encode("ab cd efg", add_special_tokens=False).ids]
    g = generate(model, ids, 12)
    for text, num_bos in [("<bos>ab cd efg", 0), ("ab cd efg", 1)]:
        r.reset()
        pieces, stats = run_stock(r, text, 12, num_bos=num_bos)
        assert pieces == pieces_of(g.ids) and stats.num_prompt_tokens == len(ids)
    if kind in ("fp32", "draft"):  # and both are the pure forward's greedy tokens
        assert generate(EagerModel(CFG, g4.init_params(CFG, seed=0), 96), ids, 12).ids == g.ids


def test_stock_runner_adds_bos_only_through_the_tokenizers_post_processor(pte_fp32, tmp_path):
    """ExecuTorch 1.5.1's TextLLMRunner: `num_bos` > 0 adds the BOS that tokenizer.json's post-processor
    names, once however many are asked for; with no post-processor it adds none (the README's settings)."""
    n = len(TOK.encode("ab cd", add_special_tokens=False).ids)

    def counts(r, text):
        out = []
        for num_bos in (0, 1, 3):
            out.append(run_stock(r, text, 2, num_bos=num_bos)[1].num_prompt_tokens)
            r.reset()
        return out

    assert counts(runner(pte_fp32), "ab cd") == [n, n + 1, n + 1]
    assert counts(runner(pte_fp32), "<bos>ab cd") == [n + 1, n + 2, n + 2]  # a chat rendering: num_bos=0
    bare = json.loads(TOK.to_str()) | {"post_processor": None}
    (tmp_path / "tokenizer.json").write_text(json.dumps(bare))
    (tmp_path / "tiny.pte").symlink_to(pte_fp32)
    assert counts(runner(tmp_path / "tiny.pte"), "ab cd") == [n, n, n]


# Found by greedy search over 300 random one-word prompts (the only one of them whose reply ends
# within 24 tokens): the random tiny model answers it with six <|channel> and then <turn|>.
STOPS = [{"role": "user", "content": "dymev"}]


def test_generation_stops_at_end_of_turn_everywhere(pte_fp32, capsys):
    prompt = TOK.encode(chat.render(TPL, STOPS, SPECIAL), add_special_tokens=False).ids
    eager = EagerModel(CFG, g4.init_params(CFG, seed=0), 96, eos_ids=chat.stop_ids(TINY, CFG.eos_token_id))
    want = (100,) * 6 + (106,)
    assert generate(eager, prompt, 24).ids == want
    assert generate(PteModel(pte_fp32), prompt, 24).ids == want
    pieces, _ = run_stock(runner(pte_fp32), chat.render(TPL, STOPS, SPECIAL), 24)
    assert pieces == pieces_of(want)
    assert main([str(pte_fp32), "--chat", "--prompt", "dymev", "--max-new-tokens", "24", "--show-thinking"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("[thought]") and "| 7 tokens |" in out.err


def test_a_tool_call_waits_for_its_response():
    assert chat.stop_ids(TINY, CFG.eos_token_id) == (1, 106, 50) and chat.stop_ids(None, (1,)) == (1,)
    assert chat.STOP_TOKENS == ("<eos>", "<turn|>", "<|tool_response>")
    text = chat.render(TPL, CONVERSATIONS["tool call"], SPECIAL, tools=TOOLS, add_generation_prompt=True)
    assert text.endswith('<|tool_call>call:add{a:1,b:<|"|>two<|"|>}<tool_call|>')  # the model's turn stays open


# Two turns whose first reply re-tokenizes to the tokens generated (found by search; most random
# replies here are runs of "\n", which the template trims from the history).
TURNS = ["yooqsg zqp zfdoje rz", "mouxtu"]


@pytest.mark.parametrize("where", ["eager", "pte"])
def test_chat_keeps_the_cache_between_turns(pte_fp32, where):
    def model():
        return EagerModel(CFG, g4.init_params(CFG, seed=0), 96) if where == "eager" else PteModel(pte_fp32)

    session = chat.Chat(model(), TOK, TPL, SPECIAL)
    session.reply([{"role": "user", "content": TURNS[0]}], 8)
    held = len(session.cached)
    g = session.reply([{"role": "user", "content": TURNS[1]}], 8)
    fresh = chat.Chat(model(), TOK, TPL, SPECIAL, messages=session.messages[:-1])
    prompt = fresh.prompt()
    assert g.prompt_tokens == len(prompt) - held < len(prompt)  # only the new tokens were fed
    assert g.ids == generate(fresh.model, prompt, 8).ids  # as if the whole conversation were prefilled
    # A history the template renders differently (here: a reply of "\n"s, trimmed) is prefilled again.
    session = chat.Chat(model(), TOK, TPL, SPECIAL)
    session.reply([{"role": "user", "content": "ab cd"}], 4)
    g = session.reply([{"role": "user", "content": "ef"}], 4)
    prompt = chat.Chat(model(), TOK, TPL, SPECIAL, messages=session.messages[:-1]).prompt()
    assert g.prompt_tokens == len(prompt) and g.ids == generate(model(), prompt, 4).ids


def test_stock_runner_continues_a_chat_when_given_the_last_piece_again(pte_fp32):
    """The stock runner keeps its cache between `generate` calls but has not fed the token it sampled last."""
    r, session, seen = runner(pte_fp32), chat.Chat(PteModel(pte_fp32), TOK, TPL, SPECIAL), ""
    last = ""
    for text in TURNS:
        g = session.reply([{"role": "user", "content": text}], 8)
        full = chat.render(TPL, session.messages[:-1], SPECIAL)
        pieces, _ = run_stock(r, last + full[len(seen) :], 8)
        assert pieces == pieces_of(g.ids)
        seen, last = full + "".join(pieces), pieces[-1]


def test_cli_chat_reads_turns_from_stdin_and_reuses_the_cache(pte_fp32, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(TURNS) + "\n"))
    assert main([str(pte_fp32), "--chat", "--max-new-tokens", "8"]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if "cached tokens reused" in ln]
    assert len(err) == 2 and err[0].endswith("| 0 cached tokens reused") and "| 0 cached" not in err[1]


def test_cli_messages_file_with_a_tool_response(pte_fp32, tmp_path, capsys):
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps(CONVERSATIONS["tool response, answer, next turn"]))
    args = [str(pte_fp32), "--messages", str(conv), "--max-new-tokens", "4", "--size", "tiny", "--compare"]
    assert main(args) == 0  # the .pte and the pure forward, on the rendered conversation
    assert "no difference in tokens" in capsys.readouterr().out
    args = [str(pte_fp32), "--system", "be brief", "--prompt", "hi", "--max-new-tokens", "4", "--size", "tiny"]
    assert main([*args, "--compare"]) == 0 and "no difference in tokens" in capsys.readouterr().out


def test_render_prints_the_text_to_give_the_stock_runner(pte_fp32, capsys):
    assert main([str(pte_fp32), "--system", "be brief", "--prompt", "hi", "--think", "--render"]) == 0
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert capsys.readouterr().out == chat.render(TPL, msgs, SPECIAL, enable_thinking=True)
    assert main([str(pte_fp32), "--prompt", "ab cd", "--render"]) == 0
    assert capsys.readouterr().out == "<bos>ab cd"


def test_printer_hides_or_marks_the_thought(capsys):
    ids = [
        TOK.token_to_id("<|channel>"),
        *TOK.encode("thought\nhm", add_special_tokens=False).ids,
        TOK.token_to_id("<channel|>"),
    ]
    ids += TOK.encode("ab cd", add_special_tokens=False).ids
    for show, want in [(False, "ab cd"), (True, "[thought] thought\nhm [/thought]\nab cd")]:
        p = Printer(TOK, show)
        for i in ids:
            p(i)
        assert capsys.readouterr().out == want
    assert chat.split_thought("<|channel>thought\nhm<channel|>ab cd") == ("hm", "ab cd")
    assert chat.split_thought("ab cd") == ("", "ab cd")
