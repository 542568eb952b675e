"""A VisionZip-style vision tower: a CLIP ViT whose patch tokens are cut to a budget by the CLS token's attention.

VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025) keeps,
at the layer the LLM reads, the patches the CLS token attends to most (*dominant* tokens) and merges the rest into a
few *contextual* tokens. At one layer, for a budget of N tokens:

1. **Dominant:** the CLS token's attention to each patch, summed over heads, ranks the patches; the top N - C are kept
   as they are, in patch order.
2. **Contextual:** of the remaining patches, C spread evenly through them (every ⌊R/C⌋-th, in patch order) are
   targets; every other remaining patch joins the target whose key (the layer's keys averaged over heads) is most
   cosine-similar to its own; each contextual token is the mean of its target and the patches that joined it.

C is VisionZip's proportion, 10 contextual tokens in 64 (its 54 + 10; 108 + 20 at 128), rounded: 1 at 9 tokens, 2 at
16, 6 at 36. VisionZip counts the CLS token among its dominant tokens; here, as for every tower of this project, the
CLS token stays in front and outside the budget, so LLaVA's "default" strategy drops it and the LLM reads exactly N
(with "full" it reads the CLS token too, as VisionZip's LLM does). The ranking uses the attention of the layer that
produced the features the LLM reads: the CLS row is computed from that layer's queries and keys, so the ViT keeps
running its SDPA attention.

The tower has no weights of its own beyond the ViT's. Like the pooled tower, it can serve several budgets from one
model (`budgets`); it is then trained as one elastic LLaVA model (`--budgets` in `scripts/train_vlm.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoConfig, AutoModel, CLIPVisionConfig
from transformers.utils import ModelOutput

from mllm_sparse.modeling import selected_hidden_states

from .vit_budget import BudgetedViTConfig, BudgetedViTModel, clip_config, num_patches

CONTEXTUAL_SHARE = (10, 64)  # VisionZip's 10 contextual tokens in 64


def contextual_tokens(num_latent_tokens: int) -> int:
    """How many of `num_latent_tokens` are merged contextual tokens: VisionZip's share, rounded, at least 1 from 2."""
    share, of = CONTEXTUAL_SHARE
    if num_latent_tokens < 2:
        return 0
    return min(num_latent_tokens - 1, max(1, round(num_latent_tokens * share / of)))


class VisionZipConfig(BudgetedViTConfig):
    """A CLIP ViT tower that keeps `num_latent_tokens` tokens per image, VisionZip-style (module docstring).

    Args:
        vision_config: the ViT's `CLIPVisionConfig` (or its dict).
        num_latent_tokens: the token budget the LLM reads, dominant plus contextual (the CLS token in front is not
            counted). With `budgets`, the default one (None: the largest of them, or without them VisionZip's 64,
            at most every patch).
        budgets: token counts one model serves (each split into dominant and contextual by `contextual_tokens`);
            `forward(..., num_latent_tokens=N)` picks one. None: one.
    """

    model_type = "visionzip"
    tower_name = "visionzip"

    def __init__(
        self,
        vision_config: CLIPVisionConfig | dict | None = None,
        num_latent_tokens: int | None = None,
        budgets: list[int] | None = None,
        **kwargs,
    ):
        vision_config = clip_config(vision_config)
        if num_latent_tokens is None:
            num_latent_tokens = max(budgets) if budgets else min(64, num_patches(vision_config))
        super().__init__(vision_config, num_latent_tokens, budgets, **kwargs)


def visionzip_select(
    features: Tensor, cls_attention: Tensor, keys: Tensor, num_latent_tokens: int
) -> tuple[Tensor, Tensor]:
    """Cut one layer's tokens to `num_latent_tokens`, VisionZip-style.

    Args:
        features: [B, 1 + P, C] the layer's CLS token and P patch tokens.
        cls_attention: [B, P] the CLS token's attention to each patch (summed over heads).
        keys: [B, P, D] each patch's key at that layer (averaged over heads), the merging similarity.
        num_latent_tokens: N, dominant plus contextual.
    Returns:
        tokens: [B, 1 + N, C] the CLS token, the N - C dominant patches in patch order, the C contextual tokens.
        assignment: [B, P] for each patch, the index (0..N-1, after the CLS token) of the token it went into.
    """
    cls, patches = features[:, :1], features[:, 1:]
    batch, num_patches, _ = patches.shape
    num_contextual = contextual_tokens(num_latent_tokens)
    num_dominant = num_latent_tokens - num_contextual
    rows = torch.arange(batch, device=features.device)[:, None]

    dominant = cls_attention.topk(num_dominant, dim=1).indices.sort(dim=1).values  # [B, D]
    kept = torch.zeros(batch, num_patches, dtype=torch.bool, device=features.device)
    kept[rows, dominant] = True
    rest = torch.argsort(kept.to(torch.int8), dim=1, stable=True)[:, : num_patches - num_dominant]  # [B, R], in order
    assignment = torch.empty(batch, num_patches, dtype=torch.long, device=features.device)
    assignment[rows, dominant] = torch.arange(num_dominant, device=features.device)
    tokens = [cls, patches[rows, dominant]]
    if num_contextual:
        remaining = rest.shape[1]
        targets = torch.arange(0, remaining, max(1, remaining // num_contextual), device=features.device)
        targets = targets[:num_contextual]  # [C] positions within `rest`
        is_target = torch.zeros(remaining, dtype=torch.bool, device=features.device)
        is_target[targets] = True
        others = (~is_target).nonzero().squeeze(1)  # [R - C]
        unit = F.normalize(keys[rows, rest].float(), dim=-1)  # [B, R, D]
        joins = (unit[:, others] @ unit[:, targets].transpose(1, 2)).argmax(dim=2)  # [B, R - C]
        members = F.one_hot(joins, num_contextual).to(patches.dtype)  # [B, R - C, C]
        rest_features = patches[rows, rest]
        merged = rest_features[:, targets] + members.transpose(1, 2) @ rest_features[:, others]
        tokens.append(merged / (1 + members.sum(dim=1)).unsqueeze(-1))
        group = torch.empty(batch, remaining, dtype=torch.long, device=features.device)
        group[:, targets] = torch.arange(num_contextual, device=features.device)
        group[:, others] = joins
        assignment[rows, rest] = num_dominant + group
    return torch.cat(tokens, dim=1), assignment


def cls_attention_and_keys(layer: torch.nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """The CLS row of a `CLIPEncoderLayer`'s attention, summed over heads, and its patch keys averaged over heads.

    Args:
        layer: the encoder layer.
        hidden: [B, 1 + P, C] its input.
    Returns:
        [B, P] attention from the CLS token to each patch; [B, P, C / heads] keys.
    """
    attention = layer.self_attn
    heads, head_dim = attention.num_heads, attention.head_dim
    x = layer.layer_norm1(hidden)
    batch, length, _ = x.shape
    query = attention.q_proj(x[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2)  # [B, H, 1, d]
    key = attention.k_proj(x).view(batch, length, heads, head_dim).transpose(1, 2)  # [B, H, T, d]
    weights = ((query @ key.transpose(2, 3)) * attention.scale).float().softmax(dim=-1)  # [B, H, 1, T]
    return weights.sum(dim=1)[:, 0, 1:], key.mean(dim=1)[:, 1:]


@dataclass
class VisionZipOutput(ModelOutput):
    """`last_hidden_state`: [B, 1 + N, C]; `hidden_states`: one [B, 1 + N, C] entry per CLIP hidden state asked for
    (None for the others, and for the embeddings, which no attention layer produced); `assignments`: the matching
    [B, P] patch → token maps (`visionzip_select`)."""

    last_hidden_state: Tensor | None = None
    pooler_output: Tensor | None = None
    hidden_states: tuple[Tensor | None, ...] | None = None
    assignments: tuple[Tensor | None, ...] | None = None


class VisionZipModel(BudgetedViTModel):
    config_class = VisionZipConfig
    base_model_prefix = "visionzip"

    def select(self, hidden: tuple[Tensor, ...], index: int, num_latent_tokens: int) -> tuple[Tensor, Tensor]:
        """Hidden state `index` (≥ 1) cut to `num_latent_tokens` by the attention of the layer that produced it."""
        layer = self.vit.encoder.layers[index - 1]
        cls_attention, keys = cls_attention_and_keys(layer, hidden[index - 1])
        return visionzip_select(hidden[index], cls_attention, keys, num_latent_tokens)

    def forward(
        self,
        pixel_values: Tensor,
        output_hidden_states: bool | int | list[int] | None = None,
        return_dict: bool | None = None,
        num_latent_tokens: int | None = None,
        **kwargs,
    ) -> VisionZipOutput:
        """[B, 3, S, S] → tokens at budget `num_latent_tokens` (None: the default). `output_hidden_states` may be an
        int or list (HF's `vision_feature_layer`): only those entries are cut and the others are None."""
        n = self.config.budget(num_latent_tokens)
        out = self.vit(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states
        keep = selected_hidden_states(output_hidden_states, len(hidden))
        if keep is not None and output_hidden_states is not True and 0 in keep:
            raise ValueError("a visionzip tower cannot cut hidden state 0 (the embeddings): no attention made it")
        selected = {i: self.select(hidden, i, n) for i in sorted(keep or ()) if i > 0}
        last = len(hidden) - 1
        return VisionZipOutput(
            last_hidden_state=(selected[last] if last in selected else self.select(hidden, last, n))[0],
            pooler_output=out.pooler_output,
            hidden_states=None
            if keep is None
            else tuple(selected[i][0] if i in selected else None for i in range(len(hidden))),  # fmt: skip
            assignments=None
            if keep is None
            else tuple(selected[i][1] if i in selected else None for i in range(len(hidden))),  # fmt: skip
        )


AutoConfig.register(VisionZipConfig.model_type, VisionZipConfig, exist_ok=True)
AutoModel.register(VisionZipConfig, VisionZipModel, exist_ok=True)
