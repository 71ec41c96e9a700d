"""Text with images: soft tokens in place of the placeholder tokens (`Gemma4Model.forward`)."""

from __future__ import annotations

import torch
from torch import Tensor

from g4.config import Config
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


def image_blocks(is_image: Tensor) -> Tensor:
    """`[B, T]`: the number of each run of image placeholders (one image), -1 elsewhere (HF's block ids)."""
    start = is_image & ~torch.nn.functional.pad(is_image[:, :-1], (1, 0))
    return torch.where(is_image, start.cumsum(1) - 1, -1)


def placeholders(cfg: Config, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """The ids with `<pad>` at the image placeholders (HF embeds those, then overwrites them) and where
    they are `[B, T]`."""
    assert cfg.towers is not None
    where = input_ids == cfg.towers.image_token_id
    return torch.where(where, cfg.pad_token_id, input_ids), where


def spread(where: Tensor, rows: Tensor) -> Tensor:
    """`rows [n, H]` in order at the True places of `where [B, T]`, zeros elsewhere: `[B, T, H]`."""
    return rows.new_zeros(*where.shape, rows.shape[-1]).masked_scatter(where[..., None], rows)


def merge(cfg: Config, input_ids: Tensor, features: Tensor | None) -> tuple[Tensor, Soft | None, Tensor | None]:
    """Tokens with pad at the placeholders, the soft tokens there, and the image blocks if attended both ways."""
    assert cfg.towers is not None
    tokens, is_image = placeholders(cfg, input_ids)
    n = int(is_image.sum())
    if n != (0 if features is None else features.shape[0]):
        got = "no image" if features is None else f"{features.shape[0]} soft tokens"
        raise ValueError(f"input_ids: {n} image placeholder tokens, but the images give {got}")
    if features is None:
        return tokens, None, None
    return (
        tokens,
        (is_image, spread(is_image, features)),
        image_blocks(is_image) if cfg.towers.bidirectional_vision else None,
    )


def multimodal_logits(
    params: Params,
    cfg: Config,
    input_ids: Tensor,
    *,
    pixel_values: Tensor | None = None,
    image_position_ids: Tensor | None = None,
) -> Tensor:
    """Logits `[B, T, V]` of the no-cache forward with each image's soft tokens at its placeholder tokens.

    Arguments are HF's processed inputs, by their HF names (`Gemma4Processor` output).
    """
    if cfg.towers is None:
        raise ValueError("cfg: no towers (load_checkpoint(..., towers=True))")
    feats = None
    if pixel_values is not None:
        if image_position_ids is None:
            raise ValueError("image_position_ids: needed with pixel_values")
        feats = image_features(params, cfg, pixel_values, image_position_ids)
    tokens, soft, blocks = merge(cfg, input_ids, feats)
    return forward(params, cfg, tokens, torch.arange(tokens.shape[1]), soft=soft, blocks=blocks)[0]
