"""ExecuTorch lowering, lean on memory and time: fixes scoped to one export (`lean_lowering`).

ExecuTorch 1.5.1 and torch.fx hold several whole-graph or whole-model copies while lowering a large
graph to XNNPACK, and copy provenance records quadratically. Each fix below is a context manager
that patches one library function for the duration of the export and restores it after; none
changes the lowered program (a test compares the .pte bytes with and without them). Measured on
full E2B/E4B exports (README, Performance).

Each patch first checks that its target exists with the parameters g4 was written against
(`TESTED_WITH`). If not, it warns and lowers without that fix: the program is the same, only memory
or time suffers, and a test on the pinned versions (`problems() == []`) catches the drift first.
`ExportOptions(lean=False)` / `--no-lean` turns all of them off.
"""

from __future__ import annotations

import collections.abc
import contextlib
import copy
import inspect
import linecache
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.fx import GraphModule, Node

TESTED_WITH = "executorch 1.5.1, torch 2.13.0"
USED: Counter[str] = Counter()  # calls of each patch's replacement, so a test can see that none is dead


def _params(fn: Any) -> tuple[str, ...] | None:
    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None


def _expect(name: str, owner: Any, attr: str, params: tuple[str, ...]) -> bool:
    """Whether `owner.attr` exists and its parameters start with `params`; warns (naming it) if not."""
    fn = getattr(owner, attr, None)
    found = None if fn is None else _params(fn)
    if found is not None and found[: len(params)] == params:
        return True
    what = "is missing" if fn is None else f"takes {found}, expected {params}"
    warnings.warn(
        f"g4 lean lowering: {getattr(owner, '__name__', owner)}.{attr} {what} (g4 was tested with {TESTED_WITH}); "
        f"exporting without the {name} fix (same program, more memory or time)",
        stacklevel=3,
    )
    return False


def _targets() -> dict[str, tuple[Any, str, tuple[str, ...]]]:
    """Patch name -> (owner, attribute, the leading parameter names g4 relies on)."""
    from executorch.backends.xnnpack.operators.node_visitor import NodeVisitor
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
    from executorch.exir._serialize._named_data_store import NamedDataStore
    from executorch.exir.backend.canonical_partitioners import group_partitioner
    from torch.fx import graph_module as fx_gm
    from torch.fx import traceback as fxt
    from torch.fx.passes.infra import partitioner

    return {
        "fx_sources_not_kept": (fx_gm._loader, "cache", ("src", "globals", "co_fields")),
        "weights_not_copied_for_xnnpack": (
            XnnpackBackend,
            "copy_exported_program_for_preprocess",
            ("edge_program", "compile_specs"),
        ),
        "freed_once_packed": (NodeVisitor, "get_serialized_buffer_index", ("self", "tensor")),
        "packed_data_shared": (NamedDataStore, "add_named_data", ("self", "key", "data")),
        "light_dependency_viewers": (partitioner, "_DependencyViewer", ("graph_module",)),
        "light_dependency_viewers (group)": (group_partitioner, "_DependencyViewer", ("graph_module",)),
        "provenance_shared": (fxt.NodeSource, "__init__", ("self", "node", "pass_name")),
    }


def problems() -> list[str]:
    """The patches whose targets differ from what g4 expects; empty on the versions g4 pins."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bad = [name for name, (owner, attr, params) in _targets().items() if not _expect(name, owner, attr, params)]
    return [f"{name}: {w.message}" for name, w in zip(bad, caught, strict=True)]


def _ok(name: str) -> bool:
    owner, attr, params = _targets()[name]
    return _expect(name, owner, attr, params)


def plain(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding `t`'s data (a torchao quantized tensor holds several)."""
    names = getattr(t, "tensor_data_names", None)
    return [getattr(t, n) for n in names] if names else [t]


def held(ep: Any) -> set[int]:
    """The storages (data pointers) of the weights an exported program references."""
    tensors = [t for t in [*ep.state_dict.values(), *ep.constants.values()] if isinstance(t, torch.Tensor)]
    return {p.untyped_storage().data_ptr() for t in tensors for p in plain(t)}


def free_lowered(weights: list[torch.Tensor], programs: list[Any]) -> int:
    """Frees the storage of each weight no program references any more (XNNPACK has copied it into
    its delegate blob); returns the bytes freed. The weights become empty."""
    kept = set().union(*map(held, programs))
    freed = 0
    for t in (p for w in weights for p in plain(w)):
        st = t.untyped_storage()
        if st.data_ptr() not in kept and st.nbytes():
            try:
                n = st.nbytes()
                st.resize_(0)
                freed += n
            except RuntimeError:  # not resizable (e.g. memory-mapped): left alone
                pass
    return freed


@contextlib.contextmanager
def fx_sources_not_kept() -> Iterator[None]:
    """torch.fx keeps the source of every forward it generates, for tracebacks, and never frees it;
    ExecuTorch's partitioner regenerates the whole graph's code once per delegate partition, so the
    cache grows with partitions x graph size. Inside this block sources
    are dropped as soon as they are compiled (tracebacks into generated code show no source line)."""
    from torch.fx import graph_module as fx_gm

    if not _ok("fx_sources_not_kept") or not hasattr(fx_gm._loader, "eval_cache"):
        yield
        return
    loader, keep = fx_gm._loader, fx_gm._loader.cache

    def cache(src: str, globals: dict[str, Any], co_fields: dict[str, Any] | None = None) -> str:
        USED["fx_sources_not_kept"] += 1
        key = keep(src, globals, co_fields)
        loader.eval_cache.pop(key, None)
        linecache.cache.pop(key, None)
        return key

    loader.cache = cache  # type: ignore[method-assign]
    try:
        yield
    finally:
        loader.cache = keep  # type: ignore[method-assign]


@contextlib.contextmanager
def weights_not_copied_for_xnnpack() -> Iterator[None]:
    """ExecuTorch deep-copies every partition's program, weights included, before XNNPACK's
    preprocessing (`copy_exported_program_for_preprocess`) and keeps all copies until it is done:
    a second copy of every delegated weight at the peak. XNNPACK reads the weights and never writes
    them, so inside this block the copies share the original tensors (the graphs are still copied)."""
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    if not _ok("weights_not_copied_for_xnnpack"):
        yield
        return
    had = "copy_exported_program_for_preprocess" in vars(XnnpackBackend)
    keep = vars(XnnpackBackend).get("copy_exported_program_for_preprocess")

    def copy_sharing_weights(cls: Any, program: Any, compile_specs: Any) -> Any:
        USED["weights_not_copied_for_xnnpack"] += 1
        tensors = [*program.state_dict.values(), *program.constants.values()]
        return copy.deepcopy(program, {id(t): t for t in tensors if isinstance(t, torch.Tensor)})

    XnnpackBackend.copy_exported_program_for_preprocess = classmethod(copy_sharing_weights)
    try:
        yield
    finally:
        if had:
            XnnpackBackend.copy_exported_program_for_preprocess = keep
        else:
            del XnnpackBackend.copy_exported_program_for_preprocess


@contextlib.contextmanager
def freed_once_packed(weights: list[torch.Tensor], programs: list[Any]) -> Iterator[None]:
    """Frees each of `weights` (quantized linear weights) as soon as XNNPACK has copied it into the
    delegate blob of every one of `programs` (the methods) that reads it, instead of after all of
    lowering: the int8 copy and the packed one then never coexist for the whole model. (A decoder
    exported as `forward` and `text_decoder` is read twice: freed after the first, the second found
    it empty.)"""
    from executorch.backends.xnnpack.operators.node_visitor import NodeVisitor
    from executorch.backends.xnnpack.utils.utils import get_param_tensor, is_param_node

    keep = NodeVisitor.get_serialized_buffer_index
    sig = inspect.signature(keep)
    if not _ok("freed_once_packed") or "quant_params" not in sig.parameters:
        yield
        return
    readers = collections.Counter(ptr for ep in programs for ptr in held(ep))
    mine = {t.untyped_storage().data_ptr() for w in weights for t in plain(w)}
    left = {ptr: n for ptr, n in readers.items() if ptr in mine}  # packings to go before it is freed

    def serialize_then_free(self: Any, tensor: torch.fx.Node, *args: Any, **kwargs: Any) -> int:
        idx = keep(self, tensor, *args, **kwargs)
        quant_params = sig.bind(self, tensor, *args, **kwargs).arguments.get("quant_params")
        node = tensor if quant_params is None else quant_params.q_input
        if is_param_node(self.exported_program, node):
            st = get_param_tensor(self.exported_program, node).untyped_storage()
            if st.data_ptr() in left:
                left[st.data_ptr()] -= 1
                if not left[st.data_ptr()]:
                    del left[st.data_ptr()]  # a later allocation may reuse the address
                    st.resize_(0)
                    USED["freed_once_packed"] += 1
        return idx

    NodeVisitor.get_serialized_buffer_index = serialize_then_free
    try:
        yield
    finally:
        NodeVisitor.get_serialized_buffer_index = keep


@contextlib.contextmanager
def packed_data_shared() -> Iterator[None]:
    """XNNPACK adds each packed weight to its method's data store as fresh `bytes` keyed by their SHA-256,
    so a decoder exported as two methods (`forward`, `text_decoder`) holds every packed weight twice
    until the program is written (the file stores it once). Inside this block a store given bytes equal
    to ones added before under the same key keeps the first object instead."""
    from executorch.exir._serialize._named_data_store import NamedDataStore

    if not _ok("packed_data_shared"):
        yield
        return
    keep = NamedDataStore.add_named_data
    first: dict[str, bytes] = {}

    def add(self: Any, key: str, data: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(data, bytes):
            seen = first.setdefault(key, data)
            if seen is not data and seen == data:
                USED["packed_data_shared"] += 1
                data = seen
        keep(self, key, data, *args, **kwargs)

    NamedDataStore.add_named_data = add
    try:
        yield
    finally:
        NamedDataStore.add_named_data = keep


class _NodeBits(collections.abc.Set):
    """A read-only set of graph nodes stored as a bitmask over the graph's node order."""

    __slots__ = ("_mask", "_nodes", "_index")

    def __init__(self, mask: int, nodes: list[Node], index: dict[Node, int]):
        self._mask, self._nodes, self._index = mask, nodes, index

    def __contains__(self, node: object) -> bool:
        i = self._index.get(node)  # type: ignore[call-overload]
        return i is not None and bool((self._mask >> i) & 1)

    def __iter__(self) -> Iterator[Node]:
        m = self._mask
        raw = np.frombuffer(m.to_bytes((m.bit_length() + 7) // 8, "little"), np.uint8)
        idx = np.flatnonzero(np.unpackbits(raw, bitorder="little")).tolist()
        return map(self._nodes.__getitem__, idx)  # no Python loop: partitioners walk these a lot

    def __len__(self) -> int:
        return self._mask.bit_count()


class BitsetDependencyViewer:
    """Drop-in for the `_DependencyViewer`s of torch.fx's and ExecuTorch's partitioners.

    Theirs store every node's transitive downstream (and upstream) nodes as a Python set: O(N^2)
    entries, built up to three times (GiBs on E4B's graph: README, Performance). Here each is a
    bitmask of N bits (N^2 / 8 bytes); upstreams are built only if asked for.
    """

    def __init__(self, graph_module: GraphModule):
        USED["light_dependency_viewers"] += 1
        self._nodes = list(graph_module.graph.nodes)
        self._index = {n: i for i, n in enumerate(self._nodes)}
        self._down: dict[Node, int] = {}
        for n in reversed(self._nodes):  # users come later in topological order
            m = 0
            for u in n.users:
                m |= self._down[u] | (1 << self._index[u])
            self._down[n] = m
        self._up: dict[Node, int] | None = None

    def downstreams_of(self, node: Node) -> _NodeBits:
        """Every node that depends on `node`, transitively."""
        return _NodeBits(self._down.get(node, 0), self._nodes, self._index)

    def upstreams_of(self, node: Node) -> _NodeBits:
        """Every node `node` depends on, transitively."""
        if self._up is None:
            self._up = {}
            for n in self._nodes:
                m = 0
                for a in n.all_input_nodes:
                    m |= self._up[a] | (1 << self._index[a])
                self._up[n] = m
        return _NodeBits(self._up.get(node, 0), self._nodes, self._index)


@contextlib.contextmanager
def light_dependency_viewers() -> Iterator[None]:
    """Partitioners use `BitsetDependencyViewer` inside this block."""
    from executorch.exir.backend.canonical_partitioners import group_partitioner
    from torch.fx.passes.infra import partitioner

    if not (_ok("light_dependency_viewers") and _ok("light_dependency_viewers (group)")):
        yield
        return
    modules: list[Any] = [partitioner, group_partitioner]
    keep = [m._DependencyViewer for m in modules]
    for m in modules:
        m._DependencyViewer = BitsetDependencyViewer
    try:
        yield
    finally:
        for m, k in zip(modules, keep, strict=True):
            m._DependencyViewer = k


@contextlib.contextmanager
def provenance_shared() -> Iterator[None]:
    """torch.fx's provenance records (`node.meta["from_node"]`) share their history instead of copying it.

    Every pass re-creates each node, and each new record deep-copies the chain of records before
    it: quadratic in the number of passes (its cost is in README, Performance). The
    chain is only read once built (ExecuTorch's debug handles follow it), so sharing it keeps the
    same provenance.
    """
    from torch.fx import traceback as fxt

    if not _ok("provenance_shared"):
        yield
        return
    keep = fxt.NodeSource.__init__

    def init(self: Any, node: Node | None, *args: Any, **kwargs: Any) -> None:
        chain = node.meta.get("from_node") if node is not None else None
        if chain is None:
            keep(self, node, *args, **kwargs)
            return
        USED["provenance_shared"] += 1
        node.meta["from_node"] = []  # type: ignore[union-attr]
        try:
            keep(self, node, *args, **kwargs)
        finally:
            node.meta["from_node"] = chain  # type: ignore[union-attr]
        self.from_node = list(chain)

    fxt.NodeSource.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        fxt.NodeSource.__init__ = keep  # type: ignore[method-assign]


@contextlib.contextmanager
def lean_lowering(on: bool = True) -> Iterator[None]:
    """All of the above but `freed_once_packed`, which needs the exported programs (none if not `on`)."""
    if not on:
        yield
        return
    with (
        fx_sources_not_kept(),
        weights_not_copied_for_xnnpack(),
        light_dependency_viewers(),
        provenance_shared(),
        packed_data_shared(),
    ):
        yield
