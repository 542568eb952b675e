"""What `mllm-sparse merge-lora` does: fold a LoRA training run into one full model folder.

    mllm-sparse merge-lora --adapter runs/stage2-lora --out runs/stage2-merged

The run's folder holds the adapter, `non_lora_trainables.safetensors` (the projector and any unfrozen tower blocks,
trained alongside the adapter) and `lora_base.json` naming the base model; the merged folder loads with
`AutoModelForImageTextToText` like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoProcessor, LlavaForConditionalGeneration

from mllm_sparse.checkpoint import CheckpointError, load_checked, load_safetensors, read_state_dict
from mllm_sparse.files import read_json

from .modeling import model_folder
from .train import LORA_BASE_DIR, NON_LORA_FILE

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # what peft's `save_pretrained` writes


def merge_lora(adapter_dir: str | Path, out_dir: str | Path) -> LlavaForConditionalGeneration:
    """Base model + non-LoRA trainables + merged adapter, saved with the run's processor to `out_dir`.

    Every file read is checked first (truncated or corrupt files and NaN/inf tensors raise `CheckpointError` naming
    the file), and `out_dir` is written in one step (`model_folder`).
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    info = adapter_dir / "lora_base.json"
    if not info.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a LoRA training output (no lora_base.json)")
    recorded = read_json(info)
    if not isinstance(recorded, dict) or not isinstance(recorded.get("base"), str):
        raise CheckpointError(f'{info}: expected {{"base": "<base model folder>"}}, got {recorded!r}')
    base_dir = recorded["base"]
    if not Path(base_dir).is_dir():
        raise FileNotFoundError(
            f"LoRA base {base_dir} (from {info}) is not a folder; runs that assembled their model keep it in "
            f"{adapter_dir / LORA_BASE_DIR}"
        )
    adapters = [adapter_dir / name for name in ADAPTER_FILES if (adapter_dir / name).is_file()]
    if not adapters:
        raise FileNotFoundError(f"{adapter_dir} has no LoRA adapter ({' or '.join(ADAPTER_FILES)})")
    read_state_dict(adapters[0])  # peft's own load would name no file; this also refuses NaN/inf adapter weights
    extra = load_safetensors(adapter_dir / NON_LORA_FILE)
    model = load_checked(
        LlavaForConditionalGeneration.from_pretrained, base_dir, what="LoRA base model", model_types=("llava",)
    )
    unknown = sorted(set(extra) - set(dict(model.named_parameters())))
    if unknown:
        raise CheckpointError(f"{adapter_dir / NON_LORA_FILE}: keys not in the base model {base_dir}: {unknown[:5]}")
    model.load_state_dict(extra, strict=False)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    with model_folder(out_dir) as tmp:
        merged.save_pretrained(tmp)
        AutoProcessor.from_pretrained(adapter_dir).save_pretrained(tmp)
    return merged


@dataclass
class MergeLoraSettings:
    """What `mllm-sparse merge-lora` does: one field per option of the command.

    Attributes:
        adapter: the output folder of a `--lora_enable` training run.
        out: the folder for the merged model.
    """

    adapter: Path
    out: Path


def run(settings: MergeLoraSettings) -> Path:
    """`merge_lora(settings.adapter, settings.out)`; returns the merged model's folder."""
    merge_lora(settings.adapter, settings.out)
    return Path(settings.out)
