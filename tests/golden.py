"""A syrupy extension for golden/: readable text snapshots, exact where exact, float tensors with tolerances.

A snapshot is a dict of named entries. Tensors (floating) are stored as header (shape, dtype,
tolerance), summary statistics and every value (one line per row of the last dim) at 8 significant
digits, and compared value by value within the stated `rtol`/`atol`; everything else (ints, token
ids, strings, shapes, integer tensors) is stored as text and compared exactly. One file per snapshot
under golden/<test module>/.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
FP32 = dict(rtol=1e-5, atol=1e-6)  # fp32 eager: reruns on other machines differ by reduction order
_NUM = re.compile(r"[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|inf|nan)", re.I)


class Approx:
    """A float tensor to be compared within rtol/atol (defaults: fp32 eager)."""

    def __init__(self, t: torch.Tensor, rtol: float = FP32["rtol"], atol: float = FP32["atol"]):
        self.t, self.rtol, self.atol = t.detach().float(), rtol, atol


def _g(x: float) -> str:
    return f"{x:.8e}"


def _tensor_lines(name: str, a: Approx) -> list[str]:
    t = a.t
    flat = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
    lines = [
        f"## {name} shape={list(t.shape)} rtol={a.rtol:g} atol={a.atol:g}",
        "stats " + " ".join(f"{k}={_g(v)}" for k, v in _stats(t).items()),
    ]
    lines += [f"row {i}: " + " ".join(_g(x) for x in row) for i, row in enumerate(flat.tolist())]
    return lines


def _stats(t: torch.Tensor) -> dict[str, float]:
    t = t.double()
    return {
        "mean": float(t.mean()),
        "std": float(t.std()) if t.numel() > 1 else 0.0,
        "min": float(t.min()),
        "max": float(t.max()),
        "absmean": float(t.abs().mean()),
    }


def render(data: dict[str, Any]) -> str:
    """The snapshot text of a dict of entries."""
    out: list[str] = []
    for name, v in data.items():
        if isinstance(v, Approx):
            out += _tensor_lines(name, v)
        elif isinstance(v, torch.Tensor) and v.dim() == 2:  # e.g. a mask: one line per row
            assert not v.is_floating_point(), f"{name}: wrap float tensors in Approx(...)"
            out.append(f"== {name} shape={list(v.shape)} dtype={v.dtype}")
            out += [" ".join(str(x) for x in row) for row in v.tolist()]
        elif isinstance(v, torch.Tensor):
            assert not v.is_floating_point(), f"{name}: wrap float tensors in Approx(...)"
            out.append(f"== {name} shape={list(v.shape)} dtype={v.dtype}: {v.flatten().tolist()}")
        elif isinstance(v, dict):  # one line per key, so a diff names the key
            out.append(f"== {name}")
            out += [f"{k}: {x!r}" for k, x in v.items()]
        else:
            out.append(f"== {name}: {v!r}")
    return "\n".join(out) + "\n"


def _blocks(text: str) -> dict[str, list[str]]:
    blocks: dict[str, list[str]] = {}
    key = None
    for line in text.splitlines():
        if line.startswith(("## ", "== ")):
            key = line
            blocks[key] = []
        elif key is not None:
            blocks[key].append(line)
    return blocks


def differences(new: str, old: str) -> Iterator[str]:
    """Human-readable differences of `new` against the golden `old`; none means they match."""
    a, b = _blocks(new), _blocks(old)
    for key in b.keys() - a.keys():
        yield f"missing now: {key}"
    for key in a.keys() - b.keys():
        yield f"new entry (not in golden): {key}"
    for key in a.keys() & b.keys():
        if a[key] == b[key]:
            continue
        if key.startswith("== "):  # exact entries: the lines that differ
            gone, added = [x for x in b[key] if x not in a[key]], [x for x in a[key] if x not in b[key]]
            yield f"{key[3:]}: golden {gone}, now {added}" if gone or added else f"{key[3:]}: order changed"
            continue
        m = re.match(r"## (\S+) .*rtol=(\S+) atol=(\S+)", key)
        assert m is not None, key
        name, rtol, atol = m.group(1), float(m.group(2)), float(m.group(3))
        if len(a[key]) != len(b[key]):
            yield f"{name}: row count changed"
            continue
        for la, lb in zip(a[key], b[key], strict=True):
            label = la.split(":")[0] if la.startswith("row") else "stats"
            na, nb = (
                [float(x) for x in _NUM.findall(la.split(":", 1)[1] if ":" in la else la)],
                [float(x) for x in _NUM.findall(lb.split(":", 1)[1] if ":" in lb else lb)],
            )
            if len(na) != len(nb):
                yield f"{name} [{label}]: {len(nb)} values in the golden, {len(na)} now"
                continue
            names = re.findall(r"(\w+)=", la) if label == "stats" else [f"col {j}" for j in range(len(na))]
            for j, (x, y) in enumerate(zip(na, nb, strict=True)):
                tol = atol + rtol * abs(y)
                if not (abs(x - y) <= tol or (math.isnan(x) and math.isnan(y))):
                    yield (
                        f"{name} [{label}, {names[j]}]: golden {y:.8e}, now {x:.8e} "
                        f"(|diff| {abs(x - y):.2e} > tolerance {tol:.2e})"
                    )


class GoldenExtension(SingleFileSnapshotExtension):
    """Text snapshots under golden/<test module>/<test name>.txt, compared with tolerances."""

    _write_mode = WriteMode.TEXT
    file_extension = "txt"

    @classmethod
    def dirname(cls, *, test_location: Any) -> str:  # noqa: D102
        return str(GOLDEN / test_location.basename)

    def serialize(self, data: Any, **kwargs: Any) -> str:  # noqa: D102
        return render(data if isinstance(data, dict) else {"value": data})

    def matches(self, *, serialized_data: Any, snapshot_data: Any) -> bool:  # noqa: D102
        return snapshot_data is not None and not any(differences(str(serialized_data), str(snapshot_data)))

    def diff_lines(self, serialized_data: Any, snapshot_data: Any) -> Iterator[str]:  # noqa: D102
        found = list(differences(str(serialized_data), str(snapshot_data)))
        yield from found or super().diff_lines(serialized_data, snapshot_data)
