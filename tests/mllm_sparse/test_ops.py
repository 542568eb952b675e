import math

import pytest
import torch
import torch.nn.functional as F

from mllm_sparse.modules import AdaptiveMixing, Attention, EarlyConvolution, QuickGELU
from mllm_sparse.ops import drop_path, roi_adjust, roi_position_encoding, sample_features, sampling_points


def test_roi_adjust_moves_centre_by_size_and_scales_exponentially():
    rois = torch.tensor([[[0.2, 0.4, 0.6, 0.6]]])  # centre (0.4, 0.5), size (0.4, 0.2)
    deltas = torch.tensor([[[0.5, -1.0, math.log(2.0), 0.0]]])
    out = roi_adjust(rois, deltas)
    # centre → (0.4 + 0.5·0.4, 0.5 − 1·0.2) = (0.6, 0.3); size → (0.8, 0.2)
    torch.testing.assert_close(out, torch.tensor([[[0.2, 0.2, 1.0, 0.4]]]))


def test_roi_adjust_uses_absolute_size_for_flipped_boxes():
    flipped = torch.tensor([[[0.6, 0.6, 0.2, 0.4]]])
    out = roi_adjust(flipped, torch.zeros(1, 1, 4))
    torch.testing.assert_close(out, torch.tensor([[[0.2, 0.4, 0.6, 0.6]]]))


def test_sampling_points_are_standardised_inside_the_roi():
    torch.manual_seed(1)
    rois = torch.tensor([[[0.1, 0.2, 0.5, 0.8], [0.0, 0.0, 1.0, 1.0]]])
    offsets = torch.randn(1, 2, 9 * 2) * 5 + 3
    points = sampling_points(rois, offsets)
    assert points.shape == (1, 2, 9, 2)
    center = torch.tensor([[0.3, 0.5], [0.5, 0.5]])
    size = torch.tensor([[0.4, 0.6], [1.0, 1.0]])
    # Mean at the RoI centre; std of the unit offsets is 1/3 of the RoI size (up to eps).
    torch.testing.assert_close(points.mean(dim=2)[0], center)
    torch.testing.assert_close(
        ((points[0] - center[:, None]) / size[:, None]).std(dim=1), torch.full((2, 2), 1 / 3), atol=1e-4, rtol=0
    )


def test_eps_keeps_points_of_a_token_with_almost_no_spread_near_its_centre():
    """Offsets that barely differ (std of order eps): eps is added to the std, so the points move by
    offset / (3 (std + eps)) of the RoI size, less than the well-spread case's, never more."""
    rois = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
    d = 1e-5
    offsets = torch.tensor([[[d, d, -d, -d]]])  # two points, x and y offsets ±d: std over the points √2·d
    points = sampling_points(rois, offsets)[0, 0]
    expected = d / (3 * (2**0.5 * d + 1e-5))
    torch.testing.assert_close(points, torch.tensor([[0.5 + expected] * 2, [0.5 - expected] * 2]))


def test_sample_features_is_bilinear_with_pixel_centres():
    feat = torch.arange(2 * 4 * 6, dtype=torch.float32).view(1, 2, 4, 6)
    # Normalised (x, y) at pixel centres: x = (col + 0.5) / W.
    points = torch.tensor([[[[0.5 / 6, 0.5 / 4], [2.5 / 6, 1.5 / 4], [3.0 / 6, 1.5 / 4]]]])
    out = sample_features(feat, points)
    assert out.shape == (1, 1, 3, 2)
    torch.testing.assert_close(out[0, 0, 0], feat[0, :, 0, 0])
    torch.testing.assert_close(out[0, 0, 1], feat[0, :, 1, 2])
    torch.testing.assert_close(out[0, 0, 2], (feat[0, :, 1, 2] + feat[0, :, 1, 3]) / 2)


@pytest.mark.parametrize("padding, expected", [("zeros", 0.0), ("border", 7.0)])
def test_sample_features_padding_outside_the_image(padding, expected):
    feat = torch.full((1, 1, 4, 4), 7.0)
    out = sample_features(feat, torch.tensor([[[[-3.0, -3.0]]]]), padding_mode=padding)
    assert out.item() == expected


def test_restricted_gradient_is_clipped_to_one_feature_pixel():
    feat = torch.randn(1, 3, 8, 8)
    points = torch.rand(1, 4, 5, 2, requires_grad=True)
    # A large upstream gradient makes the unrestricted coordinate gradients exceed one pixel (1 / H).
    (sample_features(feat, points, restrict_grad_norm=False) * 1e3).sum().backward()
    free = points.grad.clone()
    points.grad = None
    (sample_features(feat, points, restrict_grad_norm=True) * 1e3).sum().backward()
    bound = 1.0 / 8
    assert free.abs().max() > bound
    assert points.grad.abs().max() <= bound + 1e-7
    torch.testing.assert_close(points.grad, free.clamp(-bound, bound))


def test_roi_position_encoding_layout_and_no_gradient():
    rois = torch.rand(2, 3, 4, requires_grad=True)
    enc = roi_position_encoding(rois, 32)
    assert enc.shape == (2, 3, 32) and not enc.requires_grad
    freqs = torch.linspace(0, math.log(128), 8).exp()
    phase = rois.detach()[0, 0, 1] * math.pi * freqs  # second coordinate (y1) occupies features 8..15
    torch.testing.assert_close(enc[0, 0, 8:16], torch.cat([phase[0::2].sin(), phase[1::2].cos()]))


def test_early_convolution_is_stride_4_and_normalised_per_pixel():
    conv = EarlyConvolution(8)
    for h, w in [(64, 64), (37, 91), (1, 1)]:
        out = conv(torch.randn(2, 3, h, w))
        assert out.shape == (2, 8, math.ceil(math.ceil(h / 2) / 2), math.ceil(math.ceil(w / 2) / 2))
    x = torch.randn(2, 3, 32, 48)
    pre = F.max_pool2d(F.relu(conv.conv1(x)), 3, 2, 1)
    var, mean = torch.var_mean(pre, dim=1, unbiased=False, keepdim=True)
    torch.testing.assert_close(conv(x), (pre - mean) / (var + 1e-5).sqrt(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixing_bias", [False, True])
def test_adaptive_mixing_matches_a_per_token_loop(mixing_bias):
    mixing = AdaptiveMixing(in_dim=4, in_points=5, query_dim=16, pg_inner_dim=8, mixing_bias=mixing_bias)
    for p in mixing.parameters():
        torch.nn.init.normal_(p, std=0.3)
    sampled, tokens = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 16)
    out = mixing(sampled, tokens)
    assert out.shape == (2, 3, 16) and mixing.out_points == 32
    params = mixing.parameter_generator(tokens)
    for b in range(2):
        for n in range(3):
            channel = params[b, n, :16].view(4, 4)
            spatial = params[b, n, 16:].view(32, 5)
            x = sampled[b, n] @ channel
            if mixing_bias:
                x = spatial @ F.gelu(x + mixing.m_beta) + mixing.s_beta[:, None]
            else:
                x = spatial @ x
            expected = mixing.out_proj(F.gelu(x).flatten())
            torch.testing.assert_close(out[b, n], expected, atol=1e-5, rtol=1e-5)


def test_attention_matches_explicit_softmax():
    attn = Attention(32, 4)
    x = torch.randn(2, 7, 32)
    q, k, v = attn.qkv(x).view(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_quick_gelu():
    x = torch.linspace(-4, 4, 9)
    torch.testing.assert_close(QuickGELU()(x), x * torch.sigmoid(1.702 * x))


def test_restricted_gradient_bound_is_one_pixel_of_height_on_a_non_square_map():
    """H ≠ W: both coordinates are clamped to 1 / H, the reference's bound (not 1 / W)."""
    torch.manual_seed(0)
    feat = torch.randn(1, 3, 4, 16)  # H = 4, W = 16
    points = torch.rand(1, 6, 5, 2, requires_grad=True)
    (sample_features(feat, points, restrict_grad_norm=False) * 1e3).sum().backward()
    free = points.grad.clone()
    points.grad = None
    (sample_features(feat, points, restrict_grad_norm=True) * 1e3).sum().backward()
    assert (free[..., 0].abs() > 1 / 4).any() and (free[..., 1].abs() > 1 / 4).any()
    torch.testing.assert_close(points.grad, free.clamp(-1 / 4, 1 / 4))


def test_roi_points_read_the_non_square_map_at_x_times_width_and_y_times_height():
    """RoI → sampling points → bilinear read on an H ≠ W map whose channels are the column and the row index."""
    height, width = 3, 8
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    feat = torch.stack([cols, rows])[None]  # [1, 2, H, W]
    rois = torch.tensor([[[0.25, 0.2, 0.75, 0.9]]])  # centre (0.5, 0.55), size (0.5, 0.7)
    offsets = torch.tensor([[[-1.0, -1.0, 1.0, 1.0]]])  # two points, each coordinate std sqrt(2) around 0
    points = sampling_points(rois, offsets)
    step = 1 / (3 * math.sqrt(2))  # standardised offset: ±1 / (3 · std)
    expected_points = torch.tensor([[0.5 - step * 0.5, 0.55 - step * 0.7], [0.5 + step * 0.5, 0.55 + step * 0.7]])
    torch.testing.assert_close(points[0, 0], expected_points, atol=1e-5, rtol=0)
    sampled = sample_features(feat, points)[0, 0]  # [P, 2]: (column, row) read at each point
    # align_corners=False: pixel centres at (index + 0.5) / size, and a linear ramp interpolates exactly
    torch.testing.assert_close(sampled[:, 0], expected_points[:, 0] * width - 0.5, atol=1e-4, rtol=0)
    torch.testing.assert_close(sampled[:, 1], expected_points[:, 1] * height - 0.5, atol=1e-4, rtol=0)


def test_drop_path_zeroes_whole_samples_and_rescales_the_rest():
    torch.manual_seed(0)
    x = torch.rand(64, 5, 3) + 1  # no zeros of its own
    out = drop_path(x, drop_prob=0.25, training=True)
    dropped = (out == 0).flatten(1).all(dim=1)
    kept = (out != 0).flatten(1).all(dim=1)
    assert bool((dropped | kept).all())  # a sample is dropped or kept whole, never in part
    assert 0 < int(dropped.sum()) < 64
    torch.testing.assert_close(out[kept], x[kept] / 0.75)  # the expectation is kept
    assert drop_path(x, 0.25, training=False) is x and drop_path(x, 0.0, training=True) is x
