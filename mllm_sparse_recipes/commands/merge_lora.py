"""`mllm-sparse merge-lora`: fold a LoRA training run into one full LLaVA model folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import parser as command_parser
from . import settings_from

SETTINGS = "llava_adapter.merge_lora:MergeLoraSettings"  # what `main` hands to the library

DESCRIPTION = """Fold a LoRA training run into one full model folder.

    mllm-sparse merge-lora --adapter runs/stage2-lora --out runs/stage2-merged

The run's folder holds the adapter, `non_lora_trainables.safetensors` (the projector and any unfrozen tower blocks,
trained alongside the adapter) and `lora_base.json` naming the base model; the merged folder loads with
`AutoModelForImageTextToText` like any other."""


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("merge-lora", DESCRIPTION)
    p.add_argument("--adapter", required=True, type=Path, help="output folder of a --lora_enable training run")
    p.add_argument("--out", required=True, type=Path, help="folder for the merged model")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from llava_adapter.merge_lora import MergeLoraSettings, run

    out = run(settings_from(args, MergeLoraSettings))
    print(f"Merged {args.adapter} into {out}")
    return 0
