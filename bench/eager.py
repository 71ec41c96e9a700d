"""Eager speed: g4.forward against transformers' Gemma4ForCausalLM on the same random weights, CPU.

    python bench/eager.py [--layers 10] [--dtypes float32 bfloat16] [--out bench/results]

E2B widths (hidden 1536, full vocab) with `--layers` layers (the full 35 do not fit twice in 24 GiB
in fp32; the reference here shares g4's tensors, so only one copy exists). Prefill tok/s at 128
and 512 tokens (no cache) and decode tok/s with a cache after a 128-token prefill, both sides
timed alternately in one process. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import attrs
import torch
import transformers

import g4
from g4.config import FULL, SLIDING
from g4.hf import config_to_hf, to_hf_state_dict

ROOT = Path(__file__).resolve().parent.parent


def config(layers: int) -> g4.Config:
    """E2B with `layers` layers (4:1 pattern, half of them KV-shared)."""
    types = tuple(SLIDING if (i + 1) % 5 else FULL for i in range(layers - 1)) + (FULL,)
    return attrs.evolve(
        g4.CONFIGS["e2b"], num_hidden_layers=layers, layer_types=types, num_kv_shared_layers=layers // 2
    )


def hf_sharing(cfg: g4.Config, params: g4.Params, dtype: torch.dtype) -> transformers.Gemma4ForCausalLM:
    """The reference model holding g4's tensors (no copy)."""
    hc = transformers.Gemma4TextConfig(**config_to_hf(cfg))
    hc._attn_implementation = "sdpa"
    with torch.device("meta"):
        m = transformers.Gemma4ForCausalLM(hc)
    sd = to_hf_state_dict(params) | {"lm_head.weight": params.embed_tokens}
    m.load_state_dict(sd, strict=False, assign=True)
    m.model.rotary_emb = type(m.model.rotary_emb)(hc)  # buffers built on the CPU
    m.model.embed_tokens.embed_scale = torch.tensor(cfg.hidden_size**0.5)
    if cfg.hidden_size_per_layer_input:
        m.model.embed_tokens_per_layer.embed_scale = torch.tensor(cfg.hidden_size_per_layer_input**0.5)
    return m.eval().to(dtype)


def best(fn, reps: int = 3) -> float:
    """Best of `reps` wall times (after one warm-up)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


@torch.no_grad()
def measure(cfg: g4.Config, dtype: torch.dtype) -> dict:
    """Tok/s for both implementations at one dtype."""
    params = g4.init_params(cfg, seed=0, dtype=dtype)
    ref = hf_sharing(cfg, params, dtype)
    gen = torch.Generator().manual_seed(0)
    out: dict = {}
    for n in (128, 512):
        x = torch.randint(0, cfg.vocab_size, (1, n), generator=gen)
        out[f"prefill{n}"] = {
            "g4": n / best(lambda x=x, n=n: g4.forward(params, cfg, x, torch.arange(n), last=1)),
            "transformers": n / best(lambda x=x: ref(input_ids=x, use_cache=False, logits_to_keep=1)),
        }
    prompt = torch.randint(0, cfg.vocab_size, (1, 128), generator=gen)
    steps = 16

    def g4_decode() -> None:
        cache = g4.init_cache(cfg, max_seq_len=256, dtype=dtype)
        _, cache = g4.forward(params, cfg, prompt, torch.arange(128), cache, last=1)
        t = time.perf_counter()
        tok = prompt[:, -1:]
        for i in range(steps):
            _, cache = g4.forward(params, cfg, tok, torch.tensor([128 + i]), cache, last=1)
        timings.append(time.perf_counter() - t)

    def hf_decode() -> None:
        o = ref(input_ids=prompt, use_cache=True, logits_to_keep=1)
        pkv = o.past_key_values
        t = time.perf_counter()
        tok = prompt[:, -1:]
        for _ in range(steps):
            pkv = ref(input_ids=tok, past_key_values=pkv, use_cache=True, logits_to_keep=1).past_key_values
        timings.append(time.perf_counter() - t)

    res = {}
    for name, fn in (("g4", g4_decode), ("transformers", hf_decode)):
        timings: list[float] = []
        for _ in range(3):
            fn()
        res[name] = steps / min(timings)
    out["decode"] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    cfg = config(a.layers)
    results = {d: measure(cfg, getattr(torch, d)) for d in a.dtypes}
    lines = [
        f"### eager, E2B widths with {a.layers} layers, {torch.get_num_threads()} threads",
        "",
        "| dtype | workload | g4 / transformers | g4 tok/s | transformers tok/s |",
        "|---|---|---|---|---|",
    ]
    for d, r in results.items():
        for w, v in r.items():
            lines.append(
                f"| {d} | {w} | {v['g4'] / v['transformers']:.2f}x | {v['g4']:.1f} | {v['transformers']:.1f} |"
            )
    text = "\n".join(lines)
    print(text)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"eager-{'-'.join(a.dtypes)}.json").write_text(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                "config": config_to_hf(cfg),
                "command": " ".join(sys.argv),
                "results": results,
                "table": text,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
