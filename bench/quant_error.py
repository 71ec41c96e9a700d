"""How far 8da4w + 8-bit embeddings move the logits from fp32: g4's .pte and ExecuTorch's own exporter's, same weights.

    python bench/quant_error.py [--group-size 32]

The weights are the tiny model's random checkpoint of tests/conftest.py (seed 0, fp32; written here in
the hub's multimodal layout, which the peer reads: the same values). Both .pte files run the test's
60-token sequence (a 20-token prefill, then 40 single steps) and are compared with `g4.forward` in
fp32 on the same tokens: cosine over all logits and max |diff| / max |fp32|. The peer's numbers set
the bound `tests/test_export.py` holds g4's 8da4w export to. Writes bench/results/quant_error-tiny.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from pte_vs_et import EXPORT_ET, ROOT, et_variant_json, run_child, versions  # noqa: E402

import g4  # noqa: E402

CTX = 96
SEQ = torch.randint(0, g4.CONFIGS["tiny"].vocab_size, (1, 60), generator=torch.Generator().manual_seed(1))


def run(kind: str, pte: Path, H: int) -> torch.Tensor:
    """Logits `[41, V]` of positions 19..59: prefill 20 tokens, then one token a step."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.kernels import quantized  # noqa: F401
    from executorch.runtime import Runtime

    m = Runtime.get().load_program(str(pte)).load_method("forward" if kind == "g4" else "text_decoder")

    def step(tokens: torch.Tensor, start: int) -> torch.Tensor:
        T = tokens.shape[1]
        if kind == "g4":
            return m.execute([tokens, torch.tensor([start])])[0].reshape(-1)
        return m.execute([tokens, torch.arange(start, start + T), torch.zeros(1, T, H)])[0].reshape(-1)

    out = [step(SEQ[:, :20], 0)]
    out += [step(SEQ[:, t : t + 1], t) for t in range(20, 60)]
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group-size", default="32")
    a = ap.parse_args()
    cfg = g4.CONFIGS["tiny"]
    work = Path(tempfile.mkdtemp(prefix="g4-quant-error-"))
    ck = work / "ck"
    g4.write_random_checkpoint(cfg, ck, seed=0, dtype=torch.float32, multimodal=True)
    from g4.export.__main__ import main as export

    ours, peer = work / "g4.pte", work / "et.pte"
    args = ["--max-seq-len", str(CTX), "--max-chunk", "20", "--quantize", "8da4w", "--embedding-quantize", "8"]
    assert export([str(ours), "--checkpoint", str(ck), *args, "--group-size", a.group_size]) == 0
    # The peer traces with a 770-token example, so it needs a longer context; the logits do not depend on it.
    r = run_child(EXPORT_ET, str(ck), str(peer), "8da4w", "1024", a.group_size, et_variant_json(cfg, work / "v"))
    assert "error" not in r, r
    _, params = g4.load_checkpoint(ck)
    with torch.no_grad():
        fp32 = g4.forward(params, cfg, SEQ, torch.arange(60))[0][0, 19:]
    rows = {}
    for kind, pte in (("g4", ours), ("executorch", peer)):
        got = run(kind, pte, cfg.hidden_size)
        rows[kind] = {
            "cosine_vs_fp32": torch.nn.functional.cosine_similarity(got.flatten(), fp32.flatten(), dim=0).item(),
            "max_rel_vs_fp32": ((got - fp32).abs().max() / fp32.abs().max()).item(),
            "argmax_agree_of_41": int((got.argmax(-1) == fp32.argmax(-1)).sum()),
        }
        print(kind, rows[kind])
    out = ROOT / "bench" / "results" / "quant_error-tiny.json"
    out.write_text(json.dumps({"versions": versions(), "group_size": a.group_size, "results": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
