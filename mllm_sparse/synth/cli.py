"""`mllm-sparse synth`: write the built-in synthetic world to a folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .generate import generate_world
from .world import DIFFICULTIES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm-sparse synth",
        description="Generate scenes of coloured shapes with captions, class labels and LLaVA-format Q&A.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (must be empty or new)")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", choices=DIFFICULTIES, default="default")
    parser.add_argument("--max-turns", type=int, help="questions per image record: 1 or 2..this many (default 12)")
    parser.add_argument("--workers", type=int, help="processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise ValueError(f"{args.out} is not empty; pass --overwrite to write into it anyway")
    world = generate_world(
        args.out, args.num_images, args.image_size, args.seed, args.difficulty, args.workers, max_turns=args.max_turns
    )
    rate = world["num_images"] / max(world["generation_seconds"], 1e-9)
    print(json.dumps({"out": str(args.out), "splits": world["splits"], "images_per_second": round(rate, 1)}))
    return 0
