"""Gemma 4's audio tower in a .pte: export cost, size, encoder time per second of audio, error vs transformers.

    python bench/audio.py [--quant none 8da4w] [--seconds 1 5 10 30] [--rounds 5] [--out bench/results/audio-e2b.json]

The tower is E2B's and E4B's (`AudioConfig()`: 12 conformer layers of width 1024, random weights); the text
decoder beside it is the tiny one, so the export and the .pte are the tower's (the embedder projects to
the tiny width, 128, not E2B's 1536: 0.2M of its 2.4M parameters). Per quantization of the tower's
linears: a child process exports it (wall time, peak RSS), then in this process, per clip length, random
16 kHz noise -> `g4.audio.features` -> `audio_encoder` (`PteModel.encode_audio`, frames padded to the
example's grid) `--rounds` times after a warm-up call: median (min-max) ms, and ms per second of audio;
transformers' fp32 `Gemma4AudioModel` + `Gemma4MultimodalEmbedder` on the same weights and clip, timed
the same way and compared (max |diff| over the largest |value|). A text-only tiny export gives the size
the tower adds.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs
import numpy as np
import torch

import g4
from g4.audio import SAMPLE_RATE, features
from g4.config import AudioConfig, Towers

CFG = attrs.evolve(g4.CONFIGS["tiny"], towers=Towers(audio=AudioConfig()))


def export(out: str, quant: str, group: int) -> None:
    """(child) Exports CFG's random weights with the tower's linears in `quant`; '' exports text only."""
    from g4.export import ExportOptions, Quantizer, export_pte
    from g4.params import build, init_value

    cfg = CFG if quant else g4.CONFIGS["tiny"]
    opts = ExportOptions(audio=bool(quant), audio_quantize=quant or "none", group_size=group, max_seq_len=1024)
    q, gen = Quantizer(opts), torch.Generator().manual_seed(0)
    params = build(cfg, lambda p, s: q(p, init_value(p, s, cfg, gen)))
    export_pte(cfg, q.finish(params), out, opts, log=lambda s: None)


def run_export(out: Path, quant: str, group: int) -> dict:
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--child", str(out), quant, str(group)], check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child so far
    return {"wall_s": time.perf_counter() - t, "peak_rss_children_bytes": peak, "pte_bytes": out.stat().st_size}


def timed(fn, rounds: int) -> tuple[torch.Tensor, list[float]]:
    out = fn()  # warm-up (XNNPACK plans for the shape)
    ms = []
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        ms.append((time.perf_counter() - t) * 1e3)
    return out, ms


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def reference(params: g4.Params):
    """transformers' tower and embedder holding the same weights (fp32, eager)."""
    import transformers
    from transformers.models.gemma4 import modeling_gemma4 as m

    from g4.hf import to_hf_state_dict, towers_to_hf

    assert CFG.towers is not None
    hf = transformers.Gemma4AudioConfig(**towers_to_hf(CFG.towers)["audio_config"])
    tower = m.Gemma4AudioModel(hf).eval()
    embed = m.Gemma4MultimodalEmbedder(hf, transformers.Gemma4TextConfig(hidden_size=CFG.hidden_size)).eval()
    sd = to_hf_state_dict(params)
    for module, prefix in ((tower, "model.audio_tower."), (embed, "model.embed_audio.")):
        module.load_state_dict({k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}, strict=True)

    def run(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = tower(x, mask)
        return embed(out.last_hidden_state)[out.attention_mask]

    return run


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        export(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "", int(sys.argv[4]) if len(sys.argv) > 4 else 32)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", nargs="+", default=["none", "8da4w"])
    ap.add_argument("--group-size", type=int, default=128, help="8da4w groups (the official example's: 128)")
    ap.add_argument("--seconds", type=float, nargs="+", default=[1, 5, 10, 30])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    work = Path(tempfile.mkdtemp(prefix="g4-audio-"))
    text = run_export(work / "text.pte", "", a.group_size)
    print(f"tiny text-only .pte: {text['pte_bytes'] / 2**20:.1f} MiB", flush=True)
    params = g4.init_params(CFG, seed=0)
    ref = reference(params)
    r = np.random.RandomState(0)
    clips = {s: features([(r.randn(int(s * SAMPLE_RATE)) * 0.1).astype(np.float32)]) for s in a.seconds}
    hf_ms = {s: timed(lambda x=x, m=m: ref(x, m), a.rounds) for s, (x, m) in clips.items()}
    rows: dict = {"text_only_pte_bytes": text["pte_bytes"], "transformers_fp32": {}}
    for s, (_, ms) in hf_ms.items():
        rows["transformers_fp32"][s] = ms
        print(
            f"transformers fp32, {s:g} s: {summary(ms)} ms, {statistics.median(ms) / s:.1f} ms per second", flush=True
        )
    for q in a.quant:
        ex = run_export(work / f"audio-{q}.pte", q, a.group_size)
        added = (ex["pte_bytes"] - text["pte_bytes"]) / 2**20
        print(
            f"{q}: export {ex['wall_s']:.0f} s, peak RSS (largest child so far) "
            f"{ex['peak_rss_children_bytes'] / 2**30:.2f} GiB, .pte {ex['pte_bytes'] / 2**20:.1f} MiB "
            f"(the tower adds {added:.1f} MiB)",
            flush=True,
        )
        pte = g4.PteModel(work / f"audio-{q}.pte")
        ex["clips"] = {}
        for s, (x, m) in clips.items():
            got, ms = timed(lambda x=x, m=m, pte=pte: pte.encode_audio(x, m), a.rounds)
            want = hf_ms[s][0]
            err = float((got - want).abs().max() / want.abs().max())
            ex["clips"][s] = {"ms": ms, "soft_tokens": got.shape[0], "max_abs_diff_over_max_abs": err}
            print(
                f"  {s:g} s ({got.shape[0]} soft tokens): audio_encoder {summary(ms)} ms, "
                f"{statistics.median(ms) / s:.1f} ms per second of audio "
                f"({statistics.median(hf_ms[s][1]) / statistics.median(ms):.2f}x transformers fp32); "
                f"max |pte - transformers| / max |value| {err:.2e}",
                flush=True,
            )
        rows[q] = ex
    if a.out:
        cmd = "python bench/audio.py " + " ".join(sys.argv[1:])
        Path(a.out).write_text(json.dumps({"command": cmd, "group_size": a.group_size, **rows}, indent=1))


if __name__ == "__main__":
    main()
