"""`mllm-sparse build-vlm`: assemble a new LLaVA model from a vision tower, a projector and a causal LM.

    mllm-sparse build-vlm --encoder runs/encoder --llm tiny-llama --tokenizer-corpus runs/world --out runs/vlm
    mllm-sparse build-vlm --encoder open_clip:local-dir:runs/teacher --llm lmsys/vicuna-7b-v1.5 --out runs/vlm-vit

The output folder loads with stock `AutoModelForImageTextToText` / `AutoProcessor` after `import llava_adapter`.
The projector is new: train it (stage 1) before expecting sensible answers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mllm_sparse.checkpoint import check_finite, check_model_folder

from .llms import TINY_LLMS, load_llm
from .modeling import PROJECTORS, build_vlm, model_folder
from .processing import IMAGE_ASPECT_RATIOS
from .towers import SELECT_STRATEGIES, load_tower, processor_for


def add_tower_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--encoder",
        required=True,
        help="vision tower: a bootstrapped SparseFormer folder, or a CLIP teacher spec (open_clip:…, hf:…) for the "
        "full-token ViT baseline",
    )
    parser.add_argument(
        "--pool-tokens", type=int, help="with a CLIP spec: average-pool its patch tokens to this many (n×n)"
    )
    parser.add_argument("--projector", choices=sorted(PROJECTORS), default="mlp2x_gelu")
    parser.add_argument("--vision-feature-layer", type=int, help="tower layer fed to the projector (default -2)")
    parser.add_argument(
        "--vision-select-strategy",
        choices=SELECT_STRATEGIES,
        help="'default' drops the first (CLS) token, 'full' keeps all (default: 'default' where the layer has a CLS "
        "token, so a SparseFormer gives its latent tokens; 'full' for SigLIP)",
    )
    parser.add_argument("--image-aspect-ratio", choices=IMAGE_ASPECT_RATIOS, default="pad")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm-sparse build-vlm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_tower_arguments(parser)
    parser.add_argument(
        "--llm", required=True, help=f"causal LM folder or hub id, or a tiny LLM ({', '.join(TINY_LLMS)})"
    )
    parser.add_argument("--tokenizer-corpus", type=Path, help="tiny LLMs: text to train the tokenizer on")
    parser.add_argument("--vocab-size", type=int, default=1024, help="tiny LLMs: BPE vocabulary size")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    tower = load_tower(args.encoder, args.pool_tokens)
    llm, tokenizer = load_llm_checked(args.llm, args.tokenizer_corpus, args.vocab_size, args.seed)
    model = build_vlm(
        tower.model, llm, tokenizer, args.projector, args.vision_feature_layer, args.vision_select_strategy
    )
    processor = processor_for(tower, tokenizer, model.config.image_seq_length, args.image_aspect_ratio)
    with model_folder(args.out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    print(describe(model, args.out))
    print("The projector is untrained: run stage 1 (scripts/train_vlm.py --tune_mm_mlp_adapter True) first.")
    return 0


def load_llm_checked(name_or_dir: str, corpus: Path | None, vocab_size: int, seed: int):
    """`llms.load_llm`, with a local LLM folder checked first (truncated weights named by file) and the loaded weights
    checked finite."""
    if Path(name_or_dir).is_dir():
        check_model_folder(name_or_dir, what="causal LM")
    llm, tokenizer = load_llm(name_or_dir, corpus, vocab_size, seed)
    check_finite(llm.state_dict(), name_or_dir)
    return llm, tokenizer


def describe(model, out: Path) -> str:
    config = model.config
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return (
        f"Saved {out}: {config.vision_config.model_type} tower → {config.image_seq_length} image tokens "
        f"(layer {config.vision_feature_layer}, {config.vision_feature_select_strategy}), "
        f"{'linear' if config.projector_hidden_act == 'linear' else 'mlp2x_gelu'} projector, "
        f"{config.text_config.model_type} LLM; {params:.1f}M parameters"
    )
