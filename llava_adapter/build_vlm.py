"""What `mllm-sparse build-vlm` does: assemble a new LLaVA model from a vision tower, a projector and a causal LM.

    mllm-sparse build-vlm --encoder runs/encoder --llm tiny-llama --tokenizer-corpus runs/world --out runs/vlm
    mllm-sparse build-vlm --encoder open_clip:local-dir:runs/teacher --llm lmsys/vicuna-7b-v1.5 --out runs/vlm-vit

The output folder loads with stock `AutoModelForImageTextToText` / `AutoProcessor` after `import llava_adapter`.
The projector is new: train it (stage 1) before expecting sensible answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlavaForConditionalGeneration

from mllm_sparse.checkpoint import check_finite, check_model_folder

from .budgets import served_budgets
from .llms import load_llm
from .modeling import build_vlm, model_folder, projector_type
from .towers import load_tower, processor_for


@dataclass(kw_only=True)
class TowerSettings:
    """How a vision tower goes into a LLaVA model: the options `build-vlm` and `swap` share.

    Attributes:
        encoder: the vision tower: a bootstrapped SparseFormer folder, or a CLIP teacher spec (`open_clip:…`, `hf:…`).
        num_latent_tokens: with a CLIP spec, cut its patch tokens to this many by `reduction`, the image tokens the
            LLM reads (CLS not counted); None: every patch token (a SparseFormer folder has its own).
        reduction: with a CLIP spec, how: "pool" (average-pool to an n×n grid, a square number) or "visionzip"
            (the most-attended patches plus merged contextual tokens, `visionzip.py`).
        budgets: with a CLIP spec, one tower serving each of these token counts (M3-style nested pooling, or
            VisionZip at each), `num_latent_tokens` (default: the largest) the default; train it with `--budgets`.
        projector: "mlp2x_gelu" or "linear" (`modeling.PROJECTORS`).
        vision_feature_layer: the tower layer the projector reads; None: -2.
        vision_select_strategy: "default" (drop the CLS token) or "full"; None: "default" where the layer has a CLS
            token, else "full".
        image_aspect_ratio: "pad", "resize" or "crop" (`processing.IMAGE_ASPECT_RATIOS`).
    """

    encoder: str
    num_latent_tokens: int | None = None
    reduction: str = "pool"
    budgets: list[int] | None = None
    projector: str = "mlp2x_gelu"
    vision_feature_layer: int | None = None
    vision_select_strategy: str | None = None
    image_aspect_ratio: str = "pad"


@dataclass(kw_only=True)
class BuildVlmSettings(TowerSettings):
    """What `mllm-sparse build-vlm` does: one field per option of the command (the tower's in `TowerSettings`).

    Attributes:
        llm: a causal LM folder or hub id, or a tiny LLM name (`llms.TINY_LLMS`).
        out: the model folder to write.
        tokenizer_corpus: tiny LLMs: text to train the tokenizer on.
        vocab_size: tiny LLMs: BPE vocabulary size.
        seed: seeds the new projector (and a tiny LLM's weights).
    """

    llm: str
    out: Path
    tokenizer_corpus: Path | None = None
    vocab_size: int = 1024
    seed: int = 0


def run(settings: BuildVlmSettings) -> dict[str, Any]:
    """Build the model and save it with its processor to `settings.out` (in one step: `model_folder`).

    Returns:
        `summarize` of the saved model.
    """
    torch.manual_seed(settings.seed)
    tower = load_tower(settings.encoder, settings.num_latent_tokens, settings.reduction, settings.budgets)
    llm, tokenizer = load_llm_checked(settings.llm, settings.tokenizer_corpus, settings.vocab_size, settings.seed)
    model = build_vlm(
        tower.model,
        llm,
        tokenizer,
        settings.projector,
        settings.vision_feature_layer,
        settings.vision_select_strategy,
    )
    processor = processor_for(tower, tokenizer, model.config, settings.image_aspect_ratio)
    with model_folder(settings.out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return summarize(model, settings.out)


def load_llm_checked(name_or_dir: str, corpus: Path | None, vocab_size: int, seed: int):
    """`llms.load_llm`, with a local LLM folder checked first (truncated weights named by file) and the loaded weights
    checked finite."""
    if Path(name_or_dir).is_dir():
        check_model_folder(name_or_dir, what="causal LM")
    llm, tokenizer = load_llm(name_or_dir, corpus, vocab_size, seed)
    check_finite(llm.state_dict(), name_or_dir)
    return llm, tokenizer


def summarize(model: LlavaForConditionalGeneration, out: Path) -> dict[str, Any]:
    """What a saved LLaVA model is made of: its tower type, the image tokens the LLM reads per image, the feature
    layer and selection, the projector, the LLM type and the parameter count (millions); `budgets` lists every
    budget an elastic tower serves (one entry for the others)."""
    config = model.config
    return {
        "out": str(out),
        "tower": config.vision_config.model_type,
        "image_tokens": config.image_seq_length,
        "budgets": served_budgets(model),
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "projector": projector_type(config),
        "llm": config.text_config.model_type,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }
