"""Loading and preprocessing images, with errors that name the file.

Odd images are normal input here: grayscale, palette and RGBA images become RGB; a 1×1 image or a 10000×1 strip is
cropped to a square before resizing, so no intermediate image grows past the output size.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

# The reference evaluation resizes to 256 and centre-crops 224: the crop keeps 87.5% of the shorter side.
DEFAULT_CROP_PCT = 0.875


class ImageLoadError(ValueError):
    """An image file exists but cannot be used; the message names the file."""


def load_image(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Open an image file as RGB.

    Args:
        path: the image file.
        draft_size: if given, JPEG decoding may downscale (by powers of two) to no less than this size, which keeps
            huge photos cheap to load.
    Raises:
        FileNotFoundError: no such file.
        ImageLoadError: corrupt, truncated, not an image, or over PIL's decompression-bomb limit.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if draft_size is not None:
                    image.draft("RGB", (draft_size, draft_size))
                image.load()
                if image.width < 1 or image.height < 1:
                    raise ImageLoadError(f"Image {path} is empty ({image.width}×{image.height})")
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(f"Image {path} is too large to decode safely: {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageLoadError):
            raise
        raise ImageLoadError(f"Cannot read image {path}: {err}") from err


def center_square(image: Image.Image, crop_pct: float = DEFAULT_CROP_PCT) -> Image.Image:
    """The centred square covering `crop_pct` of the shorter side (at least one pixel)."""
    side = max(1, round(min(image.size) * crop_pct))
    left = (image.width - side) // 2
    top = (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def preprocess(
    image: Image.Image,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = DEFAULT_CROP_PCT,
) -> Tensor:
    """Centre-crop, resize to a square and normalise, as the reference evaluation does (resize 256, crop 224).

    Args:
        image: any PIL image (converted to RGB).
        image_size: output side S.
        mean / std: per-channel normalisation.
        crop_pct: fraction of the shorter side kept by the centre crop.
    Returns:
        [3, S, S] float32.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    square = center_square(image.convert("RGB"), crop_pct).resize((image_size, image_size), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean_t) / std_t


def denormalize(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """Invert `preprocess`'s normalisation: [3, H, W] → RGB PIL image."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    rgb = (pixels.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    return Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
