"""llava_adapter: SparseFormer (and ViT baseline) towers inside stock HF `LlavaForConditionalGeneration` models.

Build (`build_vlm`, `mllm-sparse build-vlm`), swap towers (`replace_tower`, `mllm-sparse swap`), process inputs
(`SparseLlavaProcessor`: N placeholders from the tower), read LLaVA JSON (`LlavaJsonDataset`), train
(`scripts/train_vlm.py`, `llava_adapter.train`) and merge LoRA runs (`mllm-sparse merge-lora`).
"""

import mllm_sparse  # noqa: F401  (registers the towers and the processor with the Auto classes)

from .conversation import TEMPLATES, encode_conversation
from .data import DataCollatorForLlava, LlavaJsonDataset, ModalityLengthGroupedSampler
from .modeling import build_vlm, load_projector, replace_tower, save_projector
from .processing import SparseLlavaProcessor, build_image_processor, build_processor
from .towers import PooledVisionConfig, PooledVisionModel, load_tower, num_image_tokens

__all__ = [
    "TEMPLATES",
    "DataCollatorForLlava",
    "LlavaJsonDataset",
    "ModalityLengthGroupedSampler",
    "PooledVisionConfig",
    "PooledVisionModel",
    "SparseLlavaProcessor",
    "build_image_processor",
    "build_processor",
    "build_vlm",
    "encode_conversation",
    "load_projector",
    "load_tower",
    "num_image_tokens",
    "replace_tower",
    "save_projector",
]
