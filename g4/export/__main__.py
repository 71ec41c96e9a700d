"""`python -m g4.export [SIZE] OUT.pte [--checkpoint DIR]`: export a Gemma 4 text decoder to an ExecuTorch .pte."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import attrs
import torch

from g4.chat import stop_ids
from g4.checkpoint import CheckpointError, load_assistant, load_checkpoint, read_config, read_towers
from g4.config import CONFIGS, TOWERS, Config
from g4.export import (
    ExportOptions,
    Quantizer,
    check_drafter,
    check_towers,
    export_pte,
    memory,
    quantize_assistant,
)
from g4.export.shim import DraftSpec
from g4.params import build, init_value
from g4.run import TINY

HUB_REPOS = {"e2b": "gemma-4-E2B", "e4b": "gemma-4-E4B", "31b": "gemma-4-31B", "26b-a4b": "gemma-4-26B-A4B"}
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
    """The command line; the export options' flags, choices and defaults come from `ExportOptions`."""
    ap = argparse.ArgumentParser(
        prog="python -m g4.export",
        description="Export a Gemma 4 text decoder to an ExecuTorch .pte (XNNPACK) for ExecuTorch's LLM runner.",
    )
    ap.add_argument("size", nargs="?", help=f"named size ({', '.join(CONFIGS)}); optional with --checkpoint")
    ap.add_argument("out", help="output .pte path (written to a temporary file, then renamed)")
    ap.add_argument("--checkpoint", help="Hugging Face checkpoint folder (config.json + safetensors)")
    ap.add_argument("--random-weights", action="store_true", help="seeded random weights instead of a checkpoint")
    ap.add_argument("--seed", type=int, default=0, help="seed for --random-weights (default 0)")
    ap.add_argument("--force", action="store_true", help="replace differing tokenizer files next to OUT")
    ap.add_argument("--assistant", help="assistant checkpoint folder (gemma4_assistant): adds a `draft` method")
    ap.add_argument("--draft-tokens", type=int, help="most tokens drafted per round (default: the assistant's)")
    for f in attrs.fields(ExportOptions):
        choices = f.metadata["choices"]
        if isinstance(f.default, bool):
            flag, action = ("--no-", "store_false") if f.default else ("--", "store_true")
            help = f"turn off: {f.metadata['help']}" if f.default else f.metadata["help"]
            ap.add_argument(flag + f.name.replace("_", "-"), dest=f.name, action=action, help=help)
            continue
        ap.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(choices[0]) if choices else int,
            choices=choices,
            default=f.default,
            help=f"{f.metadata['help']} (default: {f.default})",
        )
    return ap.parse_args(argv)


def is_tiny(size: str | None) -> bool:
    """The tiny sizes: random weights, and the tiny model's tokenizer."""
    return size is not None and size.startswith("tiny")


def weights_source(a: argparse.Namespace) -> tuple[Config, Path | None, str]:
    """The config, the checkpoint folder (None: seeded random weights) and where the weights come from."""
    if a.size is not None and a.size not in CONFIGS:
        raise UsageError(f"unknown size {a.size!r}; choose one of {', '.join(CONFIGS)}")
    ckpt, found = (Path(a.checkpoint) if a.checkpoint else None), ""
    if ckpt is None and a.size is None:
        raise UsageError("give a SIZE, or --checkpoint DIR")
    if ckpt is None and (a.random_weights or is_tiny(a.size)):
        return CONFIGS[a.size], None, f"random weights (seed {a.seed})"
    if ckpt is None:
        ckpt, found = hub_snapshot(a.size), " (found in the Hugging Face cache)"
        if ckpt is None:
            raise UsageError(
                f"no checkpoint for {a.size}: pass --checkpoint DIR (a Hugging Face folder), or --random-weights; "
                f"no google/{HUB_REPOS[a.size]}[-it] snapshot found in the local Hugging Face cache"
            )
    try:
        cfg = read_config(ckpt)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    return _checked(cfg, a.size, ckpt), ckpt, f"{ckpt}{found}"


def _checked(cfg: Config, size: str | None, ckpt: Path) -> Config:
    """`cfg`, which must equal the named size in every field if one was given."""
    if size is None or cfg == CONFIGS[size]:
        return cfg
    want, got = attrs.asdict(CONFIGS[size]), attrs.asdict(cfg)
    diff = ", ".join(f"{k} {got[k]!r} (not {want[k]!r})" for k in want if got[k] != want[k])
    raise UsageError(f"{ckpt}/config.json is not {size}: {diff}; omit SIZE to export the checkpoint as it is")


def tokenizer_files(folder: Path, out: Path, force: bool) -> list[tuple[Path, Path]]:
    """(source, destination) of each tokenizer file of `folder` to copy next to `out`. An identical file
    already there is left alone; a differing one is a UsageError unless `force`."""
    plan = []
    for src in [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]:
        dst = out.parent / src.name
        if dst.is_file() and dst.read_bytes() == src.read_bytes():
            continue
        if dst.exists() and not force:
            raise UsageError(f"{dst} exists and differs from {src}; pass --force to replace it, or export elsewhere")
        plan.append((src, dst))
    return plan


def run(a: argparse.Namespace) -> int:
    """Loads or makes weights, quantizes them as they arrive, exports; prints a summary."""
    t_start = time.perf_counter()
    out = Path(a.out)
    if out.is_dir():
        raise UsageError(f"{out} is a directory; give the .pte file to write")
    if not out.parent.is_dir():
        raise UsageError(f"output folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UsageError(f"cannot write {out}")
    try:
        opts = ExportOptions(**{f.name: getattr(a, f.name) for f in attrs.fields(ExportOptions)})
        cfg, ckpt, source = weights_source(a)
        if opts.towers and ckpt is None:  # random weights: the size's towers
            if a.size not in TOWERS:
                flag = f"--{opts.towers[0]}"
                raise UsageError(f"{flag}: no {opts.towers[0]} tower for {a.size} ({', '.join(TOWERS)} have one)")
            # all of them drawn (as `init_params` does), whichever are exported: the same weights as `--eager`
            cfg = attrs.evolve(cfg, towers=TOWERS[a.size])
        elif opts.towers and ckpt is not None:  # fail before any weight is read
            cfg = attrs.evolve(cfg, towers=read_towers(ckpt, opts.towers))
        opts.check(cfg)  # e.g. an int4 group size that does not divide a width of this config
        # The tokenizer travels with the .pte: the checkpoint's, or the tiny model's (random E2B/E4B weights
        # have none). The runners stop at the .pte's eos ids: Gemma 4's end of turn and tool-call stops too.
        tok_folder = ckpt if ckpt is not None else TINY if is_tiny(a.size) else None
        stops = stop_ids(tok_folder, cfg.eos_token_id)
        drafter = assistant(a, cfg, opts)
        check_towers(cfg, None, opts)
    except ValueError as e:  # GenerateError, ConfigError too
        raise UsageError(str(e)) from None
    tokenizers = [] if tok_folder is None else tokenizer_files(tok_folder, out, a.force)
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    say(f"weights: {source}")
    q = Quantizer(opts)
    t0 = time.perf_counter()
    if ckpt is not None:
        try:
            cfg, weights = load_checkpoint(ckpt, dtype=None, transform=q, progress=True, towers=opts.towers)
        except CheckpointError as e:
            raise UsageError(str(e)) from None
    else:
        gen = torch.Generator().manual_seed(a.seed)
        weights = build(cfg, lambda p, shape: q(p, init_value(p, shape, cfg, gen)))
    say(
        f"load + quantize ({opts.quantize}, embeddings {opts.embedding_quantize or 'none'}): "
        f"{time.perf_counter() - t0:.1f} s{memory()}"
    )
    try:
        export_pte(attrs.evolve(cfg, eos_token_id=stops), q.finish(weights), out, opts, log=say, drafter=drafter)
        for src, dst in tokenizers:  # the tokenizer travels with the .pte, so `python -m g4.run OUT.pte` finds it
            say(f"  {'replaced' if dst.exists() else 'wrote'} {dst} (from {src})")
            shutil.copyfile(src, dst)
    except OSError as e:  # a full disk: the .pte is written through a temporary file, so nothing is left
        raise UsageError(f"{e.filename or out}: cannot write ({e.strerror or e})") from None
    size = out.stat().st_size
    print(
        f"wrote {out}: {size / 2**20:.1f} MiB in {time.perf_counter() - t_start:.0f} s | "
        f"{a.size or 'checkpoint'} from {source} | {opts.dtype}, linear {opts.quantize}"
        + (f" (group {opts.group_size})" if opts.quantize == "8da4w" else "")
        + f", embeddings {opts.embedding_quantize or 'none'}{'-bit' if opts.embedding_quantize else ''}, "
        f"kv {opts.kv_cache} | context {opts.max_seq_len}, prefill chunk {opts.chunk}"
        + (f" | drafter: up to {drafter.tokens} tokens a round" if drafter else "")
        + (
            f" | vision: up to {opts.max_soft_tokens} soft tokens an image, linear {opts.vision_quantize}"
            if opts.vision
            else ""
        )
        + (f" | audio: up to 30 s a clip, linear {opts.audio_quantize}" if opts.audio else "")
    )
    return 0


def assistant(a: argparse.Namespace, cfg: Config, opts: ExportOptions) -> DraftSpec | None:
    """The --assistant drafter, checked against the target and the options and quantized as they say."""
    if a.assistant is None:
        if a.draft_tokens is not None:
            raise UsageError("--draft-tokens needs --assistant")
        return None
    try:
        acfg, params = load_assistant(a.assistant)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    try:
        acfg.check_target(cfg)
    except ValueError as e:
        raise UsageError(f"--assistant {a.assistant}: {e}") from None
    tokens = acfg.draft_tokens if a.draft_tokens is None else a.draft_tokens
    check_drafter(opts, tokens)
    return DraftSpec(acfg, quantize_assistant(acfg, params, opts), tokens)


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
