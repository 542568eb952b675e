"""llava_adapter: SparseFormer (and ViT baseline) towers inside stock HF `LlavaForConditionalGeneration` models.

Build (`build_vlm`, `mllm-sparse build-vlm`), swap towers (`replace_tower`, `mllm-sparse swap`), process inputs
(`SparseLlavaProcessor`: N placeholders from the tower), run an elastic tower's model at any of its budgets
(`vlm_budget`), read LLaVA JSON (`LlavaJsonDataset`), train
(`scripts/train_vlm.py`, `llava_adapter.train`) and merge LoRA runs (`mllm-sparse merge-lora`).

Importing it registers its processor and the pooled and VisionZip ViT towers (and, through `mllm_sparse`, the
SparseFormer) with transformers' Auto classes: `import llava_adapter` is the one import a process needs before
`AutoModelForImageTextToText.from_pretrained` or `AutoProcessor.from_pretrained` loads a saved model.
"""

import mllm_sparse  # noqa: F401  (registers the SparseFormer)

from .budgets import served_budgets, vlm_budget
from .conversation import TEMPLATES, encode_conversation
from .data import DataCollatorForLlava, LlavaJsonDataset, ModalityLengthGroupedSampler
from .modeling import build_vlm, load_projector, replace_tower, save_projector
from .processing import SparseLlavaProcessor, build_image_processor, build_processor
from .towers import LayerTokens, PooledVisionConfig, PooledVisionModel, layer_tokens, load_tower, num_image_tokens

__all__ = [
    "TEMPLATES",
    "DataCollatorForLlava",
    "LayerTokens",
    "LlavaJsonDataset",
    "ModalityLengthGroupedSampler",
    "PooledVisionConfig",
    "PooledVisionModel",
    "SparseLlavaProcessor",
    "build_image_processor",
    "build_processor",
    "build_vlm",
    "encode_conversation",
    "layer_tokens",
    "load_projector",
    "load_tower",
    "num_image_tokens",
    "replace_tower",
    "save_projector",
    "served_budgets",
    "vlm_budget",
]
