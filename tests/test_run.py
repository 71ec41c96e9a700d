import pytest
import torch
import transformers
from tiny_tokenizer import build as build_tokenizer

import g4
from g4.generation import GenerateError, PteModel, Sampler, generate
from g4.run import TINY, main

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


def test_threads_sets_the_pool_and_changes_no_token(pte_fp32):
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count

    from g4.generation import set_threads

    n = _threadpool_get_thread_count()
    default = generate(PteModel(pte_fp32), PROMPT, 16, stop=()).ids
    try:
        one = generate(PteModel(pte_fp32, threads=1), PROMPT, 16, stop=()).ids
        assert _threadpool_get_thread_count() == 1
    finally:
        set_threads(n)
    assert one == default


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


def test_cli_streams_text_and_stats(pte_fp32, capsys, tmp_path):
    assert (
        main([str(pte_fp32), "--tokenizer", str(TINY / "tokenizer.json"), "--prompt", "ab cd", "--max-new-tokens", "8"])
        == 0
    )
    out = capsys.readouterr()
    assert out.out.strip() and "tok/s" in out.err and "peak RSS" in out.err


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
