"""Functional SparseFormer ops: RoI geometry, point sampling and RoI position encodings.

RoIs are normalised (x1, y1, x2, y2) with (0, 0) the top-left corner of the image and (1, 1) the bottom-right.
All geometry runs in float32, whatever the autocast dtype, because RoIs compound over many units.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def roi_adjust(rois: Tensor, deltas: Tensor) -> Tensor:
    """Move and rescale RoIs: centre += Δxy · wh, wh *= exp(Δwh).

    Args:
        rois: [B, N, 4] x1y1x2y2.
        deltas: [B, N, 4] (Δx, Δy, Δw, Δh), any dtype.
    Returns:
        [B, N, 4] float32 x1y1x2y2.
    """
    rois = rois.float()
    deltas = deltas.float()
    center = (rois[..., 2:] + rois[..., :2]) * 0.5
    size = (rois[..., 2:] - rois[..., :2]).abs()
    center = center + deltas[..., :2] * size
    size = size * deltas[..., 2:].exp()
    return torch.cat([center - 0.5 * size, center + 0.5 * size], dim=-1)


def sampling_points(rois: Tensor, offsets: Tensor, eps: float = 1e-5) -> Tensor:
    """Place sampling points inside each RoI.

    The raw offsets are standardised over the points of each token (zero mean, 3 std to the RoI border), then
    scaled by the RoI size around its centre. Points can leave the RoI; sampling handles that with padding.

    Args:
        rois: [B, N, 4] x1y1x2y2.
        offsets: [B, N, P * 2] raw (x, y) offsets per point.
    Returns:
        [B, N, P, 2] float32 point coordinates, normalised to the image.
    """
    batch, num_tokens, _ = offsets.shape
    offsets = offsets.float().view(batch, num_tokens, -1, 2)
    std, mean = torch.std_mean(offsets, dim=2, keepdim=True)
    offsets = (offsets - mean) / (3 * (std + eps))
    rois = rois.float()
    center = (rois[..., 2:] + rois[..., :2]) * 0.5
    size = rois[..., 2:] - rois[..., :2]
    return center.unsqueeze(2) + offsets * size.unsqueeze(2)


class RestrictGradNorm(torch.autograd.Function):
    """Identity forward; backward clamps each gradient element to [-bound, bound].

    Bilinear sampling only knows the feature map within one pixel of a point, so a larger step on a sampling
    coordinate follows a gradient that no longer describes the map. The bound is one feature-map pixel.
    """

    @staticmethod
    def forward(ctx, x: Tensor, bound: float) -> Tensor:
        ctx.bound = bound
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        return grad_output.clamp(-ctx.bound, ctx.bound), None


def sample_features(
    feature_map: Tensor, points: Tensor, padding_mode: str = "border", restrict_grad_norm: bool = False
) -> Tensor:
    """Bilinearly sample a feature map at normalised points, all tokens and points in one `grid_sample`.

    Args:
        feature_map: [B, C, H, W].
        points: [B, N, P, 2] normalised (x, y); (0, 0) is the top-left image corner.
        padding_mode: how points outside the image read the map.
        restrict_grad_norm: clamp the gradient of each coordinate to one feature-map pixel (1 / H).
    Returns:
        [B, N, P, C] in the feature map's dtype.
    """
    if restrict_grad_norm and points.requires_grad:
        points = RestrictGradNorm.apply(points, 1.0 / feature_map.shape[-2])
    grid = (points * 2.0 - 1.0).to(feature_map.dtype)
    sampled = F.grid_sample(feature_map, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    return sampled.permute(0, 2, 3, 1)


def roi_position_encoding(rois: Tensor, dim: int, max_temperature: float = 128.0) -> Tensor:
    """Sine encoding of RoI coordinates; a constant of the RoIs (no gradient flows back into them).

    Each of the 4 coordinates gets `dim // 4` features at frequencies geometric in [1, max_temperature], half
    sines at even and half cosines at odd frequencies.

    Args:
        rois: [B, N, 4] x1y1x2y2.
        dim: output width, a multiple of 4.
    Returns:
        [B, N, dim] float32.
    """
    num_feats = dim // 4
    rois = rois.detach().float() * math.pi
    freqs = torch.linspace(0, math.log(max_temperature), num_feats, dtype=rois.dtype, device=rois.device).exp()
    phase = rois.unsqueeze(-1) * freqs
    return torch.cat([phase[..., 0::2].sin(), phase[..., 1::2].cos()], dim=-1).flatten(2)


def drop_path(x: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Stochastic depth per sample: zero a whole residual branch for some batch elements.

    Args:
        x: [B, ...] the residual branch.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    return x * mask / keep_prob
