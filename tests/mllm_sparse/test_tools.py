"""profile, draw_rois and the `mllm-sparse inspect` command."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import mllm_sparse
from mllm_sparse_recipes.cli import main as cli_main


def test_profile_counts_params_flops_and_tokens(btsp_model):
    cost = mllm_sparse.profile(btsp_model, 64)
    assert cost.params == sum(p.numel() for p in btsp_model.parameters())
    assert cost.num_tokens == 16 and cost.image_size == (64, 64)
    # The cortex alone: 2 blocks of 16 tokens at width 64 cost 2·(12·64²·16) MACs = 2 FLOPs each, plus attention.
    cortex = 2 * 2 * (12 * 64 * 64 * 16 + 2 * 16 * 16 * 64)
    assert cost.gflops * 1e9 > cortex
    bigger = mllm_sparse.profile(btsp_model, (128, 96))
    assert bigger.gflops > cost.gflops  # only the early convolution grows with the image


def test_profile_of_a_plain_module():
    conv = torch.nn.Conv2d(3, 8, 4, stride=4)
    cost = mllm_sparse.profile(conv, 16)
    assert cost.gflops * 1e9 == pytest.approx(2 * 8 * 3 * 4 * 4 * 16)
    assert cost.params == 8 * 3 * 16 + 8


def test_draw_rois_draws_each_token_box_and_points(btsp_model):
    with torch.no_grad():
        out = btsp_model(torch.randn(1, 3, 64, 64), output_sampling_points=True)
    base = Image.new("RGB", (200, 100), "black")
    drawn = mllm_sparse.draw_rois(base, out, show_points=True)
    assert drawn.size == (200, 100) and np.asarray(base).max() == 0
    canvas = np.asarray(drawn)
    x1, y1, x2, y2 = out.rois[0, 0].tolist()
    # The outline of token 0's box is coloured where the box edge lies inside the image.
    left, top = int(round(max(x1, 0) * 200)), int(round(max(y1, 0) * 100))
    assert canvas[min(top + 2, 99), left].max() > 0 or canvas[top, min(left + 2, 199)].max() > 0
    only_one = np.asarray(mllm_sparse.draw_rois(base, out, tokens=[0]))
    assert (only_one > 0).sum() < (canvas > 0).sum()


def test_draw_points_needs_recorded_points(btsp_model):
    with torch.no_grad():
        out = btsp_model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="output_sampling_points=True"):
        mllm_sparse.draw_rois(Image.new("RGB", (8, 8)), out, show_points=True)


def test_inspect_prints_cost_and_writes_the_picture(tmp_path, capsys):
    Image.new("RGB", (90, 60), "white").save(tmp_path / "in.jpg")
    assert (
        cli_main(
            [
                "inspect",
                "test_sparseformer_btsp",
                "--image",
                str(tmp_path / "in.jpg"),
                "--image-size",
                "48",
                "--out",
                str(tmp_path / "roi.png"),
                "--points",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["num_tokens"] == 16 and report["params"] > 0 and report["gflops"] > 0
    picture = Image.open(tmp_path / "roi.png")
    assert picture.width == 448 and picture.height > 448  # drawn large, the caption under it
    assert "RANDOM weights (no --pretrained)" in report["caption"][0]
    assert report["caption"][1] == "the image, centre-cropped as the encoder sees it at 48 px"


def test_inspect_a_saved_folder_and_the_token_budget(tmp_path, capsys, btsp_model):
    btsp_model.save_pretrained(tmp_path / "enc")
    assert cli_main(["inspect", str(tmp_path / "enc"), "--out", str(tmp_path / "a.png")]) == 0
    assert "15 latent (the LLM's image tokens) + 1 CLS" in capsys.readouterr().out
    assert cli_main(["inspect", str(tmp_path / "enc"), "--out", str(tmp_path / "a.png"), "--json"]) == 0
    assert "weights: the saved folder's" in json.loads(capsys.readouterr().out)["caption"][0]
    picture = ["--out", str(tmp_path / "b.png"), "--json"]
    assert cli_main(["inspect", "test_sparseformer_btsp", "--num-latent-tokens", "8", *picture]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["num_latent_tokens"], report["cls_tokens"], report["num_tokens"]) == (8, 1, 9)
    # the deprecated spelling counted the CLS token; it still works, and says what it became
    assert cli_main(["inspect", "test_sparseformer_btsp", "--num-tokens", "9", *picture]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["num_latent_tokens"] == 8
    assert "--num-tokens is deprecated" in captured.err and "--num-latent-tokens 8" in captured.err


def test_inspect_bad_input_gives_one_clear_line(tmp_path, capsys):
    assert cli_main(["inspect", "no_such_model"]) == 2
    assert "mllm-sparse inspect: error: 'no_such_model' is neither a folder nor a preset" in capsys.readouterr().err
    assert cli_main(["inspect", "test_sparseformer_btsp", "--image", str(tmp_path / "ghost.png")]) == 2
    assert "ghost.png" in capsys.readouterr().err
    (tmp_path / "bad.pth").write_bytes(b"junk")
    assert cli_main(["inspect", "test_sparseformer_btsp", "--pretrained", str(tmp_path / "bad.pth")]) == 2
    assert "bad.pth" in capsys.readouterr().err
    assert cli_main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "mllm_sparse_recipes.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "inspect" in out.stdout
