"""`mllm-sparse eval-encoder`: compare a bootstrapped encoder with its teacher."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import parser as command_parser
from . import settings_from

SETTINGS = "bootstrap.evaluate:EvalEncoderSettings"  # what `main` hands to the library


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "eval-encoder",
        "Compare a bootstrapped encoder with its teacher: held-out cosine of their embeddings, GFLOPs and tokens of "
        "both, and zero-shot top-1 side by side on a synthetic world (with the teacher's text tower). Prints the "
        "result as JSON.",
    )
    p.add_argument("--encoder", type=Path, required=True, help="a bootstrapped encoder folder")
    p.add_argument("--teacher", required=True, help="open_clip:NAME[@TAG|PATH] or hf:ID|DIR")
    p.add_argument("--data", type=Path, required=True, help="a synthetic world, image folder or LLaVA .json")
    p.add_argument(
        "--image-folder", type=Path, help="root of a LLaVA .json's image paths (default: the .json's folder)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available, else cpu)")
    p.add_argument("--out", type=Path, help="also write the result JSON here (default: printed only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from bootstrap.evaluate import EvalEncoderSettings, run

    print(json.dumps(run(settings_from(args, EvalEncoderSettings)), indent=2))
    return 0
