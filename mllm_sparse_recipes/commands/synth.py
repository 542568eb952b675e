"""`mllm-sparse synth`: write the built-in synthetic world to a folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import parser as command_parser
from . import settings_from

SETTINGS = "mllm_sparse.synth.generate:SynthSettings"  # what `main` hands to the library
DIFFICULTIES = ("easy", "default", "hard")  # mllm_sparse.synth.world.DIFFICULTIES, without importing numpy


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("synth", "Generate scenes of coloured shapes with captions, class labels and LLaVA-format Q&A.")
    p.add_argument("--out", type=Path, required=True, help="output folder (must be empty or new)")
    p.add_argument("--num-images", type=int, default=2000, help="images in all: 80%% train, 10%% val, 10%% test")
    p.add_argument("--image-size", type=int, default=224, help="side of the square images in pixels")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same bytes (default: 0)")
    p.add_argument("--difficulty", choices=DIFFICULTIES, default="default", help="how crowded and small the scenes are")
    p.add_argument("--max-turns", type=int, help="questions per image record: 1 or 2..this many (default: 12)")
    p.add_argument("--workers", type=int, help="processes (default: all cores, at most 8)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mllm_sparse.synth.generate import SynthSettings, run

    world = run(settings_from(args, SynthSettings))
    rate = world["images_per_second"]
    print(json.dumps({"out": str(args.out), "splits": world["splits"], "images_per_second": rate}))
    return 0
