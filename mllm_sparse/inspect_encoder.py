"""`mllm-sparse inspect`: an encoder's parameters, GFLOPs and token count, and a picture of where its tokens look."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .images import denormalize, load_image, preprocess
from .modeling import SparseFormerModel
from .presets import create_model, list_models
from .profiling import profile
from .visualize import draw_rois


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm-sparse inspect", description="Print an encoder's cost and draw its tokens' RoIs over an image."
    )
    parser.add_argument("encoder", help=f"a preset ({', '.join(list_models())}) or a save_pretrained folder")
    parser.add_argument("--pretrained", help="weights for a preset: official .pth, .safetensors, folder or 'official'")
    parser.add_argument("--num-tokens", type=int, help="total output tokens for a preset (CLS included)")
    parser.add_argument("--image", type=Path, help="image to encode (default: a generated test pattern)")
    parser.add_argument("--image-size", type=int, help="input side in pixels (default: the encoder's image_size)")
    parser.add_argument("--out", type=Path, default=Path("roi.png"), help="where to write the RoI picture")
    parser.add_argument("--points", action="store_true", help="also draw each token's sampling points")
    parser.add_argument("--json", action="store_true", help="print the profile as JSON")
    return parser


def load_encoder(spec: str, pretrained: str | None = None, num_tokens: int | None = None) -> SparseFormerModel:
    """A preset name (optionally with weights) or a `save_pretrained` folder."""
    if Path(spec).is_dir():
        if pretrained or num_tokens:
            raise ValueError("--pretrained and --num-tokens apply to presets, not to a saved encoder folder")
        return SparseFormerModel.from_pretrained(spec).eval()
    if spec not in list_models():
        raise ValueError(f"{spec!r} is neither a folder nor a preset. Presets: {', '.join(list_models())}")
    overrides = {} if num_tokens is None else {"num_tokens": num_tokens}
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image-size must be a positive number of pixels, got {args.image_size}")
    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is a directory; give a picture's file name, e.g. {args.out / 'roi.png'}")
    model = load_encoder(args.encoder, args.pretrained, args.num_tokens)
    config = model.config
    size = args.image_size if args.image_size is not None else config.image_size
    image = load_image(args.image, draft_size=size) if args.image else test_pattern(size)
    pixels = preprocess(image, size, config.image_mean, config.image_std)
    cost = profile(model, size)
    with torch.no_grad():
        output = model(pixels.unsqueeze(0), output_sampling_points=args.points)
    picture = draw_rois(denormalize(pixels, config.image_mean, config.image_std), output, show_points=args.points)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(args.out)
    if args.json:
        print(json.dumps({**cost.as_dict(), "roi_picture": str(args.out)}))
    else:
        print(f"encoder     {args.encoder}")
        print(f"parameters  {cost.params / 1e6:.2f} M")
        print(f"GFLOPs      {cost.gflops:.2f} at {size}x{size}")
        print(f"tokens      {cost.num_tokens} ({config.num_latent_tokens} latent + {int(config.has_cls_token)} CLS)")
        print(f"RoIs drawn  {args.out}")
    return 0
