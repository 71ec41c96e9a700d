"""The vision tower in a .pte: encoder time per image, and the .pte's error against transformers.

    python bench/vision.py time PTE [--budgets 70 280] [--rounds 5] [--out bench/results/NAME.json]
    python bench/vision.py error PTE --checkpoint DIR [--budget 280]

`time`: per soft-token budget, one random image that fills it, `vision_encoder` called `--rounds`
times after a warm-up call in one process; median (min-max) ms per image, and ms per soft token;
then the prefill of those soft tokens through `text_decoder` (a prompt of the image alone), median.
`error`: the same image through the .pte's `vision_encoder` and through transformers'
`Gemma4VisionModel` + `Gemma4MultimodalEmbedder` built from the checkpoint's towers only (its text
decoder is never loaded): max |diff| and the largest |value|.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import g4
from g4.config import VisionConfig


def image(v: VisionConfig, soft: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random image of `soft` soft tokens laid out as one row of k x k blocks per 10 (HF's patch order)."""
    k = v.pooling_kernel_size
    bw = min(soft, 10)
    bh = soft // bw
    h, w = bh * k, bw * k  # in patches
    n = h * w
    pixels = torch.rand(1, n, 3 * v.patch_size**2, generator=torch.Generator().manual_seed(seed))
    gx, gy = torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy")
    return pixels, torch.stack([gx, gy], -1).reshape(1, n, 2)


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def time_pte(a: argparse.Namespace) -> None:
    pte = g4.PteModel(a.pte)
    assert pte.vision is not None, f"{a.pte} has no vision_encoder (export it with --vision)"
    rows = []
    for budget in a.budgets:
        pixels, pos = image(pte.vision.config, budget)
        soft = pte.encode(pixels, pos)  # warm-up: XNNPACK plans for this shape
        ms = []
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            soft = pte.encode(pixels, pos)
            ms.append((time.perf_counter() - t0) * 1e3)
        prompt = [pte.bos_id, *pte.vision.placeholders(soft.shape[0])]
        pre = []
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            pte.verify(prompt, 0, soft=soft)
            pre.append((time.perf_counter() - t0) * 1e3)
        rows.append(
            {
                "soft_tokens": soft.shape[0],
                "patches": pixels.shape[1],
                "encode_ms": ms,
                "prefill_ms": pre,
                "encode_ms_per_soft_token": statistics.median(ms) / soft.shape[0],
            }
        )
        print(
            f"{soft.shape[0]} soft tokens ({pixels.shape[1]} patches): vision_encoder {summary(ms)} ms per image, "
            f"{rows[-1]['encode_ms_per_soft_token']:.2f} ms per soft token; prefill of the image "
            f"({len(prompt)} tokens) {summary(pre)} ms",
            flush=True,
        )
    if a.out:
        Path(a.out).write_text(json.dumps({"pte": a.pte, "rounds": a.rounds, "rows": rows}, indent=1))


def error(a: argparse.Namespace) -> None:
    import transformers

    from g4.checkpoint import read_towers
    from g4.hf import towers_to_hf

    towers = read_towers(a.checkpoint)
    assert towers.vision is not None
    hf = transformers.Gemma4VisionConfig(**towers_to_hf(towers)["vision_config"])
    hf._attn_implementation = "eager"
    tower = transformers.models.gemma4.modeling_gemma4.Gemma4VisionModel(hf).eval()
    cfg = g4.checkpoint.read_config(a.checkpoint)
    text = transformers.Gemma4TextConfig(hidden_size=cfg.hidden_size)
    embed = transformers.models.gemma4.modeling_gemma4.Gemma4MultimodalEmbedder(hf, text).eval()
    from safetensors import safe_open

    want_keys = {f"model.vision_tower.{k}": k for k in tower.state_dict()}
    want_keys |= {f"model.embed_vision.{k}": k for k in embed.state_dict()}
    sd_tower, sd_embed = {}, {}
    for f in sorted(Path(a.checkpoint).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for key in h.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if key in want_keys:
                    (sd_tower if key.startswith("model.vision_tower.") else sd_embed)[want_keys[key]] = h.get_tensor(
                        key
                    ).float()
    tower.load_state_dict(sd_tower, strict=True)
    embed.load_state_dict(sd_embed, strict=True)
    pte = g4.PteModel(a.pte)
    pixels, pos = image(towers.vision, a.budget)
    with torch.no_grad():
        want = embed(tower(pixel_values=pixels, pixel_position_ids=pos).last_hidden_state)
    got = pte.encode(pixels, pos)
    print(
        f"{got.shape[0]} soft tokens: max |pte - transformers| {float((got - want).abs().max()):.3g}, "
        f"largest |value| {float(want.abs().max()):.3g}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("time")
    t.add_argument("pte")
    t.add_argument("--budgets", type=int, nargs="+", default=[70, 280])
    t.add_argument("--rounds", type=int, default=5)
    t.add_argument("--out")
    e = sub.add_parser("error")
    e.add_argument("pte")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--budget", type=int, default=280)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    (time_pte if a.cmd == "time" else error)(a)


if __name__ == "__main__":
    main()
