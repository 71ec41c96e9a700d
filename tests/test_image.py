"""Image files to the vision tower's inputs: equal to transformers' Gemma 4 image processor."""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.image_utils import load_image as hf_load_image

from g4.config import VisionConfig
from g4.image import load_image, preprocess

# (height, width, mode, format): landscape, portrait, 4:3 JPEG, a sliver whose short side rounds to 0
# blocks, one smaller than a patch (upscaled), alpha, grayscale, an EXIF-rotated JPEG
FILES = {
    "landscape.png": (200, 300, "RGB"),
    "photo.jpg": (480, 640, "RGB"),
    "portrait.png": (1000, 30, "RGB"),
    "sliver.png": (10, 4000, "RGB"),
    "speck.png": (5, 5, "RGB"),
    "alpha.png": (120, 90, "RGBA"),
    "gray.png": (64, 64, "L"),
    "rotated.jpg": (90, 160, "RGB"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (h, w, mode) in FILES.items():
        a = rng.integers(0, 256, (h, w) if mode == "L" else (h, w, len(mode)), dtype=np.uint8)
        exif = Image.Exif()
        if name.startswith("rotated"):
            exif[0x0112] = 6  # orientation: rotate 90 degrees on display
        Image.fromarray(a, mode).save(d / name, exif=exif)
    return d


@pytest.mark.parametrize("budget", [70, 280])
def test_preprocessing_equals_transformers(files, budget):
    hf = transformers.Gemma4ImageProcessorPil(max_soft_tokens=budget)
    for name in FILES:
        want = hf(images=[hf_load_image(str(files / name))], return_tensors="pt")
        pixels, pos, counts = preprocess([load_image(files / name)], VisionConfig(), budget)
        assert torch.equal(pixels, want["pixel_values"]), name
        assert torch.equal(pos, want["image_position_ids"]), name
        assert counts == want["num_soft_tokens_per_image"].tolist(), name


def test_exif_orientation_is_applied(files):
    assert load_image(files / "rotated.jpg").size == (90, 160)  # (width, height): stored 160 wide, shown upright


def test_bad_images_name_the_file_or_argument(tmp_path):
    (tmp_path / "not.png").write_text("hello")
    with pytest.raises(ValueError, match=r"not\.png: not an image Pillow can read"):
        load_image(tmp_path / "not.png")
    with pytest.raises(ValueError, match=r"max_soft_tokens must be one of"):
        preprocess([Image.new("RGB", (32, 32))], VisionConfig(), 100)
