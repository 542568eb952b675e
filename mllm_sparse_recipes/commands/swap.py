"""`mllm-sparse swap`: replace the vision tower of a llava-hf checkpoint, keeping its LLM and tokenizer."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import parser as command_parser
from . import settings_from
from ._vlm_options import UNTRAINED, add_tower_arguments, describe, take_deprecated_budget

SETTINGS = "llava_adapter.swap:SwapSettings"  # what `main` hands to the library

DESCRIPTION = """Put a SparseFormer (or any tower) into an existing llava-hf checkpoint.

    mllm-sparse swap --llava llava-hf/llava-1.5-7b-hf --encoder runs/encoder --out runs/llava-sparse

The LLM and tokenizer are kept; the CLIP tower is replaced and a projector sized for the new tower is created.
That projector is untrained, so the result needs stage-1 training before use."""


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("swap", DESCRIPTION)
    p.add_argument("--llava", required=True, help="a llava-hf checkpoint folder or hub id")
    add_tower_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="the model folder to write")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    take_deprecated_budget(args)
    from llava_adapter.swap import SwapSettings, run

    summary = run(settings_from(args, SwapSettings))
    old = summary["replaced_tower"]
    print(describe(summary))
    print(f"Replaced a {old['model_type']} tower ({old['image_tokens']} image tokens). The projector is NEW and "
          f"UNTRAINED: {UNTRAINED} before using this model.")  # fmt: skip
    return 0
