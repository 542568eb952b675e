import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

import bootstrap  # noqa: F401  (registers the teacher architectures)
from bootstrap.region_captions import RegionCaptions, box_weights, region_loss
from mllm_sparse_recipes.commands.train_teacher import main as train_teacher

NAME = "synth-vit-test-16"


def scene(*objects):
    return {"objects": [dict(zip(("shape", "color", "size", "cx", "cy", "radius"), o, strict=True)) for o in objects]}


def test_box_weights_cover_the_cells_under_the_box():
    w = box_weights(torch.tensor([[0.25, 0.5, 0.5, 0.75], [0.3, 0.55, 0.4, 0.65], [0.2, 0.0, 0.3, 0.25]]), grid=4)
    assert w.shape == (3, 16)
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    assert w[0, 2 * 4 + 1] == 1  # exactly cell (row 2, column 1), row-major as a ViT flattens its patches
    assert w[1, 2 * 4 + 1] == 1  # a box smaller than a cell weighs the cell it lies in
    torch.testing.assert_close(w[2, [0, 1]], torch.tensor([0.5, 0.5]))  # straddles columns 0 and 1 equally
    assert w[2].count_nonzero() == 2
    torch.testing.assert_close(box_weights(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), 4), torch.full((1, 16), 1 / 16))


def test_objects_become_boxes_and_caption_ids_image_by_image():
    scenes = [
        scene(("ring", "red", "large", 0.5, 0.5, 0.2), ("star", "blue", "small", 0.02, 0.9, 0.04)),
        scene(("ring", "red", "large", 0.3, 0.3, 0.15)),
        scene(("cross", "cyan", "medium", 0.7, 0.2, 0.1), ("ring", "red", "small", 0.1, 0.1, 0.05)),
    ]
    regions = RegionCaptions.from_scenes(scenes, ["a.png", "b.png", "c.png"])
    assert regions.texts == ["a large red ring.", "a medium cyan cross.", "a small blue star.", "a small red ring."]
    torch.testing.assert_close(regions.boxes[1], torch.tensor([0.0, 0.86, 0.06, 0.94]))  # clamped at the edge
    assert regions.caption.tolist() == [0, 2, 0, 1, 3]
    rows, position = regions.rows_of(torch.tensor([2, 0]))
    assert rows.tolist() == [3, 4, 0, 1] and position.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="b.png"):
        RegionCaptions.from_scenes([scenes[0], None], ["a.png", "b.png"])


def test_a_whole_image_box_is_the_image_embedding_and_a_region_reads_only_its_patches():
    torch.manual_seed(0)
    model = open_clip.create_model("synth-vit-t-8").eval()  # pool_type "avg": the mean of its patch tokens
    model.visual.output_tokens = True
    pooled, tokens = model.visual(torch.randn(2, 3, 112, 112))
    grid = model.visual.grid_size[0]
    whole = torch.einsum("rp,rpd->rd", box_weights(torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), grid), tokens)
    torch.testing.assert_close(whole @ model.visual.proj, pooled)  # the same LayerNorm, mean and projection

    tokens = tokens.detach().requires_grad_(True)
    weights = box_weights(torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.6, 0.6, 1.0, 1.0]]), grid)
    text = F.normalize(torch.randn(2, pooled.shape[-1]), dim=-1)
    loss = region_loss(
        tokens, model.visual.proj, weights, torch.tensor([0, 1]), text, torch.tensor([1, 0]), torch.tensor(2.0)
    )
    loss.backward()
    touched = tokens.grad.abs().sum(-1) > 0  # [2, P]
    assert touched[0].tolist() == (weights[0] > 0).tolist() and touched[1].tolist() == (weights[1] > 0).tolist()


def test_training_with_region_captions(tmp_path):
    from mllm_sparse.synth import generate_world

    generate_world(tmp_path / "world", num_images=30, image_size=64, seed=2, workers=1, progress=False)
    args = ["--data", str(tmp_path / "world"), "--model", NAME, "--steps", "12", "--batch-size", "8", "--lr", "3e-3"]
    assert train_teacher([*args, "--out", str(tmp_path / "t"), "--region-weight", "1"]) == 0
    report = json.loads((tmp_path / "t" / "zero_shot.json").read_text())
    assert report["region_weight"] == 1.0
    # one step with and without the region term: same weights and batch, so the losses differ by that term alone
    one_step = [*args[:4], "--steps", "1", *args[6:]]
    first = {}
    for weight in ("0", "1"):
        assert train_teacher([*one_step, "--out", str(tmp_path / f"one-{weight}"), "--region-weight", weight]) == 0
        first[weight] = json.loads((tmp_path / f"one-{weight}" / "zero_shot.json").read_text())["loss_curve"][0]
    assert first["1"] > first["0"] > 0
    model = open_clip.create_model(NAME, pretrained=str(tmp_path / "t" / "open_clip_model.safetensors"))
    assert model.encode_image(torch.randn(1, 3, 64, 64)).shape == (1, 32)  # a plain image tower again

    (tmp_path / "world" / "scenes.jsonl").write_text("")
    with pytest.raises(ValueError, match="images/0000000.png"):
        train_teacher([*args, "--out", str(tmp_path / "u"), "--region-weight", "1"])
    with pytest.raises(ValueError, match="--region-weight must be >= 0"):
        train_teacher([*args, "--out", str(tmp_path / "u"), "--region-weight", "-1"])


def test_region_loss_is_the_cross_entropy_written_out_by_hand():
    """Each region: the box-weighted mean of its own image's patch tokens, projected and normalised, against every
    caption at temperature exp(logit_scale); cross-entropy averaged over the regions."""
    torch.manual_seed(4)
    tokens, proj = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    text = F.normalize(torch.randn(3, 2, dtype=torch.float64), dim=-1)
    # region 0: the left half of image 1 (cells 0 and 2 of the 2×2 grid); region 1: cell 3 of image 0
    weights = torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    token_image, target, scale = torch.tensor([1, 0]), torch.tensor([2, 0]), torch.tensor(2.0, dtype=torch.float64)
    regions = [(tokens[1, 0] + tokens[1, 2]) / 2, tokens[0, 3]]
    expected = 0.0
    for region, answer in zip(regions, target.tolist(), strict=True):
        feature = region @ proj
        logits = [math.exp(2.0) * float(feature @ t) / float(feature.norm()) for t in text]
        expected += (math.log(sum(math.exp(v) for v in logits)) - logits[answer]) / 2
    got = region_loss(tokens, proj, weights, token_image, text, target, scale)
    assert got.item() == pytest.approx(expected, abs=1e-9)
