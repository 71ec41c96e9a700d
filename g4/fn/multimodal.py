"""Text with images and audio: soft tokens in place of the placeholder tokens (`Gemma4Model.forward`)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from g4.config import Config
from g4.fn.audio import audio_soft
from g4.fn.model import Soft, forward
from g4.fn.vision import embed_soft, encode_images
from g4.params import Params


def image_features(params: Params, cfg: Config, pixel_values: Tensor, image_position_ids: Tensor) -> Tensor:
    """Every image's soft tokens in the text width, `[n, H]` (HF's `get_image_features`, concatenated)."""
    t = cfg.towers
    if t is None or t.vision is None or params.vision_tower is None or params.embed_vision is None:
        raise ValueError("pixel_values: this model has no vision tower (load_checkpoint(..., towers=True))")
    v = t.vision
    if pixel_values.dim() != 3 or pixel_values.shape[-1] != 3 * v.patch_size**2:
        raise ValueError(f"pixel_values must be [B, N, {3 * v.patch_size**2}], got {tuple(pixel_values.shape)}")
    if image_position_ids.shape != (*pixel_values.shape[:2], 2) or image_position_ids.dtype != torch.int64:
        raise ValueError(
            f"image_position_ids must be int64 [B, N, 2] = {(*pixel_values.shape[:2], 2)}, got "
            f"{image_position_ids.dtype} {tuple(image_position_ids.shape)}"
        )
    if pixel_values.shape[1] % v.pooling_kernel_size**2:
        raise ValueError(f"pixel_values: {pixel_values.shape[1]} patches is no multiple of {v.pooling_kernel_size}^2")
    soft = encode_images(params.vision_tower, v, pixel_values, image_position_ids)
    return embed_soft(params.embed_vision, soft, v.rms_norm_eps)


def audio_features(params: Params, cfg: Config, input_features: Tensor, input_features_mask: Tensor) -> Tensor:
    """Every clip's real soft tokens in the text width, `[n, H]` (HF's `get_audio_features`, padding dropped)."""
    t = cfg.towers
    if t is None or t.audio is None or params.audio_tower is None or params.embed_audio is None:
        raise ValueError("input_features: this model has no audio tower (load_checkpoint(..., towers=True))")
    mel = t.audio.mel_bins
    if input_features.dim() != 3 or input_features.shape[-1] != mel:
        raise ValueError(f"input_features must be [B, F, {mel}], got {tuple(input_features.shape)}")
    if input_features_mask.shape != input_features.shape[:2] or input_features_mask.dtype != torch.bool:
        raise ValueError(
            f"input_features_mask must be bool [B, F] = {tuple(input_features.shape[:2])}, got "
            f"{input_features_mask.dtype} {tuple(input_features_mask.shape)}"
        )
    soft, real = audio_soft(params.audio_tower, params.embed_audio, t.audio, input_features, input_features_mask)
    return soft[real]


def image_blocks(is_image: Tensor) -> Tensor:
    """`[B, T]`: the number of each run of image placeholders (one image), -1 elsewhere (HF's block ids)."""
    after = torch.roll(is_image, 1, 1) & (torch.arange(is_image.shape[1]) > 0)  # the previous token is one
    return torch.where(is_image, (is_image & ~after).cumsum(1) - 1, -1)  # a roll: a shift torch.export keeps dynamic


def placeholders(cfg: Config, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """The ids with `<pad>` at the image and audio placeholders (HF embeds those, then overwrites them) and
    where they are `[B, T]`."""
    assert cfg.towers is not None
    where = is_any(input_ids, cfg.towers.soft_token_ids)
    return torch.where(where, cfg.pad_token_id, input_ids), where


def is_any(input_ids: Tensor, ids: tuple[int, ...]) -> Tensor:
    """Where `input_ids` holds one of `ids` (comparisons an export lowers, not `isin`)."""
    return functools.reduce(torch.logical_or, (input_ids == i for i in ids))


def spread(where: Tensor, rows: Tensor) -> Tensor:
    """`rows [n, H]` in order at the True places of `where [B, T]`, zeros elsewhere: `[B, T, H]`."""
    return rows.new_zeros(*where.shape, rows.shape[-1]).masked_scatter(where[..., None], rows)


def in_order(cfg: Config, input_ids: Tensor, images: Tensor | None, audio: Tensor | None) -> Tensor | None:
    """The image and the audio soft tokens `[n, H]` as their placeholders come in `input_ids` (what `merge` takes)."""
    assert cfg.towers is not None
    t, rows = cfg.towers, []
    for feats, token, what, source in (
        (images, t.image_token_id, "image", "images"),
        (audio, t.audio_token_id, "audio", "clips"),
    ):
        where = input_ids == token
        n, got = int(where.sum()), 0 if feats is None else feats.shape[0]
        if n != got:
            raise ValueError(
                f"input_ids: {n} {what} placeholder tokens, but the {source} give {got or 'no'} soft tokens"
            )
        if feats is not None:
            rows.append(spread(where, feats))
    return None if not rows else sum(rows[1:], rows[0])[is_any(input_ids, t.soft_token_ids)]


def merge(cfg: Config, input_ids: Tensor, soft: Tensor | None) -> tuple[Tensor, Soft | None, Tensor | None]:
    """Tokens with pad at the placeholders, `soft [n, H]` there in order, and the image blocks if attended both ways."""
    assert cfg.towers is not None
    tokens, where = placeholders(cfg, input_ids)
    n = int(where.sum())
    if n != (0 if soft is None else soft.shape[0]):
        got = "no" if soft is None else soft.shape[0]
        raise ValueError(f"input_ids: {n} image / audio placeholder tokens, but {got} soft tokens")
    if soft is None:
        return tokens, None, None
    is_image = input_ids == cfg.towers.image_token_id
    return tokens, (where, spread(where, soft)), image_blocks(is_image) if cfg.towers.bidirectional_vision else None


def multimodal_logits(
    params: Params,
    cfg: Config,
    input_ids: Tensor,
    *,
    pixel_values: Tensor | None = None,
    image_position_ids: Tensor | None = None,
    input_features: Tensor | None = None,
    input_features_mask: Tensor | None = None,
) -> Tensor:
    """Logits `[B, T, V]` of the no-cache forward with each image's and clip's soft tokens at their placeholders.

    Arguments are HF's processed inputs, by their HF names (`Gemma4Processor` output).
    """
    if cfg.towers is None:
        raise ValueError("cfg: no towers (load_checkpoint(..., towers=True))")
    images = audio = None
    if pixel_values is not None:
        if image_position_ids is None:
            raise ValueError("image_position_ids: needed with pixel_values")
        images = image_features(params, cfg, pixel_values, image_position_ids)
    if input_features is not None:
        if input_features_mask is None:
            raise ValueError("input_features_mask: needed with input_features")
        audio = audio_features(params, cfg, input_features, input_features_mask)
    tokens, soft, blocks = merge(cfg, input_ids, in_order(cfg, input_ids, images, audio))
    return forward(params, cfg, tokens, torch.arange(tokens.shape[1]), soft=soft, blocks=blocks)[0]
