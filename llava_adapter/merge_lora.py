"""`mllm-sparse merge-lora`: fold a LoRA training run into one full model folder.

    mllm-sparse merge-lora --adapter runs/stage2-lora --out runs/stage2-merged

The run's folder holds the adapter, `non_lora_trainables.safetensors` (the projector and any unfrozen tower blocks,
trained alongside the adapter) and `lora_base.json` naming the base model; the merged folder loads with
`AutoModelForImageTextToText` like any other.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from .train import LORA_BASE_DIR, NON_LORA_FILE, is_llava_folder


def merge_lora(adapter_dir: str | Path, out_dir: str | Path) -> LlavaForConditionalGeneration:
    """Base model + non-LoRA trainables + merged adapter, saved with the run's processor to `out_dir`."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    info = adapter_dir / "lora_base.json"
    if not info.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a LoRA training output (no lora_base.json)")
    base_dir = json.loads(info.read_text())["base"]
    if not is_llava_folder(base_dir):
        raise FileNotFoundError(
            f"LoRA base {base_dir} (from {info}) is not a LLaVA folder; runs that assembled their model keep it in "
            f"{adapter_dir / LORA_BASE_DIR}"
        )
    model = LlavaForConditionalGeneration.from_pretrained(base_dir)
    extra = load_file(str(adapter_dir / NON_LORA_FILE))
    unknown = sorted(set(extra) - set(dict(model.named_parameters())))
    if unknown:
        raise KeyError(f"{adapter_dir / NON_LORA_FILE}: keys not in the base model {base_dir}: {unknown[:5]}")
    model.load_state_dict(extra, strict=False)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir)
    AutoProcessor.from_pretrained(adapter_dir).save_pretrained(out_dir)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mllm-sparse merge-lora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapter", required=True, type=Path, help="output folder of a --lora_enable training run")
    parser.add_argument("--out", required=True, type=Path, help="folder for the merged model")
    args = parser.parse_args(argv)
    merge_lora(args.adapter, args.out)
    print(f"Merged {args.adapter} into {args.out}")
    return 0
