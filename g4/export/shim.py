"""The thin `nn.Module` around `g4.forward` that `torch.export` traces.

It holds the parameter tree's leaves and the cache's as buffers, rebuilds both trees in
`forward(tokens, input_pos)` and calls `g4.forward` with ExecuTorch's hooks (`g4.export.et`), which
update the cache buffers in place.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils import _pytree

from g4.config import Config
from g4.export.et import et_hooks, inplace_hooks, load_custom_ops, rotate_half_matrix
from g4.fn.cache import Cache, init_cache
from g4.fn.model import forward
from g4.params import Params, leaves_with_path, tree_map_with_path

KV_CACHES = ("fp32", "int8")


def buffer_name(tree: str, path: str) -> str:
    """The buffer holding the leaf at `path` of the `tree` ("params" or "cache")."""
    return f"{tree}_{path.replace('.', '_')}"


class Shim(nn.Module):
    """`forward(tokens [1, T], input_pos [1]) -> logits [1, V]` of the last position, cache as buffers.

    `custom_ops=False` (bf16 exports: ExecuTorch's attention ops are fp32-only) uses the eager
    attention and `index_copy_` writes; `kv_cache="int8"` needs the custom ops.
    """

    def __init__(
        self,
        cfg: Config,
        params: Params,
        max_seq_len: int,
        max_chunk: int,
        custom_ops: bool = True,
        kv_cache: str = "fp32",
    ):
        super().__init__()
        if kv_cache not in KV_CACHES or (kv_cache == "int8" and not custom_ops):
            raise ValueError(f"kv_cache must be one of {KV_CACHES} (int8 with fp32 activations), got {kv_cache!r}")
        self.cfg, self.custom_ops, self.int8 = cfg, custom_ops, kv_cache == "int8"
        dtype = torch.float32 if custom_ops else params.norm.dtype
        cache = init_cache(cfg, batch=1, max_seq_len=max_seq_len, dtype=dtype, max_chunk=max_chunk, int8=self.int8)
        self.max_seq_len, self.ring_slots = max_seq_len, cache.ring_slots
        self._paths: dict[str, Any] = {}  # tree name -> the tree with each leaf's path in its place
        for tree, value in (("params", params), ("cache", cache)):
            for path, t in leaves_with_path(value):
                self.register_buffer(buffer_name(tree, path), t)
            self._paths[tree] = tree_map_with_path(lambda path, _: path, value)
        self.register_buffer("rot", rotate_half_matrix(dtype))  # a weight XNNPACK keeps in its delegate
        if custom_ops:
            load_custom_ops()

    def _tree(self, tree: str) -> Any:
        return _pytree.tree_map(lambda path: getattr(self, buffer_name(tree, path)), self._paths[tree])

    def params(self) -> Params:
        """The parameter tree, rebuilt from the buffers."""
        return cast(Params, self._tree("params"))

    def cache(self) -> Cache:
        """The cache, as the buffers themselves."""
        return cast(Cache, self._tree("cache"))

    def forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        """Runs T tokens starting at position `input_pos[0]`; updates the cache buffers in place."""
        T = tokens.shape[1]
        start = cast(int, input_pos[0].item())  # a SymInt under torch.export, bounded for the custom ops
        torch._check_is_size(start)
        torch._check(start + T <= self.max_seq_len)
        torch._check(T <= self.ring_slots)
        positions = torch.arange(start, start + T, dtype=torch.int64)
        params = self.params()
        rot = cast(Tensor, self.rot)
        hooks = et_hooks(start, T, rot, self.int8) if self.custom_ops else inplace_hooks(rot)
        logits, _ = forward(params, self.cfg, tokens, positions, self.cache(), hooks=hooks, last_only=True)
        return logits[:, -1]
