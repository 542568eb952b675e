"""LLaVA's image aspect modes on non-square images: exactly the pixels the model receives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from llava_adapter.processing import build_image_processor

MEAN, STD = (0.5, 0.25, 0.5), (0.5, 0.5, 0.25)


def _stripes(length: int, across: int) -> np.ndarray:
    """[across, length, 3] uint8: every column a different colour, every row the same (so a vertical stretch is
    exact)."""
    cols = np.arange(length)
    line = np.stack([30 * cols, 255 - 30 * cols, 10 + 5 * cols], axis=-1).astype(np.uint8)
    return np.broadcast_to(line, (across, length, 3)).copy()


def _normalised(array: np.ndarray) -> torch.Tensor:
    """What the model receives for uint8 pixels [H, W, 3]: [3, H, W] (x / 255 − mean) / std."""
    x = torch.from_numpy(array.astype(np.float32) / 255).permute(2, 0, 1)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def _expected(mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(input image, expected 8×8 pixels) for a landscape input, each worked out without resampling."""
    if mode == "pad":
        image = _stripes(8, 4)  # 8 wide, 4 tall: 2 rows of the mean colour above, 2 below, then no resize
        expected = np.empty((8, 8, 3), dtype=np.uint8)
        expected[:] = [int(m * 255) for m in MEAN]
        expected[2:6] = image
    elif mode == "resize":
        image = _stripes(8, 4)  # squashed to 8×8: the 4 rows stretch to 8, the columns stay
        expected = _stripes(8, 8)
    else:
        image = _stripes(16, 8)  # shorter side already 8, then the centred 8 columns
        expected = image[:, 4:12]
    return image, expected


@pytest.mark.parametrize("orientation", ["landscape", "portrait"])
@pytest.mark.parametrize("mode", ["pad", "resize", "crop"])
def test_each_aspect_mode_gives_the_model_the_worked_out_pixels(mode, orientation):
    image, expected = _expected(mode)
    if orientation == "portrait":  # the same case turned on its side
        image, expected = image.transpose(1, 0, 2).copy(), expected.transpose(1, 0, 2).copy()
    processor = build_image_processor(8, MEAN, STD, image_aspect_ratio=mode)
    pixels = processor(images=[Image.fromarray(image)], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 8, 8)
    torch.testing.assert_close(pixels[0], _normalised(expected), atol=1e-5, rtol=0)
