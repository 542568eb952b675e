"""What `mllm-sparse swap` does: put a SparseFormer (or any tower) into an existing llava-hf checkpoint.

    mllm-sparse swap --llava llava-hf/llava-1.5-7b-hf --encoder runs/encoder --out runs/llava-sparse

The LLM and tokenizer are kept; the CLIP tower is replaced and a projector sized for the new tower is created.
That projector is untrained, so the result needs stage-1 training before use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from mllm_sparse.checkpoint import load_checked
from mllm_sparse.files import write_json

from .build_vlm import TowerSettings, summarize
from .modeling import model_folder, replace_tower
from .towers import load_tower, processor_for

REPORT_NAME = "swap_report.json"


@dataclass(kw_only=True)
class SwapSettings(TowerSettings):
    """What `mllm-sparse swap` does: one field per option of the command (the new tower's in `TowerSettings`).

    Attributes:
        llava: a llava-hf checkpoint folder or hub id; its LLM and tokenizer are kept.
        out: the model folder to write.
    """

    llava: str
    out: Path


def run(settings: SwapSettings) -> dict[str, Any]:
    """Replace the tower, save the model with a processor for the new tower and `swap_report.json` to `out`.

    Returns:
        `build_vlm.summarize` of the saved model, with `replaced_tower`: the old tower's model type and image tokens.
    """
    try:
        model = load_checked(
            LlavaForConditionalGeneration.from_pretrained, settings.llava, what="LLaVA model", model_types=("llava",)
        )
    except OSError as err:
        raise FileNotFoundError(
            f"LLaVA checkpoint {settings.llava!r} could not be loaded ({err}); offline, pass a local llava-hf folder"
        ) from err
    tokenizer = _tokenizer(settings.llava)
    old = {"model_type": model.config.vision_config.model_type, "image_tokens": model.config.image_seq_length}
    tower = load_tower(settings.encoder, settings.num_latent_tokens, settings.reduction, settings.budgets)
    model = replace_tower(
        model, tower.model, settings.projector, settings.vision_feature_layer, settings.vision_select_strategy
    )
    processor = processor_for(tower, tokenizer, model.config, settings.image_aspect_ratio)
    with model_folder(settings.out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(
            tmp / REPORT_NAME,
            {
                "source": settings.llava,
                "replaced_tower": old,
                "new_tower": {"spec": settings.encoder, "image_tokens": model.config.image_seq_length},
                "projector": "new, untrained: needs stage-1 training",
            },
        )
    return {**summarize(model, settings.out), "replaced_tower": old}


def _tokenizer(path: str):
    try:
        return AutoProcessor.from_pretrained(path).tokenizer
    except (OSError, ValueError, TypeError):
        return AutoTokenizer.from_pretrained(path)
