"""Loading and preprocessing images, with errors that name the file.

Odd images are normal input here: grayscale, palette and RGBA images become RGB; 16-bit and 32-bit grayscale images
are scaled to 8 bits by their range (PIL's own conversion clips them, so a 16-bit image would turn white); a 1×1 image
or a 10000×1 strip is cropped to a square before resizing, so no intermediate image grows past the output size.
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


# Largest value of PIL's single-channel modes that hold more than 8 bits; "I" and "F" have no fixed range (see
# `wide_range`).
WIDE_MODE_MAX = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}


def wide_range(mode: str, values: np.ndarray) -> float:
    """The value that maps to white for a wide grayscale image: the mode's maximum for 16-bit modes; for 32-bit
    integer ("I") or float ("F") images the smallest of 1 (float), 255, 65535 that holds the values, else their
    maximum."""
    if mode in WIDE_MODE_MAX:
        return WIDE_MODE_MAX[mode]
    top = float(values.max()) if values.size else 0.0
    for bound in ((1.0,) if mode == "F" else ()) + (255.0, 65535.0):
        if top <= bound:
            return bound
    return top


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB; a wide grayscale image (16-bit PNG "I;16", "I", "F") is scaled by its range
    (`wide_range`), not clipped as `Image.convert` does."""
    if image.mode in WIDE_MODE_MAX or image.mode in ("I", "F"):
        values = np.nan_to_num(np.asarray(image).astype(np.float64), posinf=0.0, neginf=0.0)
        gray = np.clip(values * (255.0 / wide_range(image.mode, values)), 0, 255)
        image = Image.fromarray(np.round(gray).astype(np.uint8))
    return image.convert("RGB")


def check_image_file(path: str | Path) -> Path:
    """`path` if it is a file; else `FileNotFoundError` (nothing there) or `ImageLoadError` (a directory or other
    non-file), each naming the path."""
    path = Path(path)
    if path.is_dir():
        raise ImageLoadError(f"Image {path} is a directory, not an image")
    if not path.exists():
        raise FileNotFoundError(f"Image file not found: {path}")
    if not path.is_file():
        raise ImageLoadError(f"Image {path} is not a regular file")
    return path


def load_image(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Open an image file as RGB.

    Args:
        path: the image file.
        draft_size: if given, JPEG decoding may downscale (by powers of two) to no less than this size, which keeps
            huge photos cheap to load.
    Raises:
        FileNotFoundError: no such file.
        ImageLoadError: a directory, corrupt, truncated, not an image, or over PIL's decompression-bomb limit.
    """
    path = check_image_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if draft_size is not None:
                    image.draft("RGB", (draft_size, draft_size))
                image.load()
                if image.width < 1 or image.height < 1:
                    raise ImageLoadError(f"Image {path} is empty ({image.width}×{image.height})")
                return to_rgb(image)
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


def square_pixels(image: Image.Image, image_size: int, crop_pct: float = DEFAULT_CROP_PCT) -> Tensor:
    """`preprocess` before its normalisation: the centre crop resized to a square, [3, S, S] uint8 (a quarter of
    the float's memory, for keeping many images decoded)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    square = center_square(to_rgb(image), crop_pct).resize((image_size, image_size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(square, dtype=np.uint8)).permute(2, 0, 1)


def normalize(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """[..., 3, H, W] uint8 → float32 scaled to [0, 1], less `mean`, over `std` (per channel)."""
    mean_t, std_t = channel_stats(mean, std)
    return (pixels.float() / 255.0 - mean_t) / std_t


def channel_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor]:
    """`mean` and `std` as [3, 1, 1] float32 tensors, to broadcast over [..., 3, H, W] pixels."""
    return tuple(torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in (mean, std))


def preprocess(
    image: Image.Image,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = DEFAULT_CROP_PCT,
) -> Tensor:
    """Centre-crop, resize to a square and normalise, as the reference evaluation does (resize 256, crop 224).

    Args:
        image: any PIL image (converted with `to_rgb`).
        image_size: output side S.
        mean / std: per-channel normalisation.
        crop_pct: fraction of the shorter side kept by the centre crop.
    Returns:
        [3, S, S] float32.
    """
    return normalize(square_pixels(image, image_size, crop_pct), mean, std)


def denormalize(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """Invert `preprocess`'s normalisation: [3, H, W] → RGB PIL image."""
    mean_t, std_t = channel_stats(mean, std)
    rgb = (pixels.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    return Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
