"""`python -m g4.export SIZE OUT.pte`: export a Gemma 4 text decoder to an ExecuTorch .pte."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from g4.checkpoint import CheckpointError, load_checkpoint, read_config
from g4.config import CONFIGS, Config
from g4.export import ExportOptions, Quantizer, export_pte, memory
from g4.params import build, init_value

TINY_TOKENIZER = Path(__file__).parent.parent / "assets" / "tiny_tokenizer.json"
HUB_REPOS = {"e2b": "gemma-4-E2B", "e4b": "gemma-4-E4B"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


class UsageError(Exception):
    """Bad arguments or inputs: one line, exit status 2."""


def hub_snapshot(size: str) -> Path | None:
    """A local Hugging Face cache snapshot of google/gemma-4-{E2B,E4B}[-it], if one exists."""
    hub = Path(
        os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub"
    )
    repo = HUB_REPOS.get(size)
    if repo is None or not hub.is_dir():
        return None
    for name in (f"models--google--{repo}-it", f"models--google--{repo}"):
        for snap in sorted((hub / name / "snapshots").glob("*"), reverse=True):
            if (snap / "config.json").exists():
                return snap
    return None


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(
        prog="python -m g4.export",
        description="Export a Gemma 4 text decoder to an ExecuTorch .pte (XNNPACK) for ExecuTorch's LLM runner.",
    )
    ap.add_argument("size", help=f"named size: {', '.join(CONFIGS)}")
    ap.add_argument("out", help="output .pte path (written to a temporary file, then renamed)")
    ap.add_argument("--checkpoint", help="Hugging Face checkpoint folder (config.json + safetensors)")
    ap.add_argument("--random-weights", action="store_true", help="seeded random weights instead of a checkpoint")
    ap.add_argument("--seed", type=int, default=0, help="seed for --random-weights (default 0)")
    ap.add_argument("--max-seq-len", type=int, default=None, help="KV cache length / max context (default 1024)")
    ap.add_argument("--max-chunk", type=int, default=None, help="longest prefill per call (default min(256, ctx))")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--quantize", choices=["none", "8da8w", "8da4w"], default="none", help="linear layers")
    ap.add_argument("--group-size", type=int, default=32, help="int4 group size (default 32)")
    ap.add_argument(
        "--embedding-quantize",
        type=int,
        choices=[0, 4, 8],
        default=0,
        help="bits for the token and per-layer embedding tables (0: none)",
    )
    ap.add_argument("--kv-cache", choices=["fp32", "int8"], default="fp32", help="KV cache dtype (int8: fp32 only)")
    return ap.parse_args(argv)


def run(a: argparse.Namespace) -> int:
    """Loads or makes weights, quantizes them as they arrive, exports; prints a summary."""
    t_start = time.perf_counter()
    if a.size not in CONFIGS:
        raise UsageError(f"unknown size {a.size!r}; choose one of {', '.join(CONFIGS)}")
    out = Path(a.out)
    if not out.parent.is_dir():
        raise UsageError(f"output folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UsageError(f"cannot write {out}")
    try:
        opts = ExportOptions(
            max_seq_len=a.max_seq_len or 1024,
            max_chunk=a.max_chunk,
            dtype=a.dtype,
            quantize=a.quantize,
            group_size=a.group_size,
            embedding_quantize=a.embedding_quantize,
            kv_cache=a.kv_cache,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None

    ckpt = Path(a.checkpoint) if a.checkpoint else None
    if ckpt is None and not a.random_weights and a.size != "tiny":
        ckpt = hub_snapshot(a.size)
        if ckpt is None:
            raise UsageError(
                f"no checkpoint for {a.size}: pass --checkpoint DIR (a Hugging Face folder), or --random-weights; "
                f"no google/{HUB_REPOS[a.size]}[-it] snapshot found in the local Hugging Face cache"
            )
    q = Quantizer(opts)
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    if ckpt is not None:
        try:
            cfg: Config = read_config(ckpt)
            want = CONFIGS[a.size]
            if a.size != "tiny" and (cfg.hidden_size, cfg.num_hidden_layers) != (
                want.hidden_size,
                want.num_hidden_layers,
            ):
                raise UsageError(
                    f"{ckpt} holds a model with hidden_size {cfg.hidden_size} and "
                    f"{cfg.num_hidden_layers} layers, not {a.size}"
                )
            cfg, weights = load_checkpoint(ckpt, dtype=None, transform=q, progress=True)
        except CheckpointError as e:
            raise UsageError(str(e)) from None
        source = str(ckpt)
    else:
        cfg = CONFIGS[a.size]
        gen = torch.Generator().manual_seed(a.seed)
        weights = build(cfg, lambda p, shape: q(p, init_value(p, shape, cfg, gen)))
        source = f"random weights (seed {a.seed})"
    say(
        f"load + quantize ({opts.quantize}, embeddings {opts.embedding_quantize or 'none'}): "
        f"{time.perf_counter() - t0:.1f} s{memory()}"
    )
    if q.skipped:
        say(f"  left unquantized (input width not a multiple of --group-size {opts.group_size}): {len(q.skipped)}")
    export_pte(cfg, q.finish(weights), out, opts, log=say, quantized=True, consume=True)
    if ckpt is not None:  # the tokenizer travels with the .pte, so `python -m g4.run OUT.pte` finds it
        for name in TOKENIZER_FILES:
            if (ckpt / name).exists():
                shutil.copyfile(ckpt / name, out.parent / name)
    elif a.size == "tiny":
        shutil.copyfile(TINY_TOKENIZER, out.parent / "tokenizer.json")
    size = out.stat().st_size
    print(
        f"wrote {out}: {size / 2**20:.1f} MiB in {time.perf_counter() - t_start:.0f} s | {a.size} from {source} | "
        f"{opts.dtype}, linear {opts.quantize}"
        + (f" (group {opts.group_size})" if opts.quantize == "8da4w" else "")
        + f", embeddings {opts.embedding_quantize or 'none'}{'-bit' if opts.embedding_quantize else ''}, "
        f"kv {opts.kv_cache} | context {opts.max_seq_len}, prefill chunk {opts.chunk}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input exits with status 2 and one line on stderr."""
    a = parse(argv)
    try:
        return run(a)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
