"""`mllm-sparse build-vlm`: assemble a LLaVA model from a vision tower, a new projector and a causal LM."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import parser as command_parser
from . import settings_from
from ._vlm_options import TINY_LLMS, UNTRAINED, add_tower_arguments, describe, take_deprecated_budget

SETTINGS = "llava_adapter.build_vlm:BuildVlmSettings"  # what `main` hands to the library

DESCRIPTION = """Assemble a LLaVA model: vision tower + projector + causal LM.

    mllm-sparse build-vlm --encoder runs/encoder --llm tiny-llama --tokenizer-corpus runs/world --out runs/vlm
    mllm-sparse build-vlm --encoder open_clip:local-dir:runs/teacher --num-latent-tokens 49 --llm tiny-llama \\
        --tokenizer-corpus runs/world --out runs/vlm-pool49

The output folder loads with stock `AutoModelForImageTextToText` / `AutoProcessor` after `import llava_adapter`.
The projector is new: train it (stage 1) before expecting sensible answers."""


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("build-vlm", DESCRIPTION)
    add_tower_arguments(p)
    p.add_argument("--llm", required=True, help=f"causal LM folder or hub id, or a tiny LLM ({', '.join(TINY_LLMS)})")
    p.add_argument("--tokenizer-corpus", type=Path, help="tiny LLMs: text to train the tokenizer on "
                   "(default: none; a tiny LLM needs it)")  # fmt: skip
    p.add_argument("--vocab-size", type=int, default=1024, help="tiny LLMs: BPE vocabulary size")
    p.add_argument("--out", type=Path, required=True, help="the model folder to write")
    p.add_argument("--seed", type=int, default=0, help="seeds the new projector and a tiny LLM (default: 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    take_deprecated_budget(args)
    from llava_adapter.build_vlm import BuildVlmSettings, run

    summary = run(settings_from(args, BuildVlmSettings))
    print(describe(summary))
    print(f"The projector is untrained: {UNTRAINED} first.")
    return 0
