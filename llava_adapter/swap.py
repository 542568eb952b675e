"""`mllm-sparse swap`: put a SparseFormer (or any tower) into an existing llava-hf checkpoint.

    mllm-sparse swap --llava llava-hf/llava-1.5-7b-hf --encoder runs/encoder --out runs/llava-sparse

The LLM and tokenizer are kept; the CLIP tower is replaced and a projector sized for the new tower is created.
That projector is untrained, so the result needs stage-1 training before use.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from mllm_sparse.checkpoint import load_checked
from mllm_sparse.files import write_json

from .build_vlm import add_tower_arguments, describe
from .modeling import model_folder, replace_tower
from .towers import load_tower, processor_for


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm-sparse swap", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--llava", required=True, help="a llava-hf checkpoint folder or hub id")
    add_tower_arguments(parser)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model = load_checked(
            LlavaForConditionalGeneration.from_pretrained, args.llava, what="LLaVA model", model_types=("llava",)
        )
    except OSError as err:
        raise FileNotFoundError(
            f"LLaVA checkpoint {args.llava!r} could not be loaded ({err}); offline, pass a local llava-hf folder"
        ) from err
    tokenizer = _tokenizer(args.llava)
    old = (model.config.vision_config.model_type, model.config.image_seq_length)
    tower = load_tower(args.encoder, args.pool_tokens)
    model = replace_tower(model, tower.model, args.projector, args.vision_feature_layer, args.vision_select_strategy)
    processor = processor_for(tower, tokenizer, model.config.image_seq_length, args.image_aspect_ratio)
    with model_folder(args.out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(
            tmp / "swap_report.json",
            {
                "source": args.llava,
                "replaced_tower": {"model_type": old[0], "image_tokens": old[1]},
                "new_tower": {"spec": args.encoder, "image_tokens": model.config.image_seq_length},
                "projector": "new, untrained: needs stage-1 training",
            },
        )
    print(describe(model, args.out))
    print(
        f"Replaced a {old[0]} tower ({old[1]} image tokens). The projector is NEW and UNTRAINED: run stage 1 "
        "(scripts/train_vlm.py --tune_mm_mlp_adapter True) before using this model."
    )
    return 0


def _tokenizer(path: str):
    try:
        return AutoProcessor.from_pretrained(path).tokenizer
    except (OSError, ValueError, TypeError):
        return AutoTokenizer.from_pretrained(path)
