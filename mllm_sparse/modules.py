"""SparseFormer building blocks.

Submodule names reproduce the official checkpoint keys (e.g. `adaptive_mixing.parameter_generator.1.weight`,
`roi_offset_module.0.weight`), which are a public interface; that is why a few `nn.Sequential`s remain.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .configuration import SparseFormerConfig
from .ops import drop_path, roi_adjust, roi_position_encoding, sample_features, sampling_points


class QuickGELU(nn.Module):
    """x · sigmoid(1.702 x), the activation of OpenAI CLIP's blocks."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class EarlyConvolution(nn.Module):
    """7×7/2 conv → ReLU → 3×3/2 max-pool → per-pixel LayerNorm over channels (no affine): a stride-4 map."""

    def __init__(self, conv_dim: int, eps: float = 1e-5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, conv_dim, kernel_size=7, stride=2, padding=3, bias=True)
        self.eps = eps

    def forward(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, H, W] → [B, C, ⌈H/4⌉, ⌈W/4⌉] float32 (normalised per pixel)."""
        x = F.max_pool2d(F.relu(self.conv1(pixel_values)), kernel_size=3, stride=2, padding=1)
        # Normalise over channels with the fused LayerNorm kernel on a channels-last view.
        x = F.layer_norm(x.float().permute(0, 2, 3, 1), (x.shape[1],), eps=self.eps)
        return x.permute(0, 3, 1, 2)


class AdaptiveMixing(nn.Module):
    """Decode sampled points into a token update with per-token generated weights.

    Each token generates a channel-mixing matrix [C, C] and a spatial-mixing matrix [P_out, P], applies them to its
    own sampled points [P, C] (batched `bmm` over all tokens), flattens and projects back to the token width.
    """

    def __init__(self, in_dim: int, in_points: int, query_dim: int, pg_inner_dim: int | float, mixing_bias: bool):
        super().__init__()
        self.in_dim = in_dim
        self.in_points = in_points
        # The reference never mixes down to fewer than 32 output points.
        self.out_points = max(in_points, 32)
        if isinstance(pg_inner_dim, float):
            pg_inner_dim = int(pg_inner_dim * query_dim)
        num_params = in_dim * in_dim + in_points * self.out_points
        # The generator's LayerNorm keeps torch's default eps in the reference, whatever the model's ln_eps.
        self.parameter_generator = nn.Sequential(
            nn.LayerNorm(query_dim), nn.Linear(query_dim, pg_inner_dim), nn.Linear(pg_inner_dim, num_params)
        )
        if mixing_bias:
            self.m_beta = nn.Parameter(torch.zeros(in_dim))
            self.s_beta = nn.Parameter(torch.zeros(self.out_points))
        else:
            self.m_beta = self.s_beta = None
        self.out_proj = nn.Linear(in_dim * self.out_points, query_dim)

    def forward(self, sampled: Tensor, tokens: Tensor) -> Tensor:
        """sampled [B, N, P, C], tokens [B, N, D] → update [B, N, D]."""
        batch, num_tokens, num_points, channels = sampled.shape
        params = self.parameter_generator(tokens).reshape(batch * num_tokens, -1)
        channel_mixing, spatial_mixing = params.split([channels * channels, self.out_points * num_points], dim=-1)
        channel_mixing = channel_mixing.reshape(-1, channels, channels)
        spatial_mixing = spatial_mixing.reshape(-1, self.out_points, num_points)
        x = sampled.reshape(batch * num_tokens, num_points, channels).to(channel_mixing.dtype)
        if self.m_beta is not None:
            x = torch.baddbmm(self.m_beta.to(x.dtype).view(1, 1, -1), x, channel_mixing)
            x = F.gelu(x)
            x = torch.baddbmm(self.s_beta.to(x.dtype).view(1, -1, 1), spatial_mixing, x)
        else:
            # Without biases the reference applies no activation between the two mixings.
            x = torch.bmm(spatial_mixing, torch.bmm(x, channel_mixing))
        x = F.gelu(x)
        return self.out_proj(x.reshape(batch, num_tokens, -1))


def mlp_activation(config, repeats: int) -> Callable[[], nn.Module]:
    """The MLP activation of a unit: single-repeat units (the blocks a CLIP teacher hands down) use the teacher's
    (QuickGELU, or GELU with `config.gelu_approximate`); the focusing units use exact GELU, as the reference."""
    if repeats > 1:
        return nn.GELU
    if config.clip_quick_gelu:
        return QuickGELU
    return partial(nn.GELU, approximate=config.gelu_approximate)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, computed by SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """[B, N, D] → [B, N, D]."""
        batch, num_tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(batch, num_tokens, dim))


class AttentionPoolHead(nn.Module):
    """Multihead attention pooling (SigLIP's "MAP" head): a learned probe attends over the tokens, then a residual
    MLP. Weights map one to one from HF `SiglipMultiheadAttentionPoolingHead` (its fused `in_proj` is `qkv`)."""

    def __init__(self, dim: int, num_heads: int, hidden_dim: int, eps: float, act_layer: Callable[[], nn.Module]):
        super().__init__()
        self.num_heads = num_heads
        self.probe = nn.Parameter(torch.zeros(1, 1, dim))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden_dim, act_layer)

    def forward(self, x: Tensor) -> Tensor:
        """[B, T, D] (already normed) → [B, D]."""
        batch, num_tokens, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(self.probe.to(x.dtype), w[:dim], b[:dim]).view(1, heads, 1, head_dim).expand(batch, -1, -1, -1)
        kv = F.linear(x, w[dim:], b[dim:]).view(batch, num_tokens, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        pooled = self.proj(F.scaled_dot_product_attention(q, kv[0], kv[1]).reshape(batch, dim))
        return pooled + self.mlp(self.norm(pooled))


class Mlp(nn.Module):
    """fc1 → activation → fc2."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: type[nn.Module]):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WidthTransition(nn.Sequential):
    """Linear map between unit widths, with an optional LayerNorm (keys `layers.{i}.0`, `layers.{i}.1`)."""

    def __init__(self, in_dim: int, out_dim: int, layer_norm: bool, eps: float):
        super().__init__(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim, eps=eps) if layer_norm else nn.Identity())


class SparseFormerUnit(nn.Module):
    """One unit: a list of ops over (tokens, RoIs), run `repeats` times with shared weights.

    Ops: `SAMPLING_M` (sample points in each RoI, adaptive mixing, residual add), `ROI_ADJ` (move/resize RoIs),
    `PE_INJECT` (add an encoding of the RoI), `ATTN` and `MLP` (a pre-norm ViT block).
    """

    def __init__(self, config: SparseFormerConfig, index: int, drop_path_rates: list[float]):
        super().__init__()
        dim = config.width_configs[index]
        self.ops = tuple(config.ops_list[index])
        self.repeats = config.repeats[index]
        self.type_op_adjust = config.type_op_adjust
        self.restrict_grad_norm = config.restrict_grad_norm
        self.padding_mode = config.grid_sample_padding
        self.drop_path_rates = list(drop_path_rates)
        eps = config.ln_eps
        ops = set(self.ops)

        if config.use_stage_embedding and self.repeats > 1:
            self.stage_embedding = nn.Embedding(self.repeats, dim)
        if "SAMPLING_M" in ops:
            points = config.num_sampling_points
            self.adaptive_mixing = AdaptiveMixing(config.conv_dim, points, dim, config.pg_inner_dim, config.mixing_bias)
            self.roi_offset_module = nn.Sequential(nn.LayerNorm(dim, eps=eps), nn.Linear(dim, points * 2, bias=False))
            self.roi_offset_bias = nn.Parameter(torch.zeros(points * 2))
        if "ATTN" in ops:
            self.norm1 = nn.LayerNorm(dim, eps=eps)
            self.attn = Attention(dim, config.unit_attention_heads(index))
        if "MLP" in ops:
            self.norm2 = nn.LayerNorm(dim, eps=eps)
            self.mlp = Mlp(dim, int(dim * config.mlp_ratio), mlp_activation(config, self.repeats))
        if "ROI_ADJ" in ops:
            if config.type_op_adjust == 1:
                self.roi_adjust_module = nn.Sequential(nn.LayerNorm(dim, eps=eps), nn.Linear(dim, 4, bias=False))
            else:
                self.roi_adjust_module = nn.Sequential(
                    nn.LayerNorm(dim, eps=eps), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 4, bias=False)
                )
        if "PE_INJECT" in ops:
            self.pe_transition = nn.Sequential(nn.LayerNorm(dim, eps=eps), nn.Linear(dim, dim))

    def forward(self, feature_map: Tensor, tokens: Tensor, rois: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Run the unit.

        Args:
            feature_map: [B, C, H', W'] the stride-4 map.
            tokens: [B, N(+1), D] (the CLS token, once inserted, rides along at index 0 and skips RoI ops).
            rois: [B, N, 4] float32 x1y1x2y2.
        Returns:
            tokens [B, N(+1), D], rois [B, N, 4], and the last sampling points [B, N, P, 2] (None without sampling).
        """
        points = None
        for repeat in range(self.repeats):
            if hasattr(self, "stage_embedding"):
                tokens = tokens + self.stage_embedding.weight[repeat]
            rate = self.drop_path_rates[repeat]
            for op in self.ops:
                if op == "ATTN":
                    tokens = tokens + drop_path(self.attn(self.norm1(tokens)), rate, self.training)
                elif op == "MLP":
                    tokens = tokens + drop_path(self.mlp(self.norm2(tokens)), rate, self.training)
                elif op == "SAMPLING_M":
                    offsets = self.roi_offset_module(tokens) + self.roi_offset_bias
                    points = sampling_points(rois, offsets)
                    sampled = sample_features(feature_map, points, self.padding_mode, self.restrict_grad_norm)
                    tokens = tokens + drop_path(self.adaptive_mixing(sampled, tokens), rate, self.training)
                elif op == "ROI_ADJ":
                    deltas = self.roi_adjust_module(tokens)
                    if self.type_op_adjust == 1:
                        deltas = drop_path(deltas, rate, self.training)
                    rois = roi_adjust(rois, deltas)
                elif op == "PE_INJECT":
                    encoding = roi_position_encoding(rois, tokens.shape[-1]).to(tokens.dtype)
                    tokens = tokens + self.pe_transition(encoding)
        return tokens, rois, points
