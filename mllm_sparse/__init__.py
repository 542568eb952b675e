"""mllm_sparse: SparseFormer visual encoders for multimodal LLMs.

Importing this package registers `SparseFormerConfig` / `SparseFormerModel` with transformers' `AutoConfig` and
`AutoModel`, so `AutoModel.from_pretrained(dir)` rebuilds a saved encoder.
"""

import logging
import os

from transformers import AutoConfig, AutoModel

from .checkpoint import CheckpointMismatchError, load_pretrained, read_state_dict
from .configuration import SparseFormerConfig
from .elastic import make_elastic
from .images import ImageLoadError, center_square, load_image, preprocess
from .modeling import SparseFormerModel, SparseFormerOutput
from .open_clip_tower import OpenClipVisual
from .presets import OFFICIAL_PRESETS, create_model, list_models, preset_config
from .profiling import ModelProfile, profile
from .visualize import draw_rois

# transformers 5 swaps layers of a model from `from_pretrained` for kernels fetched from the Hub once it trains or
# evaluates on a GPU: offline that stops the run, online it runs downloaded code. Our models keep PyTorch's own ops
# unless a user asks for Hub kernels (USE_HUB_KERNELS=1).
os.environ.setdefault("USE_HUB_KERNELS", "0")


def _not_deepspeed_cpu_notice(record: logging.LogRecord) -> bool:
    return "Setting accelerator to CPU" not in record.getMessage()


# transformers imports DeepSpeed (when installed) as a model saves or loads, and on a machine without a GPU DeepSpeed
# then prints a warning to stdout that it fell back to the CPU, in the middle of every command's output.
logging.getLogger("DeepSpeed").addFilter(_not_deepspeed_cpu_notice)
AutoConfig.register(SparseFormerConfig.model_type, SparseFormerConfig, exist_ok=True)
AutoModel.register(SparseFormerConfig, SparseFormerModel, exist_ok=True)

__all__ = [
    "CheckpointMismatchError",
    "ImageLoadError",
    "ModelProfile",
    "OFFICIAL_PRESETS",
    "OpenClipVisual",
    "SparseFormerConfig",
    "SparseFormerModel",
    "SparseFormerOutput",
    "center_square",
    "create_model",
    "draw_rois",
    "list_models",
    "load_image",
    "load_pretrained",
    "make_elastic",
    "preprocess",
    "preset_config",
    "profile",
    "read_state_dict",
]
