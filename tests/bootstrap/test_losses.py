"""The bootstrap objective's terms against hand computations on tiny cases, and which tokens each one reads."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from bootstrap.region_distill import random_boxes, region_distill_loss
from bootstrap.train import alignment_loss, roi_pooled_patches


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def _student_output(num_latent: int = 3) -> SimpleNamespace:
    """What the student returns for 2 images: 2 units, CLS first in both, different tokens and RoIs per unit."""
    torch.manual_seed(0)
    hidden = tuple(torch.randn(2, 1 + num_latent, 4) for _ in range(2))
    hidden[1][:, 0] = 100.0  # a CLS token that would dominate any term that read it
    last_rois = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 0.5], [0.5, 0.5, 1.0, 1.0]]).expand(2, -1, -1)
    rois = (torch.rand(2, num_latent, 4), last_rois)
    return SimpleNamespace(image_embeds=torch.randn(2, 6), hidden_states=hidden, hidden_rois=rois)


def _targets() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {"embeds": torch.randn(2, 6), "patches": torch.randn(2, 4, 4)}  # a 2×2 patch grid, width 4


def _loss(out: SimpleNamespace, targets: dict, token_weight: float, region_weight: float) -> torch.Tensor:
    features = torch.zeros(2, 16, 2, 2)  # the step's shared early-convolution features, handed on to the student

    def model(pixels, output_hidden_states=None, num_latent_tokens=None, image_features=None):
        assert num_latent_tokens == 3 and image_features is features  # the budget the loss reads; shared features
        # hidden states (every unit's tokens, a cost) are asked for only when a token term reads them
        assert output_hidden_states is (True if token_weight > 0 or region_weight > 0 else None)
        return out

    return alignment_loss(
        model,
        3,
        torch.zeros(2, 3, 8, 8),
        targets,
        token_weight,
        -1,
        region_weight,
        5,
        torch.tensor([11, 12]),
        features,
    )


def test_the_embedding_term_is_one_minus_the_mean_cosine():
    out, targets = _student_output(), _targets()
    expected = 1 - _cos(out.image_embeds, targets["embeds"]).mean()
    torch.testing.assert_close(_loss(out, targets, 0.0, 0.0), expected)


def test_the_token_term_aligns_latent_tokens_never_cls_with_the_patches_under_their_rois():
    out, targets = _student_output(), _targets()
    latent, patches = out.hidden_states[1][:, 1:], targets["patches"]
    # last unit's RoIs: the top-left cell; the top row; the bottom-right cell (grid row-major: 0 1 / 2 3)
    pooled = torch.stack([patches[:, 0], (patches[:, 0] + patches[:, 1]) / 2, patches[:, 3]], dim=1)
    token_term = 1 - _cos(latent, pooled).mean()
    expected = 1 - _cos(out.image_embeds, targets["embeds"]).mean() + 0.5 * token_term
    torch.testing.assert_close(_loss(out, targets, 0.5, 0.0), expected)


def test_the_region_term_reads_the_latent_tokens_of_the_chosen_unit_with_boxes_of_at_least_one_patch():
    out, targets = _student_output(), _targets()
    latent, rois = out.hidden_states[1][:, 1:], out.hidden_rois[1]
    boxes = random_boxes(torch.tensor([11, 12]), 5, 1 / 2)  # the 2×2 grid: no box under half the image
    region = region_distill_loss(latent, rois, targets["patches"], boxes)  # checked by hand below
    expected = 1 - _cos(out.image_embeds, targets["embeds"]).mean() + 0.25 * region
    torch.testing.assert_close(_loss(out, targets, 0.0, 0.25), expected)


def test_roi_pooling_reads_x_across_and_y_down_the_patch_grid():
    patches = torch.arange(16, dtype=torch.float32).view(1, 16, 1)  # 4×4 grid, row-major, value = index
    rois = torch.tensor([[[0.0, 0.0, 1.0, 0.25], [0.0, 0.0, 0.25, 1.0], [0.3, 0.7, 0.31, 0.71]]])
    pooled = roi_pooled_patches(patches, rois)[0, :, 0]
    assert pooled[0] == pytest.approx((0 + 1 + 2 + 3) / 4)  # the top row
    assert pooled[1] == pytest.approx((0 + 4 + 8 + 12) / 4)  # the left column
    assert pooled[2] == 9  # no centre inside: the nearest, column 1 (x 0.375) of row 2 (y 0.625)
    # Edges are inclusive on all four sides: centres 0.125 and 0.375 lie exactly on this RoI's edges.
    edges = roi_pooled_patches(patches, torch.tensor([[[0.125, 0.125, 0.375, 0.375], [0.375, 0.375, 0.125, 0.125]]]))
    assert edges[0, :, 0].tolist() == [(0 + 1 + 4 + 5) / 4] * 2  # either corner order


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_region_distill_loss_matches_a_hand_computation():
    """Teacher: patches weighted by the box's area in each cell. Student: tokens weighted by the mass, inside the
    box, of a Gaussian with a uniform spread's spread over the RoI, times the RoI's area, normalised over tokens."""
    rois = [[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0], [0.25, 0.5, 0.75, 0.75]]
    boxes = [[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 1.0]]
    torch.manual_seed(3)
    tokens, patches = torch.randn(1, 3, 5, dtype=torch.float64), torch.randn(1, 4, 5, dtype=torch.float64)
    # box 0 is cell 0; box 1 covers 1/4 × 1/4 of cells 0 and 1 and 1/4 × 1/2 of cells 2 and 3
    teacher = torch.stack([patches[0, 0], (patches[0, 0] + patches[0, 1] + 2 * patches[0, 2] + 2 * patches[0, 3]) / 6])
    student = []
    for box in boxes:
        raw = []
        for x1, y1, x2, y2 in rois:
            mass, area = 1.0, (x2 - x1) * (y2 - y1)
            for lo, hi, a, b in ((x1, x2, box[0], box[2]), (y1, y2, box[1], box[3])):
                centre, sigma = (lo + hi) / 2, (hi - lo) / math.sqrt(12)
                mass *= _phi((b - centre) / sigma) - _phi((a - centre) / sigma)
            raw.append(mass * area)
        weights = torch.tensor(raw, dtype=torch.float64) / sum(raw)
        student.append(weights @ tokens[0])
    expected = 1 - _cos(torch.stack(student), teacher).mean()
    got = region_distill_loss(tokens.float(), torch.tensor([rois]), patches.float(), torch.tensor([boxes]))
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)
