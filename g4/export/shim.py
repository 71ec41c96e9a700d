"""The thin `nn.Module` around `g4.forward` that `torch.export` traces.

It holds the parameter tree's leaves and the cache's as buffers, rebuilds both trees in
`forward(tokens, input_pos)` and calls `g4.forward` with ExecuTorch's hooks (`g4.export.et`), which
update the cache buffers in place. With an assistant it also holds the drafter's tree, and `draft`
(a second method) reads the same cache buffers and the hidden states `forward` leaves behind. With a
vision or audio tower in the tree, `vision_encoder`, `audio_encoder`, `speech_transform` and `text_decoder`
follow ExecuTorch's Gemma 4 example.
"""

from __future__ import annotations

from typing import Any, cast

import attrs
import torch
from torch import Tensor, nn
from torch.utils import _pytree

from g4.config import SLIDING, AssistantConfig, Config
from g4.export.et import draft_hooks, et_hooks, inplace_hooks, load_custom_ops, rotate_half_matrix
from g4.fn.audio import audio_soft, log_mel
from g4.fn.cache import Cache, init_cache, slot_positions
from g4.fn.draft import draft_ring, draft_step, target_kv
from g4.fn.model import embed, head, hidden_states
from g4.fn.multimodal import image_blocks, placeholders
from g4.fn.vision import embed_soft, encode
from g4.params import Assistant, Params, leaves_with_path, tree_map_with_path

KV_CACHES = ("fp32", "int8")


def buffer_name(tree: str, path: str) -> str:
    """The buffer holding the leaf at `path` of the `tree` ("params" or "cache")."""
    return f"{tree}_{path.replace('.', '_')}"


@attrs.frozen
class DraftSpec:
    """An assistant to export beside the target, drafting up to `tokens` tokens a round."""

    cfg: AssistantConfig
    params: Assistant
    tokens: int


class Shim(nn.Module):
    """`forward(tokens [1, T], input_pos [1]) -> logits [1, V]` of the last position, cache as buffers.

    `custom_ops=False` (bf16 exports: ExecuTorch's attention ops are fp32-only) uses the eager
    attention and `index_copy_` writes; `kv_cache="int8"` needs the custom ops.

    With a `drafter` (N tokens a round), `forward` returns the logits `[1, min(T, N + 1), V]` of the last
    positions (a verify step's; the LLM runner reads the last row) and keeps their hidden states in
    `hidden`; `draft` is the drafter's step.
    """

    def __init__(
        self,
        cfg: Config,
        params: Params,
        max_seq_len: int,
        max_chunk: int,
        custom_ops: bool = True,
        kv_cache: str = "fp32",
        drafter: DraftSpec | None = None,
    ):
        super().__init__()
        if kv_cache not in KV_CACHES or (kv_cache == "int8" and not custom_ops):
            raise ValueError(f"kv_cache must be one of {KV_CACHES} (int8 with fp32 activations), got {kv_cache!r}")
        self.cfg, self.custom_ops, self.int8 = cfg, custom_ops, kv_cache == "int8"
        dtype = torch.float32 if custom_ops else params.norm.dtype
        ring = max(max_chunk, draft_ring(cfg, drafter.tokens)) if drafter else max_chunk
        cache = init_cache(cfg, batch=1, max_seq_len=max_seq_len, dtype=dtype, max_chunk=ring, int8=self.int8)
        self.max_seq_len, self.ring_slots, self.drafter = max_seq_len, cache.ring_slots, drafter
        self._paths: dict[str, Any] = {}  # tree name -> the tree with each leaf's path in its place
        trees: list[tuple[str, Any]] = [("params", params), ("cache", cache)]
        if drafter:
            trees.append(("draft", drafter.params))
            # the final hidden states of forward's last 1 + N positions, then the drafter's own last one
            self.register_buffer("hidden", torch.zeros(1, drafter.tokens + 2, cfg.hidden_size, dtype=dtype))
        for tree, value in trees:
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
        return self._decode(tokens, input_pos)

    def text_decoder(self, input_ids: Tensor, input_pos: Tensor, inputs_embeds: Tensor) -> Tensor:
        """`forward` with `inputs_embeds [1, T, H]` at the image and audio placeholders of `input_ids [1, T]` (the
        rest of it is not read); `input_pos [T]`, from its first. ExecuTorch's Gemma 4 example's decoder method."""
        return self._decode(input_ids, input_pos, inputs_embeds)

    def audio_encoder(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """A clip's soft tokens in the text width `[1, F/4, H]` and which are real `[1, F/4]` (a prefix), from its
        log-mel frames `[1, F, mel]` and which are real `[1, F]`. The example's encoder method."""
        t, params = self.cfg.towers, self.params()
        assert t is not None and t.audio is not None
        assert params.audio_tower is not None and params.embed_audio is not None
        return audio_soft(params.audio_tower, params.embed_audio, t.audio, features, mask)

    def speech_transform(self, waveform: Tensor) -> Tensor:
        """Log-mel frames `[F, mel]` of 16 kHz samples `[N]` (`g4.fn.audio.log_mel`). The example's method."""
        return log_mel(waveform)

    def vision_encoder(self, pixel_values: Tensor, pixel_position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """An image's soft tokens in the text width `[1, N/k^2, H]` and which are real `[1, N/k^2]` (a prefix),
        from its patches `[1, N, 3 * patch**2]` and their (x, y) `[1, N, 2]`. The example's encoder method."""
        t, params = self.cfg.towers, self.params()
        assert t is not None and t.vision is not None
        assert params.vision_tower is not None and params.embed_vision is not None
        soft, real = encode(params.vision_tower, t.vision, pixel_values, pixel_position_ids)
        return embed_soft(params.embed_vision, soft, t.vision.rms_norm_eps), real

    def _decode(self, tokens: Tensor, input_pos: Tensor, embeds: Tensor | None = None) -> Tensor:
        T = tokens.shape[1]
        start = cast(int, input_pos[0].item())  # a SymInt under torch.export, bounded for the custom ops
        torch._check_is_size(start)
        torch._check(start + T <= self.max_seq_len)
        torch._check(T <= self.ring_slots)
        positions = torch.arange(start, start + T, dtype=torch.int64)
        params = self.params()
        rot = cast(Tensor, self.rot)
        hooks = et_hooks(start, T, rot, self.int8) if self.custom_ops else inplace_hooks(rot)
        last = self.drafter.tokens + 1 if self.drafter else 1
        soft = blocks = None
        if embeds is not None:
            t = self.cfg.towers
            assert t is not None
            if t.bidirectional_vision:  # each image's placeholders attend both ways (an image comes in one call)
                blocks = image_blocks(tokens == t.image_token_id)
            tokens, where = placeholders(self.cfg, tokens)
            soft = where, embeds
        h, _ = hidden_states(
            params, self.cfg, tokens, positions, self.cache(), hooks=hooks, last=last, soft=soft, blocks=blocks
        )
        logits = head(params, self.cfg, h)
        if not self.drafter:
            return logits[:, -1]
        rows = torch.arange(h.shape[1])  # [min(T, N + 1)]
        cast(Tensor, self.hidden).index_copy_(1, rows, h)
        return logits

    def draft(self, tokens: Tensor, input_pos: Tensor, row: Tensor) -> Tensor:
        """The drafter's next token `[1]` after `tokens` `[1, 1]` at `input_pos` `[1]`, from `hidden[:, row]`
        (`row` `[1]`: 0..N, a hidden state of the last forward call; N + 1, the drafter's own last)."""
        assert self.drafter is not None
        position = cast(int, input_pos[0].item())
        torch._check_is_size(position)
        torch._check(position >= 1)
        torch._check(position < self.max_seq_len)
        params, rot, hidden = self.params(), cast(Tensor, self.rot), cast(Tensor, self.hidden)
        e = embed(params.embed_tokens, tokens, self.cfg.hidden_size**0.5)
        x = torch.cat([e, hidden.index_select(1, row)], -1)  # [1, 1, 2H]
        # Key positions from slot arithmetic, not from the tag buffers: a buffer this method only reads
        # would be folded into a constant at export. A ring of `draft_ring` slots still holds the
        # drafter's keys after a rollback, and the slots a rejected draft took are outside its window.
        kv = {
            t: (k, v, slot_positions(k.shape[1], position - 1, t == SLIDING))
            for t, (k, v, _) in target_kv(self.cfg, self.cache()).items()
        }
        d = self.drafter
        logits, h = draft_step(self._tree("draft"), d.cfg, x, input_pos, kv, draft_hooks(position, rot))
        hidden.narrow(1, d.tokens + 1, 1).copy_(h)
        return logits[:, -1].argmax(-1)
