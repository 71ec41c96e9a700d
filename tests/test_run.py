import json

import pytest
import torch
import transformers
from tiny_tokenizer import build as build_tokenizer

import g4
from g4.generation import GenerateError, PteModel, Sampler, generate
from g4.run import GEMMA4_TURN, TINY_TOKENIZER, main, render_chat

CFG = g4.CONFIGS["tiny"]
PROMPT = [2, 17, 42, 99, 5, 300]


@pytest.fixture(scope="module")
def eager():
    return g4.EagerModel(CFG, g4.init_params(CFG, seed=0), max_context=96)


def test_pte_and_eager_generate_the_same_32_tokens(pte_fp32, eager, capsys):
    a = generate(PteModel(pte_fp32), PROMPT, 32, stop=())
    b = generate(eager, PROMPT, 32, stop=())
    assert len(a.ids) == 32 and a.ids == b.ids
    assert (
        main([str(pte_fp32), "--size", "tiny", "--compare", "--tokens", "2,17,42,99,5,300", "--max-new-tokens", "32"])
        == 0
    )
    assert "no difference in tokens" in capsys.readouterr().out


def test_eager_compare_loads_each_model_once(pte_fp32, monkeypatch, capsys):
    import g4.run

    loads = []
    monkeypatch.setattr(g4.run, "init_params", lambda cfg, seed: loads.append(seed) or g4.init_params(cfg, seed))
    args = [str(pte_fp32), "--eager", "--compare", "--size", "tiny", "--tokens", "2,17,42", "--max-new-tokens", "4"]
    assert main(args) == 0
    assert loads == [0] and "no difference in tokens" in capsys.readouterr().out


def test_sampling_is_seeded_and_temperature_zero_is_greedy(eager):
    greedy = generate(eager, PROMPT, 12, stop=())
    assert generate(eager, PROMPT, 12, Sampler(temperature=0.0, seed=5), stop=()).ids == greedy.ids
    s = Sampler(temperature=1.5, top_k=50, top_p=0.9, seed=3)
    one, two = generate(eager, PROMPT, 12, s, stop=()), generate(eager, PROMPT, 12, s, stop=())
    assert one.ids == two.ids
    other = generate(eager, PROMPT, 12, Sampler(temperature=1.5, top_k=50, top_p=0.9, seed=4), stop=())
    assert other.ids != one.ids


def test_top_k_one_is_greedy(eager):
    assert (
        generate(eager, PROMPT, 8, Sampler(temperature=2.0, top_k=1), stop=()).ids
        == generate(eager, PROMPT, 8, stop=()).ids
    )


def test_generation_stops_at_eos(eager):
    first = generate(eager, PROMPT, 5, stop=()).ids
    stop = first[-1]
    assert generate(eager, PROMPT, 5, stop=(stop,)).ids == first[: first.index(stop) + 1]


# A Gemma 4 style template (turn markers <|turn> / <turn|>, role "model" for the assistant).
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


def test_chat_format_matches_the_checkpoint_template(tmp_path):
    tok = build_tokenizer()
    tok.add_special_tokens(["<|turn>", "<turn|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "bos_token": "<bos>"}))
    conv = [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "ab cd"},
        {"role": "user", "content": "and now"},
    ]
    from g4.run import chat_template

    ours = tok.encode(render_chat(conv, chat_template(tmp_path / "tokenizer.json")), add_special_tokens=False).ids
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="<bos>")
    want = hf.apply_chat_template(conv, chat_template=TEMPLATE, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert ours == list(want)
    turn, end = tok.token_to_id("<|turn>"), tok.token_to_id("<turn|>")
    assert ours[0] == 2 and ours.count(turn) == 4 and ours.count(end) == 3
    # Without a template, the built-in single-turn layout is Gemma 4's turn format.
    assert render_chat([{"role": "user", "content": "x"}], None) == GEMMA4_TURN.format(prompt="x")
    assert GEMMA4_TURN == "<bos><|turn>user\n{prompt}<turn|>\n<|turn>model\n"


def test_cli_streams_text_and_stats(pte_fp32, capsys, tmp_path):
    assert main([str(pte_fp32), "--tokenizer", str(TINY_TOKENIZER), "--prompt", "ab cd", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "tok/s" in out.err and "peak RSS" in out.err


def test_shipped_tiny_tokenizer_is_reproducible():
    assert json.loads(TINY_TOKENIZER.read_text()) == json.loads(build_tokenizer().to_str())
    assert build_tokenizer().get_vocab_size() == CFG.vocab_size


def test_bad_inputs_exit_2_with_one_line(pte_fp32, tmp_path, capsys):
    def err(argv):
        assert main(argv) == 2
        lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert len(lines) == 1  # (ExecuTorch's C++ loader may log lines of its own)
        return lines[0]

    assert "no such file" in err([str(tmp_path / "missing.pte"), "--prompt", "x"])
    long = ",".join(["5"] * 100)
    e = err([str(pte_fp32), "--tokens", long])
    assert "100 tokens" in e and "context is 96" in e
    big = transformers.PreTrainedTokenizerFast(tokenizer_object=build_tokenizer())
    big.add_tokens([f"extra{i}" for i in range(20)])
    big.save_pretrained(tmp_path / "bigtok")
    e = err([str(pte_fp32), "--tokenizer", str(tmp_path / "bigtok" / "tokenizer.json"), "--prompt", "x"])
    assert "532 tokens" in e and "512" in e
    notllm = tmp_path / "add.pte"
    from executorch.exir import to_edge

    class Add(torch.nn.Module):
        def forward(self, x):
            return x + 1

    notllm.write_bytes(to_edge(torch.export.export(Add(), (torch.ones(2),))).to_executorch().buffer)
    assert "not an LLM-runner program" in err([str(notllm), "--prompt", "x"])
    (tmp_path / "junk.pte").write_bytes(b"junk")
    assert "not an ExecuTorch program" in err([str(tmp_path / "junk.pte"), "--prompt", "x"])
    with pytest.raises(GenerateError, match="context is 96"):
        generate(PteModel(pte_fp32), [5] * 96, 4)
