"""g4.forward against transformers at the real E2B / E4B shapes, random weights.

    python bench/full_shape_parity.py e2b [--dtype bfloat16] [--device cpu] [--prompts 3] [--steps 8]

Writes (once) a random full-size checkpoint with `python -m g4.checkpoint random`'s writer, loads it
with g4 (bf16: memory-mapped, no copy) and builds `Gemma4ForCausalLM` on the very same tensors
(`load_state_dict(assign=True)`), so one copy of the weights serves both. For a few prompts it runs a
prefill and `--steps` cached decode steps on each and prints max |logit diff| and greedy agreement.
On a GPU machine use `--dtype float32 --device cuda`.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
import transformers

import g4
from g4.hf import config_to_hf, to_hf_state_dict


def reference(cfg: g4.Config, params: g4.Params, device: str) -> transformers.Gemma4ForCausalLM:
    """The HF model holding g4's tensors (eager attention, as the spec's reference)."""
    hc = transformers.Gemma4TextConfig(**config_to_hf(cfg))
    hc._attn_implementation = "eager"
    with torch.device("meta"):
        m = transformers.Gemma4ForCausalLM(hc)
    m.load_state_dict(to_hf_state_dict(params) | {"lm_head.weight": params.embed_tokens}, strict=False, assign=True)
    with torch.device(device):  # non-persistent buffers, built as from_pretrained builds them
        m.model.rotary_emb = type(m.model.rotary_emb)(hc)
        m.model.embed_tokens.embed_scale = torch.tensor(cfg.hidden_size**0.5)
        m.model.embed_tokens_per_layer.embed_scale = torch.tensor(cfg.hidden_size_per_layer_input**0.5)
    return m.eval()


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("size", choices=["e2b", "e4b"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dir", default=None, help="checkpoint folder (default /tmp/g4-random-SIZE)")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    ck = Path(a.dir or f"/tmp/g4-random-{a.size}")
    if not (ck / "config.json").exists():
        t = time.perf_counter()
        g4.write_random_checkpoint(g4.CONFIGS[a.size], ck, progress=True)
        print(f"wrote {ck} in {time.perf_counter() - t:.0f} s")
    cfg, params = g4.load_checkpoint(ck, dtype=dtype)
    params = g4.tree_map(lambda x: x.to(a.device), params)
    ref = reference(cfg, params, a.device)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for p in range(a.prompts):
        n = (16, 100, 600)[p % 3]  # the last prompt is longer than the 512-token sliding window
        prompt = torch.randint(3, cfg.vocab_size, (1, n), generator=gen).to(a.device)
        t = time.perf_counter()
        cache = g4.init_cache(cfg, max_seq_len=n + a.steps + 1, dtype=dtype)
        cache = g4.tree_map(lambda x: x.to(a.device), cache)
        ours, cache = g4.forward(params, cfg, prompt, torch.arange(n, device=a.device), cache, last=1)
        out = ref(input_ids=prompt, use_cache=True, logits_to_keep=1)
        theirs, pkv = out.logits, out.past_key_values
        diffs, agree = [float((ours - theirs).abs().max())], [bool(ours.argmax() == theirs.argmax())]
        for i in range(a.steps):
            tok = theirs[:, -1:].argmax(-1)
            ours, cache = g4.forward(params, cfg, tok, torch.tensor([n + i], device=a.device), cache)
            out = ref(input_ids=tok, past_key_values=pkv, use_cache=True)
            theirs, pkv = out.logits, out.past_key_values
            diffs.append(float((ours - theirs).abs().max()))
            agree.append(bool(ours[0, -1].argmax() == theirs[0, -1].argmax()))
        rows.append(
            {
                "prompt_tokens": n,
                "max_abs_logit_diff": max(diffs),
                "greedy_agree": f"{sum(agree)}/{len(agree)}",
                "seconds": time.perf_counter() - t,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print(
        "| size | dtype | device | prompt tokens | max abs logit diff | greedy agreement |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {a.size} | {a.dtype} | {a.device} | {r['prompt_tokens']} | {r['max_abs_logit_diff']:.3g} | "
            f"{r['greedy_agree']} |"
        )
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")


if __name__ == "__main__":
    main()
