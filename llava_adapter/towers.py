"""Vision towers for the LLaVA pipeline, and how many image tokens each one hands the LLM.

Four kinds of tower, all built by `AutoModel.from_config(config.vision_config)` inside transformers'
`LlavaModel`, so stock `generate`, `save_pretrained` and `from_pretrained` work for each:

- `SparseFormerModel` (model_type "sparseformer"): its `num_latent_tokens` (+ CLS), from the encoder config;
- HF `CLIPVisionModel` ("clip_vision_model"): the full-token baseline, one token per patch;
- `PooledVisionModel` ("pooled_vision"): a CLIP ViT whose patch tokens are average-pooled to an n×n grid, the
  baseline that asks whether a SparseFormer beats simply pooling the ViT to the same token budget (with `budgets`,
  M3-style nested grids served by one model);
- `VisionZipModel` ("visionzip", `visionzip.py`): a CLIP ViT cut to the budget by the CLS token's attention plus a
  few merged contextual tokens, the strongest training-free peer.

How a CLIP teacher's patch tokens are cut to a budget is a `REDUCTIONS` name: "pool" or "visionzip".
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
    LlavaConfig,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
)
from transformers.utils import ModelOutput

from mllm_sparse import SparseFormerConfig
from mllm_sparse.checkpoint import load_checked
from mllm_sparse.modeling import selected_hidden_states

from .processing import build_image_processor, build_processor
from .visionzip import VisionZipConfig, VisionZipModel
from .vit_budget import BudgetedViTConfig, BudgetedViTModel, num_patches

SELECT_STRATEGIES = ("default", "full")
REDUCTIONS = ("pool", "visionzip")  # how a CLIP teacher's patch tokens are cut to a budget


class PooledVisionConfig(BudgetedViTConfig):
    """A CLIP ViT tower whose patch tokens are average-pooled to `num_latent_tokens` (a square number) per layer.

    Args:
        vision_config: the ViT's `CLIPVisionConfig` (or its dict).
        num_latent_tokens: the token budget, pooled patch tokens per image (n×n) that the LLM reads; the CLS token is
            kept in front of them and not counted, so LLaVA's "default" selection strategy (drop the first token)
            yields exactly `num_latent_tokens`. A config saved with the old key `num_tokens` (same meaning) loads.
            With `budgets`, the default one (None: the largest of them, else 16).
        budgets: square token counts one model serves by pooling to each grid (M3-style nested scales; pooling has
            no weights, so every budget shares them all); `forward(..., num_latent_tokens=N)` picks one. None: one.
    """

    model_type = "pooled_vision"
    tower_name = "pooled"

    def __init__(
        self,
        vision_config: CLIPVisionConfig | dict | None = None,
        num_latent_tokens: int | None = None,
        budgets: list[int] | None = None,
        **kwargs,
    ):
        legacy = kwargs.pop("num_tokens", None)  # the key's name in configs saved before the rename
        if legacy is not None and num_latent_tokens is not None and legacy != num_latent_tokens:
            raise ValueError(
                f"PooledVisionConfig: num_tokens={legacy} and num_latent_tokens={num_latent_tokens} disagree; "
                "num_tokens is the old name of num_latent_tokens"
            )
        default = max(budgets) if budgets else 16
        num_latent_tokens = next((n for n in (num_latent_tokens, legacy) if n is not None), default)
        super().__init__(vision_config, num_latent_tokens, budgets, **kwargs)

    def check_budget(self, num_latent_tokens: int) -> None:
        n, grid = num_latent_tokens, math.isqrt(num_patches(self.vision_config))
        if n < 1 or math.isqrt(n) ** 2 != n:
            raise ValueError(f"PooledVisionConfig: num_latent_tokens must be a square number (n×n grid), got {n}")
        if (side := math.isqrt(n)) > grid:
            raise ValueError(f"PooledVisionConfig: a {side}×{side} grid cannot pool a {grid}×{grid} patch grid")


@dataclass
class PooledVisionOutput(ModelOutput):
    """`last_hidden_state`: [B, 1 + n², C]; `hidden_states`: one [B, 1 + n², C] entry per CLIP hidden state."""

    last_hidden_state: Tensor | None = None
    pooler_output: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None


class PooledVisionModel(BudgetedViTModel):
    config_class = PooledVisionConfig
    base_model_prefix = "pooled_vision"

    def pool(self, tokens: Tensor, num_latent_tokens: int | None = None) -> Tensor:
        """[B, 1 + P, C] CLS + patch tokens → [B, 1 + n², C] CLS + average-pooled patch grid (row-major), n² the
        budget (None: the default)."""
        cls, patches = tokens[:, :1], tokens[:, 1:]
        batch, length, width = patches.shape
        grid = math.isqrt(length)
        side = math.isqrt(self.config.budget(num_latent_tokens))
        patches = patches.transpose(1, 2).reshape(batch, width, grid, grid)
        pooled = F.adaptive_avg_pool2d(patches, side).flatten(2).transpose(1, 2)
        return torch.cat([cls, pooled], dim=1)

    def forward(
        self,
        pixel_values: Tensor,
        output_hidden_states: bool | int | list[int] | None = None,
        return_dict: bool | None = None,
        num_latent_tokens: int | None = None,
        **kwargs,
    ) -> PooledVisionOutput:
        """[B, 3, S, S] → pooled tokens at budget `num_latent_tokens` (None: the default). `output_hidden_states`
        may be an int or list (HF's `vision_feature_layer`): only those entries are pooled and the others are None."""
        n = self.config.budget(num_latent_tokens)
        out = self.vit(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states
        keep = selected_hidden_states(output_hidden_states, len(hidden))
        return PooledVisionOutput(
            last_hidden_state=self.pool(out.last_hidden_state, n),
            pooler_output=out.pooler_output,
            hidden_states=None
            if keep is None
            else tuple(self.pool(h, n) if i in keep else None for i, h in enumerate(hidden)),
        )


AutoConfig.register(PooledVisionConfig.model_type, PooledVisionConfig, exist_ok=True)
AutoModel.register(PooledVisionConfig, PooledVisionModel, exist_ok=True)


@dataclass(frozen=True)
class LayerTokens:
    """The tokens a vision tower yields at one layer, as its config gives them.

    Attributes:
        num_latent_tokens: the image tokens proper, the budget an LLM reads: a SparseFormer's latent tokens, a pooled
            ViT's grid cells, a ViT's patches; never a CLS token.
        has_cls: whether a CLS token comes first, before them (LLaVA's "default" selection drops it).
        width: channels per token.
        budgets: every `num_latent_tokens` the tower serves, ascending: an elastic SparseFormer's budgets, else the
            one count `num_latent_tokens` (the default) is.
    """

    num_latent_tokens: int
    has_cls: bool
    width: int
    budgets: tuple[int, ...]


def layer_tokens(vision_config: PretrainedConfig, layer: int) -> LayerTokens:
    """What the tower of `vision_config` yields at hidden state `layer` (negative counts from the end).

    The one place a tower config's token count is read: everything downstream (the LLaVA config's image_seq_length,
    the processor's placeholders, the regions picture) derives from it.
    """
    if isinstance(vision_config, SparseFormerConfig):
        unit = layer % vision_config.num_units
        has_cls = vision_config.has_cls_token and unit >= vision_config.cls_token_insert_layer
        n = vision_config.num_latent_tokens
        budgets = tuple(vision_config.budgets) if vision_config.is_elastic else (n,)
        return LayerTokens(n, has_cls, vision_config.width_configs[unit], budgets)
    if isinstance(vision_config, (PooledVisionConfig, VisionZipConfig)):
        n = vision_config.num_latent_tokens
        return LayerTokens(n, True, vision_config.hidden_size, tuple(vision_config.budgets or [n]))
    if isinstance(vision_config, (CLIPVisionConfig, SiglipVisionConfig)):
        patches = (vision_config.image_size // vision_config.patch_size) ** 2
        return LayerTokens(patches, isinstance(vision_config, CLIPVisionConfig), vision_config.hidden_size, (patches,))
    raise ValueError(
        f"Unsupported vision tower {type(vision_config).__name__}; expected a SparseFormer, CLIP, SigLIP, pooled or "
        "visionzip tower"
    )


def num_image_tokens(
    vision_config: PretrainedConfig, layer: int, select_strategy: str, num_latent_tokens: int | None = None
) -> int:
    """Image placeholders per image: the features the tower hands the LLM at `layer` after selection.

    The layer's `num_latent_tokens` (or the budget `num_latent_tokens`, one the tower serves), plus its CLS token
    where it has one and "full" keeps it ("default" drops it).
    """
    if select_strategy not in SELECT_STRATEGIES:
        raise ValueError(f"vision_feature_select_strategy must be one of {SELECT_STRATEGIES}, got {select_strategy!r}")
    tokens = layer_tokens(vision_config, layer)
    if select_strategy == "default" and not tokens.has_cls:
        raise ValueError(
            f"Layer {layer} of the {vision_config.model_type} tower has no CLS token to drop (a SigLIP ViT, or a "
            "SparseFormer unit before its CLS token is inserted); use vision_feature_select_strategy='full'"
        )
    n = tokens.num_latent_tokens if num_latent_tokens is None else int(num_latent_tokens)
    if n not in tokens.budgets:
        kind = "elastic tower serves" if len(tokens.budgets) > 1 else "tower serves only"
        raise ValueError(f"num_latent_tokens={n}: this {vision_config.model_type} {kind} {list(tokens.budgets)}")
    return n + int(tokens.has_cls and select_strategy == "full")


@dataclass
class LoadedTower:
    """A vision tower with the pixel normalisation its weights expect."""

    model: PreTrainedModel
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_tower(
    spec: str, num_latent_tokens: int | None = None, reduction: str = "pool", budgets: list[int] | None = None
) -> LoadedTower:
    """A vision tower for a LLaVA model.

    Args:
        spec: a saved tower folder (a bootstrapped SparseFormer, or any `AutoModel` vision tower), or a CLIP teacher
            spec (`open_clip:…`, `hf:…`, see `bootstrap.load_teacher`), which becomes an HF `CLIPVisionModel` (or
            `SiglipVisionModel`): the full-token baseline.
        num_latent_tokens: with a CLIP spec, cut its patch tokens to this many by `reduction` (the CLS token not
            counted): a baseline at the same token budget as a SparseFormer. None: every patch (or the largest of
            `budgets`).
        reduction: "pool" (average-pool to an n×n grid, N square) or "visionzip" (`visionzip.VisionZipModel`).
        budgets: with a CLIP spec, one tower serving each of these budgets (M3-style nested pooling, or VisionZip at
            each count); `num_latent_tokens` is then the default one.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if budgets and num_latent_tokens is None:
        num_latent_tokens = max(budgets)
    if spec.startswith(("open_clip:", "hf:")):
        from bootstrap import load_teacher

        teacher = load_teacher(spec)
        clip = teacher.to_hf_vision()
        if num_latent_tokens is not None and not isinstance(clip.config, CLIPVisionConfig):
            raise ValueError(
                f"--num-latent-tokens: cutting the patch tokens needs a CLIP ViT teacher (with a CLS token); {spec} "
                "is not one"
            )
        if num_latent_tokens is not None:
            kind = (PooledVisionConfig, PooledVisionModel) if reduction == "pool" else (VisionZipConfig, VisionZipModel)
            tower = kind[1](kind[0](clip.config, num_latent_tokens=num_latent_tokens, budgets=budgets))
            tower.vit.load_state_dict(clip.state_dict(), strict=True)
            clip = tower.eval()
        return LoadedTower(clip, tuple(teacher.arch.mean), tuple(teacher.arch.std))
    if num_latent_tokens is not None or reduction != "pool":
        raise ValueError(
            "--num-latent-tokens, --budgets and --reduction cut a CLIP teacher spec (open_clip:… or hf:…); a saved "
            "tower folder's config sets its own token budget"
        )
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


def processor_for(tower: LoadedTower, tokenizer, config: LlavaConfig, image_aspect_ratio: str = "pad"):
    """The `SparseLlavaProcessor` of the LLaVA model `config` with this tower: its image size and normalisation, and
    the placeholders per image at each budget the tower serves (`image_seq_length` at the default one)."""
    image_processor = build_image_processor(tower.model.config.image_size, tower.mean, tower.std, image_aspect_ratio)
    return build_processor(tokenizer, image_processor, config.image_seq_length, image_token_table(config))


def image_token_table(config: LlavaConfig) -> dict[int, int] | None:
    """{budget: image placeholders per image at it} for every budget the LLaVA model's tower serves; None for a
    tower that serves one budget (its count is `config.image_seq_length`)."""
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    served = layer_tokens(config.vision_config, layer).budgets
    if len(served) == 1:
        return None
    return {n: num_image_tokens(config.vision_config, layer, strategy, n) for n in served}
