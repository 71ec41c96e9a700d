"""`python -m g4.checkpoint random SIZE DIR`: write a random-weight checkpoint in the Hugging Face format."""

from __future__ import annotations

import argparse
import sys

import attrs
import torch

from g4.checkpoint import write_random_assistant, write_random_checkpoint
from g4.config import ASSISTANTS, CONFIGS, TOWERS


def main(argv: list[str] | None = None) -> int:
    """`python -m g4.checkpoint random SIZE DIR`: write a random HF-format checkpoint."""
    ap = argparse.ArgumentParser(prog="python -m g4.checkpoint", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    rnd = sub.add_parser("random", help="write a random-weight checkpoint of a named size")
    rnd.add_argument("size", choices=sorted(CONFIGS))
    rnd.add_argument("dir")
    rnd.add_argument("--seed", type=int, default=0)
    rnd.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    rnd.add_argument("--max-shard-gb", type=float, default=4.0)
    rnd.add_argument("--assistant", action="store_true", help="the size's assistant drafter (fp32) instead")
    rnd.add_argument("--vision", action="store_true", help="the hub's multimodal layout with the size's vision tower")
    rnd.add_argument("--audio", action="store_true", help="the hub's multimodal layout with the size's audio tower")
    a = ap.parse_args(argv)
    if a.assistant and a.size not in ASSISTANTS:
        print(f"error: --assistant: no assistant for {a.size} (have: {', '.join(ASSISTANTS)})", file=sys.stderr)
        return 2
    if (a.vision or a.audio) and a.size not in TOWERS:
        kind = "vision" if a.vision else "audio"
        print(f"error: --{kind}: no {kind} tower for {a.size} (have: {', '.join(TOWERS)})", file=sys.stderr)
        return 2
    towers = TOWERS[a.size].only(a.vision, a.audio) if a.size in TOWERS else None
    cfg = attrs.evolve(CONFIGS[a.size], towers=towers)
    try:
        out = (
            write_random_assistant(ASSISTANTS[a.size], a.dir, a.seed)
            if a.assistant
            else write_random_checkpoint(
                cfg,
                a.dir,
                seed=a.seed,
                dtype=getattr(torch, a.dtype),
                max_shard_bytes=int(a.max_shard_gb * (1 << 30)),
                progress=True,
                multimodal=towers is not None,
            )
        )
    except OSError as e:
        print(f"error: cannot write {a.dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
