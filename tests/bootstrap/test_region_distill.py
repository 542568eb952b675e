"""The label-free region term of `mllm-sparse bootstrap`: random boxes, RoI weights, the loss."""

import pytest
import torch

from bootstrap.region_distill import keyed_uniform, random_boxes, region_distill_loss, roi_box_weights


def _cells(grid: int) -> torch.Tensor:
    """[grid*grid, 4] the patch cells of a grid as boxes, row-major."""
    edges = torch.arange(grid + 1, dtype=torch.float32) / grid
    y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    x, y = x.flatten(), y.flatten()
    return torch.stack([edges[x], edges[y], edges[x + 1], edges[y + 1]], dim=-1)


def test_keyed_draws_are_uniform_and_depend_only_on_the_key():
    keys = torch.arange(4000) * 7919 + (1 << 40)  # keys past 31 bits too
    u = keyed_uniform(keys, 8)
    assert u.shape == (4000, 8) and u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.std().item() - 12**-0.5) < 0.01
    assert torch.histc(u, bins=10, min=0, max=1).min() > 0.09 * u.numel()
    assert torch.equal(keyed_uniform(keys[[5, 3]], 8), u[[5, 3]])  # the same key, the same draws, in any batch
    assert not torch.equal(u[0], u[1]) and not torch.equal(keyed_uniform(keys + (1 << 31), 8), u)


def test_random_boxes_lie_in_the_image_with_sides_in_range():
    boxes = random_boxes(torch.arange(8), 32, 0.1, 0.4)
    sides = boxes[..., 2:] - boxes[..., :2]
    assert boxes.shape == (8, 32, 4)
    assert boxes.min() >= 0 and boxes.max() <= 1
    assert sides.min() >= 0.1 - 1e-6 and sides.max() <= 0.4 + 1e-6
    with pytest.raises(ValueError, match="min_side"):
        random_boxes(torch.arange(1), 1, 0.0)


def test_a_box_is_weighted_to_the_tokens_that_cover_it():
    cells = _cells(4)[None]  # 16 tokens, one per cell
    boxes = torch.stack([cells[0, 5], torch.tensor([0.0, 0.0, 0.5, 0.5])])[None]
    weights = roi_box_weights(cells, boxes)
    assert torch.allclose(weights.sum(-1), torch.ones(1, 2))
    assert weights[0, 0].argmax() == 5 and weights[0, 0, 5] > 0.5
    top_left = torch.tensor([0, 1, 4, 5])  # the four cells of the top-left quarter
    assert weights[0, 1, top_left].sum() > 0.8
    # A tiny token inside a big box counts for its small area, not as much as the token that fills the box.
    rois = torch.tensor([[[0.5, 0.5, 1.0, 1.0], [0.9, 0.9, 0.95, 0.95]]])
    assert roi_box_weights(rois, torch.tensor([[[0.5, 0.5, 1.0, 1.0]]]))[0, 0, 0] > 0.9


def test_far_boxes_keep_finite_weights_and_move_weight_with_the_rois():
    rois = torch.tensor([[[0.0, 0.0, 0.1, 0.1], [0.45, 0.45, 0.55, 0.55]]], requires_grad=True)
    box = torch.tensor([[[0.9, 0.9, 0.95, 0.95]]])  # outside both RoIs, nearer the second
    weights = roi_box_weights(rois, box)
    assert torch.isfinite(weights).all() and weights[0, 0, 1] > 0.99
    rois = torch.tensor([[[0.0, 0.0, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]]], requires_grad=True)
    box = torch.tensor([[[0.46, 0.46, 0.48, 0.48]]])  # between them, nearer the second
    weights = roi_box_weights(rois, box)
    assert 0.5 < weights[0, 0, 1] < 1
    weights[0, 0, 1].backward()
    # the second token's weight grows as its RoI shifts up-left, toward the box
    grad = rois.grad[0, 1]
    assert grad[0] + grad[2] < 0 and grad[1] + grad[3] < 0


def test_the_loss_is_small_when_the_tokens_are_the_patches_and_reaches_tokens_and_rois():
    torch.manual_seed(0)
    grid, width = 4, 8
    patches = torch.randn(2, grid * grid, width)
    tokens = patches.clone().requires_grad_()
    rois = _cells(grid).expand(2, -1, -1).clone().requires_grad_()
    boxes = random_boxes(torch.arange(2), 16, 1 / grid)
    matched = region_distill_loss(tokens, rois, patches, boxes)
    shuffled = region_distill_loss(tokens[:, torch.randperm(grid * grid)], rois, patches, boxes)
    assert matched < 0.1 < shuffled
    matched.backward()
    assert tokens.grad.abs().sum() > 0 and rois.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="token-loss-layer"):
        region_distill_loss(torch.randn(2, 16, 4), rois, patches, boxes)


def test_a_box_of_no_width_still_weighs_every_token_finitely():
    """A degenerate box (x1 = x2): each token's mass inside it underflows towards 0 in float32; the weights stay
    finite and sum to 1 rather than turning NaN."""
    rois = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.2, 0.2, 0.4, 0.4]]])
    boxes = torch.tensor([[[0.3, 0.1, 0.3, 0.9], [0.5, 0.5, 0.5 + 1e-7, 0.6]]])
    weights = roi_box_weights(rois, boxes)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2))
