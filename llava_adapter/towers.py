"""Vision towers for the LLaVA pipeline, and how many image tokens each one hands the LLM.

Three kinds of tower, all built by `AutoModel.from_config(config.vision_config)` inside transformers'
`LlavaModel`, so stock `generate`, `save_pretrained` and `from_pretrained` work for each:

- `SparseFormerModel` (model_type "sparseformer"): N latent tokens (+ CLS), N from the encoder config;
- HF `CLIPVisionModel` ("clip_vision_model"): the full-token baseline, one token per patch;
- `PooledVisionModel` ("pooled_vision"): a CLIP ViT whose patch tokens are average-pooled to an n×n grid, the
  baseline that asks whether a SparseFormer beats simply pooling the ViT to the same token budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModel,
    CLIPVisionConfig,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
)
from transformers.utils import ModelOutput

from mllm_sparse import SparseFormerConfig
from mllm_sparse.checkpoint import load_checked
from mllm_sparse.modeling import selected_hidden_states

from .processing import build_image_processor, build_processor

SELECT_STRATEGIES = ("default", "full")


class PooledVisionConfig(PretrainedConfig):
    """A CLIP ViT tower whose patch tokens are average-pooled to `num_tokens` (a square number) per layer.

    Args:
        vision_config: the ViT's `CLIPVisionConfig` (or its dict).
        num_tokens: pooled patch tokens per image, n×n; the CLS token is kept in front of them, so LLaVA's
            "default" selection strategy (drop the first token) yields exactly `num_tokens`.
    """

    model_type = "pooled_vision"
    sub_configs = {"vision_config": CLIPVisionConfig}

    def __init__(self, vision_config: CLIPVisionConfig | dict | None = None, num_tokens: int = 16, **kwargs):
        if isinstance(vision_config, dict):
            vision_config = CLIPVisionConfig(**vision_config)
        self.vision_config = vision_config if vision_config is not None else CLIPVisionConfig()
        side = math.isqrt(num_tokens)
        if num_tokens < 1 or side * side != num_tokens:
            raise ValueError(f"PooledVisionConfig: num_tokens must be a square number (n×n grid), got {num_tokens}")
        grid = self.vision_config.image_size // self.vision_config.patch_size
        if side > grid:
            raise ValueError(f"PooledVisionConfig: a {side}×{side} grid cannot pool a {grid}×{grid} patch grid")
        self.num_tokens = num_tokens
        super().__init__(**kwargs)

    @property
    def hidden_size(self) -> int:
        return self.vision_config.hidden_size

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size


@dataclass
class PooledVisionOutput(ModelOutput):
    """`last_hidden_state`: [B, 1 + n², C]; `hidden_states`: one [B, 1 + n², C] entry per CLIP hidden state."""

    last_hidden_state: Tensor | None = None
    pooler_output: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None


class PooledVisionModel(PreTrainedModel):
    config_class = PooledVisionConfig
    base_model_prefix = "pooled_vision"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _supports_sdpa = True
    _no_split_modules = ["CLIPEncoderLayer"]

    def __init__(self, config: PooledVisionConfig):
        super().__init__(config)
        self.vit = AutoModel.from_config(config.vision_config)
        self.post_init()

    def pool(self, tokens: Tensor) -> Tensor:
        """[B, 1 + P, C] CLS + patch tokens → [B, 1 + n², C] CLS + average-pooled patch grid (row-major)."""
        cls, patches = tokens[:, :1], tokens[:, 1:]
        batch, num_patches, width = patches.shape
        grid = math.isqrt(num_patches)
        side = math.isqrt(self.config.num_tokens)
        patches = patches.transpose(1, 2).reshape(batch, width, grid, grid)
        pooled = F.adaptive_avg_pool2d(patches, side).flatten(2).transpose(1, 2)
        return torch.cat([cls, pooled], dim=1)

    def forward(
        self,
        pixel_values: Tensor,
        output_hidden_states: bool | int | list[int] | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> PooledVisionOutput:
        """[B, 3, S, S] → pooled tokens. `output_hidden_states` may be an int or list (HF's `vision_feature_layer`):
        only those entries are pooled and the others are None."""
        out = self.vit(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states
        keep = selected_hidden_states(output_hidden_states, len(hidden))
        return PooledVisionOutput(
            last_hidden_state=self.pool(out.last_hidden_state),
            pooler_output=out.pooler_output,
            hidden_states=None
            if keep is None
            else tuple(self.pool(h) if i in keep else None for i, h in enumerate(hidden)),
        )


AutoConfig.register(PooledVisionConfig.model_type, PooledVisionConfig, exist_ok=True)
AutoModel.register(PooledVisionConfig, PooledVisionModel, exist_ok=True)


def feature_width(vision_config: PretrainedConfig, feature_layer: int) -> int:
    """Channel width of the tokens at `feature_layer` (what the projector's first linear consumes)."""
    if isinstance(vision_config, SparseFormerConfig):
        return vision_config.width_configs[feature_layer % vision_config.num_units]
    return vision_config.hidden_size


def layer_has_cls(vision_config: SparseFormerConfig, feature_layer: int) -> bool:
    """Whether a SparseFormer's unit `feature_layer` (counted from the end when negative) has the CLS token."""
    unit = feature_layer % vision_config.num_units
    return vision_config.has_cls_token and unit >= vision_config.cls_token_insert_layer


def num_image_tokens(vision_config: PretrainedConfig, feature_layer: int, select_strategy: str) -> int:
    """Image placeholders per image: the tokens the tower yields at `feature_layer` after selection.

    Taken from the tower config (a SparseFormer's `num_tokens`, a ViT's patch grid, a pooled grid); never a constant.
    A SparseFormer layer before the CLS token is inserted has only the latent tokens.
    """
    if select_strategy not in SELECT_STRATEGIES:
        raise ValueError(f"vision_feature_select_strategy must be one of {SELECT_STRATEGIES}, got {select_strategy!r}")
    if isinstance(vision_config, SparseFormerConfig):
        with_cls = layer_has_cls(vision_config, feature_layer)
        tokens = vision_config.num_latent_tokens + int(with_cls)
        if select_strategy == "default" and not with_cls:
            raise ValueError(
                f"SparseFormer unit {feature_layer % vision_config.num_units} has no CLS token to drop; use "
                "vision_feature_select_strategy='full'"
            )
    elif isinstance(vision_config, PooledVisionConfig):
        tokens = 1 + vision_config.num_tokens
    elif isinstance(vision_config, CLIPVisionConfig):
        tokens = 1 + (vision_config.image_size // vision_config.patch_size) ** 2
    elif isinstance(vision_config, SiglipVisionConfig):
        tokens = (vision_config.image_size // vision_config.patch_size) ** 2
        if select_strategy == "default":
            raise ValueError("A SigLIP tower has no CLS token to drop; use vision_feature_select_strategy='full'")
    else:
        raise ValueError(
            f"Unsupported vision tower {type(vision_config).__name__}; expected a SparseFormer, CLIP, SigLIP or "
            "pooled tower"
        )
    return tokens - (1 if select_strategy == "default" else 0)


@dataclass
class LoadedTower:
    """A vision tower with the pixel normalisation its weights expect."""

    model: PreTrainedModel
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_tower(spec: str, pool_tokens: int | None = None) -> LoadedTower:
    """A vision tower for a LLaVA model.

    Args:
        spec: a saved tower folder (a bootstrapped SparseFormer, or any `AutoModel` vision tower), or a CLIP teacher
            spec (`open_clip:…`, `hf:…`, see `bootstrap.load_teacher`), which becomes an HF `CLIPVisionModel` (or
            `SiglipVisionModel`): the full-token baseline.
        pool_tokens: with a CLIP spec, average-pool its patch tokens to this many (a square number): the pooling
            baseline at the same token budget as a SparseFormer.
    """
    if spec.startswith(("open_clip:", "hf:")):
        from bootstrap import load_teacher

        teacher = load_teacher(spec)
        clip = teacher.to_hf_vision()
        if pool_tokens is not None and not isinstance(clip.config, CLIPVisionConfig):
            raise ValueError(f"--pool-tokens: the pooling baseline needs a CLIP ViT teacher; {spec} is not one")
        if pool_tokens is not None:
            tower = PooledVisionModel(PooledVisionConfig(clip.config, num_tokens=pool_tokens))
            tower.vit.load_state_dict(clip.state_dict(), strict=True)
            clip = tower.eval()
        return LoadedTower(clip, tuple(teacher.arch.mean), tuple(teacher.arch.std))
    if pool_tokens is not None:
        raise ValueError("--pool-tokens applies to a CLIP teacher spec (open_clip:… or hf:…), not a saved tower")
    from pathlib import Path

    from mllm_sparse.configuration import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    if not Path(spec).is_dir():
        raise FileNotFoundError(
            f"Vision tower {spec!r} is neither a folder with config.json nor a teacher spec (open_clip:…, hf:…)"
        )
    # A folder without config.json or weights, truncated weights, NaN/inf weights: one error naming the folder/file.
    model = load_checked(AutoModel.from_pretrained, spec, what="vision tower").eval()
    if isinstance(model.config, SparseFormerConfig):
        return LoadedTower(model, tuple(model.config.image_mean), tuple(model.config.image_std))
    return LoadedTower(model, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def processor_for(tower: LoadedTower, tokenizer, num_tokens: int, image_aspect_ratio: str = "pad"):
    """The `SparseLlavaProcessor` of a model with this tower: its image size and normalisation, N placeholders."""
    image_processor = build_image_processor(tower.model.config.image_size, tower.mean, tower.std, image_aspect_ratio)
    return build_processor(tokenizer, image_processor, num_tokens)
