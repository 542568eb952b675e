"""What `mllm-sparse inspect` does: an encoder's parameters, GFLOPs and tokens, and a picture of where they look."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .images import DEFAULT_CROP_PCT, center_square, load_image, preprocess
from .modeling import SparseFormerModel
from .presets import create_model, list_models
from .profiling import profile
from .visualize import draw_rois, with_caption

PICTURE_SIDE = 448  # the RoI picture is drawn at least this large, from the image itself (not the model input)


@dataclass
class InspectSettings:
    """What `mllm-sparse inspect` does: one field per option of the command.

    Attributes:
        encoder: a preset name or a `save_pretrained` folder.
        pretrained: weights for a preset (official .pth, .safetensors, a folder or "official").
        num_latent_tokens: a preset's token budget, the image tokens an LLM would read (the CLS token is not one).
        image: the image to encode; None: a generated test pattern.
        image_size: input side in pixels; None: the encoder's `image_size`.
        out: where the RoI picture goes.
        points: also draw each token's sampling points.
    """

    encoder: str
    pretrained: str | None = None
    num_latent_tokens: int | None = None
    image: Path | None = None
    image_size: int | None = None
    out: Path = Path("roi.png")
    points: bool = False


def load_encoder(spec: str, pretrained: str | None = None, num_latent_tokens: int | None = None) -> SparseFormerModel:
    """A preset name (optionally with weights and another token budget) or a `save_pretrained` folder."""
    if Path(spec).is_dir():
        if pretrained or num_latent_tokens:
            raise ValueError("--pretrained and --num-latent-tokens apply to presets, not to a saved encoder folder")
        return SparseFormerModel.from_pretrained(spec).eval()
    if spec not in list_models():
        raise ValueError(f"{spec!r} is neither a folder nor a preset. Presets: {', '.join(list_models())}")
    overrides = {} if num_latent_tokens is None else {"num_latent_tokens": num_latent_tokens}
    return create_model(spec, pretrained=pretrained, **overrides)


def test_pattern(size: int) -> Image.Image:
    """A deterministic picture with a few shapes of different sizes, so RoIs have something to look at."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(40, 200, size, dtype=np.float32)
    background = np.stack(
        [np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size))], -1
    )
    image = Image.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        radius = rng.uniform(0.03, 0.15) * size
        cx, cy = rng.uniform(radius, size - radius, 2)
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=color)
    return image


def weights_origin(settings: InspectSettings) -> str:
    """Where the drawn model's weights come from, in words: a preset without `pretrained` has random ones."""
    if Path(settings.encoder).is_dir():
        return "weights: the saved folder's"
    return f"weights: {settings.pretrained}" if settings.pretrained else "RANDOM weights (no --pretrained)"


def run(settings: InspectSettings) -> dict[str, Any]:
    """Profile the encoder and draw its RoIs to `settings.out` (numbered, over the centre crop the encoder saw, at
    least `PICTURE_SIDE` px, with a caption naming the weights' origin); returns the profile with the picture's path
    and caption, the input side and the token counts."""
    if settings.image_size is not None and settings.image_size < 1:
        raise ValueError(f"--image-size must be a positive number of pixels, got {settings.image_size}")
    out = Path(settings.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a picture's file name, e.g. {out / 'roi.png'}")
    model = load_encoder(settings.encoder, settings.pretrained, settings.num_latent_tokens)
    config = model.config
    size = settings.image_size if settings.image_size is not None else config.image_size
    image = load_image(settings.image, draft_size=size) if settings.image else test_pattern(max(size, PICTURE_SIDE))
    pixels = preprocess(image, size, config.image_mean, config.image_std)
    cost = profile(model, size)
    with torch.no_grad():
        output = model(pixels.unsqueeze(0), output_sampling_points=settings.points)
    seen = center_square(image, DEFAULT_CROP_PCT)  # the crop `preprocess` made, at the image's own resolution
    if seen.width < PICTURE_SIDE:
        seen = seen.resize((PICTURE_SIDE, PICTURE_SIDE), Image.Resampling.BICUBIC)
    picture = draw_rois(seen, output, show_points=settings.points, numbered=True)
    caption = [
        f"{settings.encoder}: {config.num_latent_tokens} latent tokens, numbered; {weights_origin(settings)}",
        f"{'the image' if settings.image else 'a test pattern'}, centre-cropped as the encoder sees it at {size} px",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    with_caption(picture, caption).save(out)
    return {
        **cost.as_dict(),
        "image_size": size,
        "num_latent_tokens": config.num_latent_tokens,
        "cls_tokens": int(config.has_cls_token),
        "roi_picture": str(out),
        "caption": caption,
    }
