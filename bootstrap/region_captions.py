"""Region captions: each object's own caption, matched to the teacher's patch tokens under the object's box.

A CLIP trained on whole-image captions alone needs only what tells captions apart in a batch, which in the synthetic
world is mostly the principal object: its later blocks wash the small objects out of the patch tokens, and a LLaVA
model reading those tokens cannot answer questions about them. Grounded captions (a phrase with its box, as
Flickr30k Entities or GRIT give) fix that in the open: the box-weighted mean of the final patch tokens, through the
tower's LayerNorm and projection, must pick out the object's caption ("a small red ring.") among the region
captions of the batch. For a tower that pools the mean of its patch tokens (`synth-vit-t-8`), a box over the whole
image gives exactly the image embedding. The image-level contrastive loss is unchanged; this term is added to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mllm_sparse.synth.text import object_caption
from mllm_sparse.synth.world import Scene


@dataclass
class RegionCaptions:
    """Every object of a set of images as a box and a caption id.

    boxes: [R, 4] normalised (x1, y1, x2, y2), clamped to the image.
    caption: [R] index into `texts`.
    offsets: [N + 1]; the objects of image i are rows offsets[i]:offsets[i + 1].
    texts: the distinct region captions.
    """

    boxes: Tensor
    caption: Tensor
    offsets: Tensor
    texts: list[str]

    @classmethod
    def from_scenes(cls, scenes: list[dict | None], paths: list[str]) -> RegionCaptions:
        """Objects of `scenes` (scenes.jsonl rows, one per image); `paths` name an image with no scene."""
        boxes, names, counts = [], [], []
        for row, path in zip(scenes, paths, strict=True):
            if row is None or "objects" not in row:
                raise ValueError(
                    f"region captions need every object of {path}, but scenes.jsonl has no entry for it "
                    "(train-teacher --region-weight 0 trains on whole-image captions alone)"
                )
            objects = Scene.from_dict(row).objects
            counts.append(len(objects))
            for obj in objects:
                boxes.append([obj.cx - obj.radius, obj.cy - obj.radius, obj.cx + obj.radius, obj.cy + obj.radius])
                names.append(object_caption(obj))
        texts = sorted(set(names))
        index = {t: k for k, t in enumerate(texts)}
        return cls(
            boxes=torch.tensor(boxes, dtype=torch.float).clamp(0, 1).reshape(-1, 4),
            caption=torch.tensor([index[n] for n in names], dtype=torch.long),
            offsets=torch.tensor([0, *counts]).cumsum(0),
            texts=texts,
        )

    def rows_of(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The rows of the objects of `images` ([B] image indices), image by image, and each row's position in
        `images`: two [R'] tensors."""
        starts, lengths = self.offsets[images], self.offsets[images + 1] - self.offsets[images]
        position = torch.repeat_interleave(torch.arange(len(images)), lengths)
        first = torch.repeat_interleave(starts - (lengths.cumsum(0) - lengths), lengths)
        return first + torch.arange(int(lengths.sum())), position


def box_weights(boxes: Tensor, grid: int) -> Tensor:
    """[R, grid*grid] weights of the patches (row-major, as a ViT flattens them) under each box: the area of
    the box inside each patch cell, normalised to sum 1. A box smaller than a cell still weighs the cells it
    touches. boxes: [R, 4] normalised (x1, y1, x2, y2)."""
    edges = torch.arange(grid + 1, dtype=boxes.dtype, device=boxes.device) / grid

    def overlap(lo: Tensor, hi: Tensor) -> Tensor:  # [R, grid]
        return (torch.minimum(hi[:, None], edges[None, 1:]) - torch.maximum(lo[:, None], edges[None, :-1])).clamp(min=0)

    w = overlap(boxes[:, 1], boxes[:, 3])[:, :, None] * overlap(boxes[:, 0], boxes[:, 2])[:, None, :]
    w = w.flatten(1)
    return w / w.sum(1, keepdim=True).clamp(min=1e-12)


def region_loss(
    tokens: Tensor,
    proj: Tensor | None,
    weights: Tensor,
    token_image: Tensor,
    text_features: Tensor,
    target: Tensor,
    logit_scale: Tensor,
) -> Tensor:
    """Cross-entropy of each region against the batch's distinct region captions.

    Args:
        tokens: [B, P, D] final patch tokens after the visual LayerNorm (open_clip's `output_tokens`).
        proj: [D, E] the visual projection, or None.
        weights: [R, P] box weights (`box_weights`); token_image: [R] which of the B images each region is in.
        text_features: [U, E] normalised features of the distinct captions; target: [R] index into them.
        logit_scale: the CLIP's log temperature.
    """
    region = torch.einsum("rp,rpd->rd", weights, tokens[token_image])
    if proj is not None:
        region = region @ proj
    logits = logit_scale.exp() * F.normalize(region, dim=-1) @ text_features.T
    return F.cross_entropy(logits, target)
