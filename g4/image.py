"""Image files to the vision tower's inputs, as transformers' Gemma 4 image processor makes them.

Pillow and numpy only: load (EXIF orientation applied, RGB), resize with bicubic filtering to the
largest size of whole k x k blocks of patches within the soft-token budget (aspect ratio kept),
scale to [0, 1], cut into raster-ordered patches, pad to the budget.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from g4.config import VisionConfig

SOFT_TOKENS = (70, 140, 280, 560, 1120)  # the budgets the processor accepts
DEFAULT_SOFT_TOKENS = 280


def load_image(path: str | os.PathLike) -> Image.Image:
    """An image file as RGB, turned upright by its EXIF orientation (as `transformers.image_utils.load_image`)."""
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: not an image Pillow can read ({e})") from None


def target_size(height: int, width: int, patch: int, max_patches: int, k: int) -> tuple[int, int]:
    """The resized (height, width): the largest multiples of k * patch within max_patches patches, the aspect
    ratio kept; a side that would be 0 is one block and the other as long as the ratio allows."""
    factor = math.sqrt(max_patches * patch**2 / (height * width))
    side = k * patch
    h, w = int(math.floor(factor * height / side)) * side, int(math.floor(factor * width / side)) * side
    if h == 0 and w == 0:
        raise ValueError(f"image of {height}x{width} pixels resizes to 0x0")
    longest = (max_patches // k**2) * side
    if h == 0:
        h, w = side, min(int(math.floor(width / height)) * side, longest)
    elif w == 0:
        h, w = min(int(math.floor(height / width)) * side, longest), side
    if h * w > max_patches * patch**2:
        raise ValueError(f"image of {height}x{width} pixels: {h}x{w} exceeds {max_patches} patches")
    return h, w


def preprocess(
    images: list[Image.Image], vc: VisionConfig, max_soft_tokens: int = DEFAULT_SOFT_TOKENS
) -> tuple[Tensor, Tensor, list[int]]:
    """HF's `pixel_values [n, N, 3 * patch**2]` (fp32 in [0, 1]), `image_position_ids [n, N, 2]` ((x, y), -1 for
    padding) and each image's number of soft tokens, for RGB images; N = max_soft_tokens * k**2."""
    if max_soft_tokens not in SOFT_TOKENS:
        raise ValueError(f"max_soft_tokens must be one of {SOFT_TOKENS}, got {max_soft_tokens}")
    p, k = vc.patch_size, vc.pooling_kernel_size
    N = max_soft_tokens * k**2
    pixels, positions, counts = [], [], []
    for im in images:
        h, w = target_size(im.height, im.width, p, N, k)
        if (h, w) != (im.height, im.width):
            im = im.resize((w, h), resample=Image.Resampling.BICUBIC)
        scaled = np.asarray(im).astype(np.float64) * (1 / 255)  # [h, w, 3]; HF rounds to fp32 after scaling in fp64
        x = scaled.astype(np.float32).reshape(h // p, p, w // p, p, 3).transpose(0, 2, 1, 3, 4).reshape(-1, p * p * 3)
        gx, gy = np.meshgrid(np.arange(w // p), np.arange(h // p), indexing="xy")
        pos = np.stack([gx, gy], -1).reshape(-1, 2)
        n = x.shape[0]
        pixels.append(np.pad(x, ((0, N - n), (0, 0))))
        positions.append(np.pad(pos, ((0, N - n), (0, 0)), constant_values=-1))
        counts.append(n // k**2)
    return torch.from_numpy(np.stack(pixels)), torch.from_numpy(np.stack(positions)).long(), counts
