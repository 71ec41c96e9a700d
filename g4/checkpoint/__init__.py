"""Hugging Face checkpoints: lean, safe loading into the parameter tree, and random full-size writers.

Names and config fields are translated in `g4.hf` (`hf_key`: the name plus the prefix of the layout).
Only safetensors are read (memory-mapped, one tensor at a time); pickle files are never opened.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import mmap
import os
import struct
import sys
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import attrs
import torch
from safetensors import safe_open
from torch import Tensor
from tqdm import tqdm

from g4.config import AssistantConfig, Config, ConfigError, Towers
from g4.hf import (
    MM_IGNORED,
    MM_PREFIX,
    SHARED_KV_IGNORED,
    TEXT_PREFIX,
    TOWER_PREFIXES,
    assistant_config_from_hf,
    assistant_config_to_hf,
    assistant_name,
    config_from_hf,
    config_to_hf,
    hf_key,
    towers_from_hf,
    towers_to_hf,
)
from g4.memory import libc
from g4.params import (
    Assistant,
    Params,
    assistant_shapes,
    build,
    build_assistant,
    init_assistant,
    init_value,
    leaves_with_path,
    param_shapes,
)

T = TypeVar("T")

FLOAT_DTYPES = ("F32", "BF16", "F16")  # safetensors dtype names g4 converts
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint g4 cannot load; the message names the file and tensor or field at fault."""


def read_config(path: str | os.PathLike) -> Config:
    """The `Config` of a checkpoint folder's `config.json`."""
    return _read_json(Path(path) / "config.json", config_from_hf)


def read_towers(path: str | os.PathLike, kinds: bool | Collection[str] = True) -> Towers:
    """The towers of a multimodal checkpoint folder's `config.json`: all it has, or those of `kinds`
    ("vision", "audio"; CheckpointError if it lacks one)."""
    file = Path(path) / "config.json"
    t = _read_json(file, towers_from_hf)
    if kinds is True:
        return t
    want = set(cast(Collection[str], kinds))
    if bad := want - set(TOWER_PREFIXES):
        raise ValueError(f"towers: unknown {sorted(bad)} (have {sorted(TOWER_PREFIXES)})")
    for kind in sorted(want):
        if getattr(t, kind) is None:
            raise CheckpointError(f"{file}: no {kind}_config (this checkpoint has no {kind} tower)")
    return cast(Towers, t.only("vision" in want, "audio" in want))


def _read_json(file: Path, parse: Callable[[Any], T]) -> T:
    """`parse` of a checkpoint's JSON file; CheckpointError naming the file if it is missing, not JSON or wrong."""
    if not file.is_file():
        raise CheckpointError(f"{file}: not found (expected a Hugging Face Gemma 4 checkpoint folder)")
    try:
        return parse(json.loads(file.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None


def _shards(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, checked to exist; refuses pickle-only folders."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names (strings)")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (folder / name).is_file():
                first = next(k for k, v in weight_map.items() if v == name)
                raise CheckpointError(f"{index}: names shard {name!r} (e.g. for {first!r}), which does not exist")
        return [folder / f for f in files]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    if found := sorted(folder.glob("*.safetensors")):
        return found
    if pickles := sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{folder}: only pickle weights found ({', '.join(pickles)}); g4 never unpickles files. Convert them to "
            "safetensors first (e.g. transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    raise CheckpointError(f"{folder}: no {SINGLE} or {INDEX} found")


class _Reader:
    """Names and shapes of every shard's tensors (headers only); `get` maps one tensor at a time.

    Each `get` opens its own memory map and drops it afterwards, so pages of tensors already
    converted to another dtype do not stay mapped (and counted in RSS) for the rest of the load.
    """

    def __init__(self, files: list[Path], ints: tuple[str, ...] = ()):
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.where: dict[str, Path] = {}
        for f in files:
            with self._open(f) as h:
                for k in h.keys():
                    if k in self.where:
                        raise CheckpointError(f"{f}: tensor {k!r} is in two files: {self.where[k].name} and {f.name}")
                    sl = h.get_slice(k)
                    if sl.get_dtype() not in FLOAT_DTYPES and not (k in ints and sl.get_dtype() == "I64"):
                        raise CheckpointError(
                            f"{f}: tensor {k!r} has dtype {sl.get_dtype()}; g4 reads float weights "
                            f"({', '.join(FLOAT_DTYPES)}), so it would have to guess how to dequantize this one"
                        )
                    self.shapes[k], self.where[k] = tuple(sl.get_shape()), f

    @staticmethod
    def _open(f: Path) -> Any:
        try:
            return safe_open(str(f), framework="pt")
        except Exception as e:  # safetensors raises its own SafetensorError for bad headers
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def get(self, key: str, dtype: torch.dtype | None = None) -> Tensor:
        try:
            with self._open(self.where[key]) as h:
                t = h.get_tensor(key)
                if dtype is None or dtype == t.dtype or not t.is_floating_point():
                    setattr(t, MAPPED, True)  # a view of the file mapping: `release_pages` may drop its pages
                    return t
                return t.to(dtype)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.where[key]}: tensor {key!r} cannot be read ({e})") from None


MAPPED = "g4_file_mapped"  # attribute on tensors that view a read-only private mapping of a checkpoint file
_MADV_DONTNEED = 4


def release_pages(t: Tensor, lo: int, hi: int) -> None:
    """Drops the resident pages of rows `lo:hi` of `t` if `load_checkpoint` mapped `t` from a file
    (Linux; a no-op otherwise), so chunk-by-chunk conversion of a 5 GB table never holds it all.

    They are clean pages of a private file mapping that nothing writes, so the kernel reads them
    from the file again if they are touched later: the data does not change.
    """
    if not getattr(t, MAPPED, False) or not t.is_contiguous():
        return
    lib = libc()
    if lib is None:
        return
    page, rows = mmap.PAGESIZE, t[lo:hi]
    start, end = rows.data_ptr(), rows.data_ptr() + rows.numel() * rows.element_size()
    first, last = -(-start // page) * page, end // page * page  # whole pages inside the rows only
    if last > first:
        lib.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def trim_heap() -> None:
    """Returns the C heap's free memory to the OS (glibc's malloc_trim; a no-op elsewhere): converting
    tensors block by block leaves freed blocks that would otherwise stay in the resident set."""
    lib = libc()
    if lib is not None:
        lib.malloc_trim(0)


def load_checkpoint(
    path: str | os.PathLike,
    dtype: torch.dtype | None = torch.float32,
    transform: Callable[[str, Tensor], Tensor] | None = None,
    progress: bool = False,
    towers: bool | Collection[str] = False,
) -> tuple[Config, Params]:
    """Loads a Hugging Face Gemma 4 checkpoint folder (multimodal or text-only layout) as `(cfg, params)`.

    `towers=True` also loads a multimodal checkpoint's vision and audio towers and their embedders
    (`cfg.towers`, `params.vision_tower`, `.embed_vision`, `.audio_tower`, `.embed_audio`), `towers=("audio",)`
    only those named; without it they are ignored (text only).

    Every name and shape is checked from the safetensors headers before any weight is read; then the
    tensors are read through the memory map one at a time and converted to `dtype`, so peak memory is
    the size of the result plus one tensor. `dtype=None` keeps the stored dtype (the tensors then stay
    memory-mapped). `transform(path, tensor)` (e.g. a quantizer) is applied to each tensor as it is
    read, so an fp32 copy of the whole model never exists.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    cfg = read_config(folder)
    if towers:
        cfg = attrs.evolve(cfg, towers=read_towers(folder, towers))
    r = _Reader(_shards(folder))
    prefix = MM_PREFIX if any(k.startswith(MM_PREFIX) for k in r.where) else TEXT_PREFIX
    shapes = {hf_key(p, prefix): s for p, s in param_shapes(cfg).items()}

    ignorable = {
        f"{prefix}layers.{i}.{n}" for i in range(cfg.first_shared, cfg.num_hidden_layers) for n in SHARED_KV_IGNORED
    }
    ignorable |= {f"{prefix}layers.{i}.self_attn.v_norm.weight" for i in range(cfg.num_hidden_layers)}
    if prefix == MM_PREFIX:
        t = cfg.towers
        loaded = {
            p for kind, pre in TOWER_PREFIXES.items() if t is not None and getattr(t, kind) is not None for p in pre
        }
        skipped = tuple(p for p in MM_IGNORED if p not in loaded)
        ignorable |= {k for k in r.where if k.startswith(skipped)}
    _check_names(folder, r, shapes, ignorable, prefix + "embed_tokens.weight")

    bar = tqdm(total=len(shapes), desc="load", unit="tensor", disable=not progress, file=sys.stderr)

    def get(p: str, _: tuple[int, ...]) -> Tensor:
        t = r.get(hf_key(p, prefix), dtype)
        bar.update()
        return transform(p, t) if transform else t

    params = build(cfg, get)
    bar.close()
    trim_heap()
    if "lm_head.weight" in r.where:  # tied: check it rather than keep a second copy of V x H
        _check_tied(r, params.embed_tokens)
    return cfg, params


def _check_names(folder: Path, r: _Reader, shapes: dict[str, tuple[int, ...]], ignorable: set[str], embed: str) -> None:
    """Every tensor expected, none unexpected (bar `ignorable` and a tied lm_head), shapes as the config says."""
    for key in r.where:
        if key not in shapes and key not in ignorable and key != "lm_head.weight":
            raise CheckpointError(f"{r.where[key]}: unexpected tensor {key!r} for this Gemma 4 config")
    for key, want in shapes.items():
        if key not in r.where:
            files = ", ".join(sorted({f.name for f in r.where.values()}))
            raise CheckpointError(f"{folder}: missing tensor {key!r} (not in {files})")
        if (got := r.shape(key)) != want:
            raise CheckpointError(
                f"{r.where[key]}: tensor {key!r} has shape {list(got)}, config.json implies {list(want)}"
            )
    if "lm_head.weight" in r.where and r.shape("lm_head.weight") != shapes[embed]:
        raise CheckpointError(f"{r.where['lm_head.weight']}: lm_head.weight shape differs from the embedding")


def load_assistant(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[AssistantConfig, Assistant]:
    """Loads an assistant drafter checkpoint folder (`gemma4_assistant`, as `save_pretrained` writes it)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    file, gen_file = folder / "config.json", folder / "generation_config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: not found (expected a Gemma 4 assistant checkpoint folder)")
    docs = {}
    for f in (file, gen_file) if gen_file.is_file() else (file,):
        try:
            docs[f] = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    try:
        acfg = assistant_config_from_hf(docs[file], docs.get(gen_file))
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None
    r = _Reader(_shards(folder), ints=(assistant_name("token_ordering"),))
    shapes = {assistant_name(p): s for p, s in assistant_shapes(acfg).items()}
    _check_names(folder, r, shapes, set(), assistant_name("embed_tokens"))
    a = build_assistant(acfg, lambda p, _: r.get(assistant_name(p), dtype))
    order = a.token_ordering
    if order is not None and not torch.equal(order.sort().values, torch.arange(acfg.text.vocab_size)):
        key = assistant_name("token_ordering")
        raise CheckpointError(f"{r.where[key]}: tensor {key!r} is not a permutation of the vocabulary")
    if "lm_head.weight" in r.where:
        _check_tied(r, a.embed_tokens)
    return acfg, a


def _check_tied(r: _Reader, embed: Tensor, rows: int = 16384) -> None:
    with r._open(r.where["lm_head.weight"]) as h:
        sl = h.get_slice("lm_head.weight")
        for i in range(0, embed.shape[0], rows):
            if not torch.equal(sl[i : i + rows].to(embed.dtype), embed[i : i + rows]):
                raise CheckpointError(
                    f"{r.where['lm_head.weight']}: lm_head.weight differs from embed_tokens (rows {i}..); "
                    "Gemma 4 ties them and g4 uses the embedding"
                )


# --- writing ------------------------------------------------------------------------------------------

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _write_safetensors(
    file: Path, tensors: list[tuple[str, tuple[int, ...], Callable[[], Iterator[Tensor]]]], dtype: torch.dtype
) -> None:
    """Streams tensors into a safetensors file; each is produced in row chunks, so memory stays bounded."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for key, shape, _ in tensors:
        n = math.prod(shape) * itemsize
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, _, chunks in tensors:
            for c in chunks():
                f.write(c.to(dtype).reshape(-1).view(torch.uint8).numpy().tobytes())


def write_random_checkpoint(
    cfg: Config,
    path: str | os.PathLike,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 4 << 30,
    progress: bool = False,
    multimodal: bool = False,
) -> Path:
    """Writes a `Gemma4ForCausalLM`-format checkpoint (config.json, sharded safetensors, index) of random weights.

    `multimodal=True` writes the hub's `Gemma4ForConditionalGeneration` layout instead (text weights
    under `model.language_model.`, config under `text_config`; the vision tower if `cfg.towers` has one).

    Tensor by tensor, in row chunks of at most 64 MiB, so E4B (16 GB in bf16) is written in bounded
    memory. Values come from `g4.params.init_value` with one generator seeded by `seed`.
    """
    if cfg.towers is not None and not multimodal:
        raise ValueError("write_random_checkpoint: a config with towers needs multimodal=True")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = param_shapes(cfg)
    itemsize = torch.empty((), dtype=dtype).element_size()

    def chunks(p: str, shape: tuple[int, ...]) -> Callable[[], Iterator[Tensor]]:
        def run() -> Iterator[Tensor]:
            if not shape:  # a scalar (a clip bound)
                yield init_value(p, shape, cfg, gen)
                return
            rows = max(1, (64 << 20) // (4 * math.prod(shape[1:]))) if len(shape) > 1 else shape[0]
            for i in range(0, shape[0], rows):
                yield init_value(p, (min(rows, shape[0] - i), *shape[1:]), cfg, gen)

        return run

    shards: list[list[tuple[str, tuple[int, ...], Callable[[], Iterator[Tensor]]]]] = [[]]
    size = 0
    for p, shape in shapes.items():
        n = math.prod(shape) * itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((hf_key(p, MM_PREFIX if multimodal else TEXT_PREFIX), shape, chunks(p, shape)))
        size += n
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for i, (name, tensors) in enumerate(zip(names, shards, strict=True)):
        if progress:
            print(f"writing {name} ({i + 1}/{len(shards)}, {len(tensors)} tensors)", file=sys.stderr, flush=True)
        atomic_write(out / name, functools.partial(_write_safetensors, tensors=tensors, dtype=dtype))
    total = sum(math.prod(s) for s in shapes.values()) * itemsize
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: n for n, t in zip(names, shards, strict=True) for k, _, _ in t},
    }
    atomic_write(out / INDEX, lambda f: f.write_text(json.dumps(index, indent=2)))
    hf = config_to_hf(cfg) | {"dtype": str(dtype).removeprefix("torch.")}
    if multimodal:
        hf = {
            "architectures": ["Gemma4ForConditionalGeneration"],
            "model_type": "gemma4",
            "text_config": hf,
            "vision_config": None,
            "audio_config": None,
            "tie_word_embeddings": True,
        } | (towers_to_hf(cfg.towers) if cfg.towers else {})
    atomic_write(out / "config.json", lambda f: f.write_text(json.dumps(hf, indent=2)))
    return out


def write_random_assistant(acfg: AssistantConfig, path: str | os.PathLike, seed: int = 0) -> Path:
    """Writes a `Gemma4AssistantForCausalLM`-format drafter checkpoint (fp32) of `init_assistant` weights."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {assistant_name(p): t.contiguous() for p, t in leaves_with_path(init_assistant(acfg, seed))}
    atomic_write(out / SINGLE, lambda f: save_file(tensors, str(f), metadata={"format": "pt"}))
    gen = {"num_assistant_tokens": acfg.draft_tokens}
    atomic_write(out / "generation_config.json", lambda f: f.write_text(json.dumps(gen, indent=2)))
    atomic_write(out / "config.json", lambda f: f.write_text(json.dumps(assistant_config_to_hf(acfg), indent=2)))
    return out


def atomic_write(dest: Path, write: Callable[[Path], Any]) -> None:
    """Writes `dest` through a temporary file in the same folder: fsync it, rename it over `dest`, fsync the
    folder. A crash at any point leaves the old `dest` or the new one, never half of either.

    The temporary's name carries the writer's pid; temporaries of writers that are no longer running
    (killed mid-write) are removed first.
    """
    for stale in dest.parent.glob(f".{dest.name}.*.tmp"):
        pid = stale.name[len(dest.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
