"""Label-free region distillation: random boxes, the student's tokens weighted by how much of each token's RoI
lies in the box, against the teacher's patches under the same box.

The pooled embedding only asks the student for what the whole image says; a box as small as one patch asks its
tokens for what that patch says too, and moves their RoIs there (the weights are differentiable in the RoIs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.special import log_ndtr

from .region_captions import box_weights

_MASK = 0x7FFFFFFF  # 31-bit hash state: every product below stays inside int64


def _mix(x: Tensor) -> Tensor:
    for multiplier in (0x2C1B3C6D, 0x297A2D39, 0x7FEB352D):
        x = ((x ^ (x >> 15)) * multiplier) & _MASK
    return x ^ (x >> 15)


def keyed_uniform(keys: Tensor, count: int) -> Tensor:
    """[len(keys), count] uniform numbers in [0, 1), a pure function of each int64 key (a counter-based hash), so
    the draws for an image do not depend on which rank or micro-batch it lands in."""
    keys = keys.long()
    seed = _mix((keys & _MASK) ^ _mix(((keys >> 31) & _MASK) + 0x9E3779B))
    counter = torch.arange(count, device=keys.device) * 0x61C88647
    return _mix((seed[:, None] + counter) & _MASK).double().div(2**31).float()


def random_boxes(keys: Tensor, count: int, min_side: float, max_side: float = 0.5) -> Tensor:
    """[len(keys), count, 4] normalised (x1, y1, x2, y2) boxes, width and height each log-uniform in [min_side,
    max_side], placed uniformly inside the image; a function of each image's key (`keyed_uniform`)."""
    if not 0 < min_side <= max_side <= 1:
        raise ValueError(f"random_boxes: need 0 < min_side <= max_side <= 1, got {min_side}, {max_side}")
    u = keyed_uniform(keys, 4 * count).view(len(keys), count, 4)
    log_lo, log_hi = math.log(min_side), math.log(max_side)
    sides = torch.exp(log_lo + (log_hi - log_lo) * u[..., :2])
    lows = (1 - sides) * u[..., 2:]
    return torch.cat([lows, lows + sides], dim=-1)


def _log_mass(lo: Tensor, hi: Tensor) -> Tensor:
    """log(Φ(hi) − Φ(lo)) for lo < hi, accurate in both tails (where the plain difference rounds to 0)."""
    upper = lo > 0  # both in the upper tail: use the mirror image, Φ(−lo) − Φ(−hi)
    lo, hi = torch.where(upper, -hi, lo), torch.where(upper, -lo, hi)
    a, b = log_ndtr(lo), log_ndtr(hi)
    return b + torch.log1p(-torch.exp(a - b).clamp(max=1 - 1e-6))


def roi_box_weights(rois: Tensor, boxes: Tensor) -> Tensor:
    """[B, K, N] weights of the N tokens for each of the K boxes, summing to 1 over the tokens.

    A token's footprint is a Gaussian with the mean and standard deviations of a uniform spread over its RoI,
    scaled to the RoI's area; its weight for a box is the footprint's mass inside the box, i.e. about how much of
    the box the token covers, as patches weigh a box in `box_weights`. No weight is exactly zero, so a box that no
    RoI covers is described by the nearest tokens, and the gradient reaches every RoI.

    Args:
        rois: [B, N, 4] normalised x1y1x2y2 (any corner order). boxes: [B, K, 4] normalised x1y1x2y2, x1 < x2, y1 < y2.
    """
    lo_corner, hi_corner = torch.minimum(rois[..., :2], rois[..., 2:]), torch.maximum(rois[..., :2], rois[..., 2:])
    centre = (lo_corner + hi_corner)[:, None] / 2  # [B, 1, N, 2]
    sides = (hi_corner - lo_corner)[:, None].clamp(min=1e-3)
    sigma = sides / math.sqrt(12)  # the standard deviation of a uniform spread over the side
    lo = (boxes[..., None, :2] - centre) / sigma  # [B, K, N, 2]
    hi = (boxes[..., None, 2:] - centre) / sigma
    log_area = torch.log(sides).sum(-1)  # [B, 1, N]
    return torch.softmax(_log_mass(lo, hi).sum(-1) + log_area, dim=-1)


def region_distill_loss(tokens: Tensor, rois: Tensor, patches: Tensor, boxes: Tensor) -> Tensor:
    """1 − cos(student region feature, teacher region feature), averaged over every box of every image.

    Args:
        tokens: [B, N, C] the student's latent tokens; rois: [B, N, 4] their RoIs.
        patches: [B, P, C] the teacher's patch tokens on a square grid (row-major, as a ViT flattens them).
        boxes: [B, K, 4] normalised x1y1x2y2 (`random_boxes`).
    """
    if tokens.shape[-1] != patches.shape[-1]:
        raise ValueError(
            f"region distillation: student token width {tokens.shape[-1]} differs from the teacher's patch width "
            f"{patches.shape[-1]}; choose a cortex unit with --token-loss-layer"
        )
    batch, count = boxes.shape[:2]
    grid = math.isqrt(patches.shape[1])
    teacher = box_weights(boxes.reshape(-1, 4).float(), grid).view(batch, count, -1) @ patches.float()
    student = roi_box_weights(rois.float(), boxes.float()) @ tokens.float()
    return 1 - F.cosine_similarity(student, teacher, dim=-1).mean()
