"""Where the image tokens an LLM receives come from, and which of them it attends to when it answers.

`image_token_regions` gives, for each of the N image tokens of a LLaVA model, the image region it summarises: a
SparseFormer token's RoI at the feature layer the LLM reads, a ViT patch's cell, a pooled token's grid cell, a VisionZip
token's patch or the box around the patches merged into it (the CLS token, where kept, the whole image).
`answer_attention` gives how much attention the LLM pays to each of them from the position that produces the answer's
first token. Both are in the order of the image placeholders, so a box and a weight describe the same token;
`mllm_sparse.visualize.draw_boxes` draws them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor
from transformers import CLIPVisionConfig, SiglipVisionConfig

from mllm_sparse import SparseFormerConfig
from mllm_sparse.images import denormalize
from mllm_sparse.visualize import draw_boxes, with_caption

from .budgets import vlm_budget
from .towers import PooledVisionConfig, layer_tokens
from .visionzip import VisionZipConfig

if TYPE_CHECKING:
    from .chat import ChatEngine

WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)
PICTURE_SIDE = 448  # the regions picture is drawn at least this large, so that small RoIs stay visible


def grid_boxes(side: int, patches: int | None = None) -> Tensor:
    """[side², 4] the cells of a side × side grid over the image, row-major (ViT patch order), normalised x1y1x2y2.

    With `patches`, the cells are those `adaptive_avg_pool2d` pools a patches × patches grid into: cell i spans
    patches floor(i·patches/side) to ceil((i+1)·patches/side), so where side does not divide patches the cells are
    uneven and overlap (14 → 4: patches 0-3, 3-6, 7-10, 10-13).
    """
    index = torch.arange(side)
    if patches is None:
        start, end = index / side, (index + 1) / side
    else:
        start = torch.div(index * patches, side, rounding_mode="floor") / patches
        end = torch.div((index + 1) * patches + side - 1, side, rounding_mode="floor") / patches
    y1, x1 = torch.meshgrid(start, start, indexing="ij")
    y2, x2 = torch.meshgrid(end, end, indexing="ij")
    return torch.stack([x1, y1, x2, y2], dim=-1).reshape(-1, 4).float()


def group_boxes(assignment: Tensor, cells: Tensor, num_tokens: int) -> Tensor:
    """[B, P] patch → token index and [P, 4] patch cells → [B, N, 4] each token's box: the smallest box around the
    cells of the patches that went into it."""
    batch = assignment.shape[0]
    index = assignment[..., None].expand(-1, -1, 2)
    corners = cells.expand(batch, -1, -1)
    low = torch.full((batch, num_tokens, 2), 1.0).scatter_reduce(1, index, corners[..., :2], "amin")
    high = torch.zeros(batch, num_tokens, 2).scatter_reduce(1, index, corners[..., 2:], "amax")
    return torch.cat([low, high], dim=-1)


@torch.no_grad()
def image_token_regions(model, pixel_values: Tensor) -> Tensor:
    """The region of the image each image token of a LLaVA model stands for.

    Args:
        model: a `LlavaForConditionalGeneration` with a SparseFormer, CLIP, SigLIP or pooled tower.
        pixel_values: [B, 3, H, W] as its processor makes them.
    Returns:
        [B, N, 4] normalised x1, y1, x2, y2 (N = `config.image_seq_length`, in placeholder order). A SparseFormer
        token's box is its RoI after the unit the LLM reads (`vision_feature_layer`), so it differs per image and may
        reach past the image's border; the other towers' boxes are fixed cells.
    """
    config = model.config
    vision = model.model.vision_tower.config  # the tower's own: `vlm_budget` sets its budget there
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"image_token_regions needs one vision_feature_layer, got {layer!r}")
    # the CLS token, where the layer has one and "full" keeps it, stands for the whole image
    keep_cls = config.vision_feature_select_strategy == "full" and layer_tokens(vision, layer).has_cls
    batch = pixel_values.shape[0]
    first = [torch.tensor(WHOLE_IMAGE).expand(batch, 1, 4)] if keep_cls else []
    if isinstance(vision, SparseFormerConfig):
        tower = model.model.vision_tower
        pixel_values = pixel_values.to(tower.device, next(tower.parameters()).dtype)
        rois = tower(pixel_values, output_hidden_states=[layer]).hidden_rois[layer].float().cpu()
        regions = torch.cat([*first, rois], dim=1)
    elif isinstance(vision, VisionZipConfig):
        tower = model.model.vision_tower
        pixel_values = pixel_values.to(tower.device, next(tower.parameters()).dtype)
        assignment = tower(pixel_values, output_hidden_states=[layer]).assignments[layer].cpu()
        side = vision.vision_config.image_size // vision.vision_config.patch_size
        regions = torch.cat([*first, group_boxes(assignment, grid_boxes(side), vision.num_latent_tokens)], dim=1)
    else:
        if isinstance(vision, PooledVisionConfig):
            patches = vision.vision_config.image_size // vision.vision_config.patch_size
            cells = grid_boxes(math.isqrt(vision.num_latent_tokens), patches)
        elif isinstance(vision, (CLIPVisionConfig, SiglipVisionConfig)):
            cells = grid_boxes(vision.image_size // vision.patch_size)
        else:
            raise ValueError(f"image_token_regions: unsupported vision tower {type(vision).__name__}")
        regions = torch.cat([*first, cells.expand(batch, -1, -1)], dim=1)
    if regions.shape[1] != config.image_seq_length:
        raise ValueError(
            f"image_token_regions: {regions.shape[1]} regions for {config.image_seq_length} image tokens "
            f"(vision_feature_layer {layer}, strategy {config.vision_feature_select_strategy})"
        )
    return regions


@dataclass
class AnswerAttention:
    """`per_token`: [N] the attention each image token receives, as a share of all attention on image tokens (sums
    to 1); `image_share`: the share of all attention that goes to image tokens at all (the rest is text)."""

    per_token: Tensor
    image_share: float


@torch.no_grad()
def answer_attention(engine, record: Mapping, image) -> AnswerAttention:
    """The LLM's attention from the last prompt position (the one that predicts the answer's first token) to each
    image token, averaged over heads and layers.

    Attention weights are not materialised by SDPA, so this runs one extra forward of the prompt with the LLM's
    attention switched to eager (and back afterwards).

    Args:
        engine: a `ChatEngine`.
        record: a LLaVA record ending with the human turn to be answered (e.g. `engine.record()` plus the question).
        image: the record's image (PIL).
    """
    model = engine.model
    ids = torch.tensor([engine.prompt_ids(record)], device=engine.device)
    features, _ = engine.encode_images([image])  # the tower runs apart, so output_attentions reaches the LLM only
    language_model = model.model.language_model
    implementation = language_model.config._attn_implementation
    language_model.set_attn_implementation("eager")
    try:
        out = model(input_ids=ids, mm_encoder_outputs={"image": features}, output_attentions=True)
    finally:
        language_model.set_attn_implementation(implementation)
    attentions = out.attentions
    last = torch.stack([a[0, :, -1, :].float() for a in attentions]).mean(dim=(0, 1))  # [L]
    on_image = last[ids[0] == engine.image_token_id].cpu()
    share = float(on_image.sum())
    return AnswerAttention(on_image / max(share, 1e-12), share)


def model_input(engine: ChatEngine, image: Image.Image, side: int | None = None) -> tuple[torch.Tensor, Image.Image]:
    """The pixels the model gets for `image` ([1, 3, S, S], padded or cropped as its processor does) and the same
    as an S × S picture. With `side`, the picture is made at `side` × `side` from the image itself by the processor's
    own steps (same padding, crop and aspect; no upscaled model input), for showing it."""
    image_processor = engine.processor.image_processor
    if side is not None:
        image_processor = copy.deepcopy(image_processor)
        square = {"height": side, "width": side}
        image_processor.crop_size = square
        image_processor.size = square if "height" in image_processor.size else {"shortest_edge": side}
    pixels = image_processor(images=[image], return_tensors="pt")["pixel_values"]
    return pixels, denormalize(pixels[0], image_processor.image_mean, image_processor.image_std)


def regions_picture(
    engine: ChatEngine, image: Image.Image, weights: torch.Tensor | None = None, shown: Image.Image | None = None
) -> Image.Image:
    """The image as the model sees it with the region of each image token drawn over it, numbered in the order the
    LLM reads them and filled by `weights` (e.g. the LLM's attention), at the engine's budget; a legend under it
    gives the token count and, with weights, their colour scale.

    Args:
        engine: the model.
        image: the model input as a picture (`model_input`'s second value) or any image (processed as the model's).
        weights: [N] one per image token (shares of the LLM's attention on the image), or None.
        shown: the picture to draw on, `model_input(engine, upload, side)`'s: the upload at a size worth looking at;
            None: `image` resized to at least `PICTURE_SIDE`.
    """
    pixels, seen = model_input(engine, image)
    with vlm_budget(engine.model, engine.num_latent_tokens):
        regions = image_token_regions(engine.model, pixels)[0]
    if shown is None:
        scale = max(1, -(-PICTURE_SIDE // max(seen.size)))
        shown = seen.resize((seen.width * scale, seen.height * scale), Image.Resampling.BICUBIC)
    drawn = draw_boxes(shown, regions, weights=weights, numbered=True)
    return with_legend(drawn, len(regions), weights)


def with_legend(picture: Image.Image, num_tokens: int, weights: torch.Tensor | None) -> Image.Image:
    """`picture` with a strip under it: what the numbers are and, with `weights`, the colour scale of the fills from
    0 to the largest weight (as a percentage)."""
    lines = [f"{num_tokens} image tokens, numbered in the order the LLM reads them"]
    if weights is None:
        return with_caption(picture, lines)
    lines.append("fill: the LLM's attention on each token (share of its attention on the image)")
    return with_caption(picture, lines, ("0%", f"{100 * float(weights.max()):.0f}%"))
