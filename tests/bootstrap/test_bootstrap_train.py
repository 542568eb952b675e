"""`mllm-sparse bootstrap` end to end on a tiny teacher and a tiny synthetic world."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from bootstrap_world import bootstrap_args as _args
from safetensors.torch import load_file
from transformers import AutoModel

import bootstrap  # noqa: F401
import bootstrap.train as train_module
import mllm_sparse  # noqa: F401
from bootstrap.data import TwoViewImages
from bootstrap.train import off_grid_warning, roi_pooled_patches
from mllm_sparse.training import DivergenceError
from mllm_sparse_recipes.cli import main as cli_main
from mllm_sparse_recipes.commands.bootstrap import main as bootstrap_main


def test_two_steps_through_the_cli_into_a_checkpoint_that_reloads(setup, tmp_path, capsys, caplog):
    out = tmp_path / "enc"
    assert cli_main(["bootstrap", *_args(setup, out, "--steps", "2")]) == 0
    # 8 latent tokens (and the CLS token): 4 on the 2x2 grid and 4 on the whole image, said before training
    assert "4 of the 8 latent tokens start on the whole image" in caplog.text
    assert "use --num-latent-tokens 4 or 9" in caplog.text
    assert capsys.readouterr().out.startswith("# Bootstrap report: 8 latent tokens (+ the CLS token) from `open_clip:")
    model = AutoModel.from_pretrained(out)
    assert type(model).__name__ == "SparseFormerModel" and model.config.num_latent_tokens == 8
    assert model.config.num_tokens == 9 and model.config.has_cls_token
    report = json.loads((out / "bootstrap_report.json").read_text())
    assert (report["num_latent_tokens"], report["cls_tokens"]) == (8, 1)
    assert report["steps"] == 2 and len(report["loss_curve"]) == 2
    assert {"teacher", "student"} <= set(report["final"]["zero_shot"]) and "held_out_cosine" in report["final"]
    assert report["inheritance"]["layer_map"] == {"1": 3, "2": 4}
    assert (out / "bootstrap_report.md").is_file() and (out / "checkpoints" / "step_00000002").is_dir()
    with torch.no_grad():
        out_tokens = model(torch.randn(1, 3, 64, 64)).last_hidden_state
    assert out_tokens.shape == (1, 9, 64)
    # The same evaluation on its own.
    root, spec = setup
    eval_args = ["--encoder", str(out), "--teacher", spec, "--data", str(root / "world")]
    assert cli_main(["eval-encoder", *eval_args, "--out", str(tmp_path / "eval.json")]) == 0
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["zero_shot"] == pytest.approx(report["final"]["zero_shot"])
    assert evaluation["student_tokens"] == 9 and evaluation["teacher_tokens"] == 17


def test_a_siglip_teacher_bootstraps_through_the_cli(setup, tmp_path):
    """SigLIP: no CLS token, attention-pool head; a vision-only checkpoint has no text tower, so the report carries
    cosine but no zero-shot."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    root, _ = setup
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, image_size=64, patch_size=16
    )
    SiglipVisionModel(config).save_pretrained(tmp_path / "siglip")
    out = tmp_path / "enc"
    args = _args((root, f"hf:{tmp_path / 'siglip'}"), out, "--steps", "2")
    assert cli_main(["bootstrap", *args]) == 0
    model = AutoModel.from_pretrained(out)
    assert model.config.num_latent_tokens == 8 and model.config.num_tokens == 8
    assert not model.config.has_cls_token and model.config.head_op == "map"
    report = json.loads((out / "bootstrap_report.json").read_text())
    assert (report["num_latent_tokens"], report["cls_tokens"]) == (8, 0)
    assert "zero_shot" not in report["final"] and report["final"]["teacher_tokens"] == 16
    assert report["final"]["held_out_cosine"] > -1


def test_resume_matches_an_uninterrupted_run(setup, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cli_main(["bootstrap", *_args(setup, straight, "--steps", "4", "--save-every", "2")])
    cli_main(["bootstrap", *_args(setup, resumed, "--steps", "4", "--save-every", "2")])
    # Interrupt after step 2: drop what came later, then resume.
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "model.safetensors").unlink()
    cli_main(["bootstrap", *_args(setup, resumed, "--steps", "4", "--resume")])
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    ra = json.loads((straight / "bootstrap_report.json").read_text())
    rb = json.loads((resumed / "bootstrap_report.json").read_text())
    assert ra["loss_curve"] == rb["loss_curve"]


def test_teacher_cache_and_images_in_memory_give_the_same_training(setup, tmp_path):
    cli_main(["bootstrap", *_args(setup, tmp_path / "a", "--steps", "8")])
    cli_main(["bootstrap", *_args(setup, tmp_path / "b", "--steps", "8", "--cache-teacher")])
    assert (tmp_path / "b" / "teacher_cache.safetensors").is_file()
    # 24 training images in batches of 4: the last 2 steps read the second epoch from memory
    cli_main(["bootstrap", *_args(setup, tmp_path / "c", "--steps", "8", "--cache-teacher", "--images-in-memory")])
    curves = [json.loads((tmp_path / run / "bootstrap_report.json").read_text())["loss_curve"] for run in "abc"]
    assert curves[0] == pytest.approx(curves[1], abs=1e-5)
    assert curves[2] == curves[1]
    b, c = load_file(tmp_path / "b" / "model.safetensors"), load_file(tmp_path / "c" / "model.safetensors")
    assert all(torch.equal(b[key], c[key]) for key in b)


def test_images_in_memory_are_decoded_once_and_equal_to_loading_them(setup, tmp_path):
    root, _ = setup
    folder = tmp_path / "images"
    shutil.copytree(root / "world" / "images", folder)
    paths = sorted(folder.iterdir())[:6]
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    fresh = TwoViewImages(paths, 48, 64, mean, std)
    kept = TwoViewImages(paths, 48, 64, mean, std, in_memory=True)
    expected = [fresh[i] for i in range(len(paths))]
    assert [kept[i][0] for i in range(len(paths))] == list(range(len(paths)))
    for path in paths:
        path.unlink()  # from here on, only what was kept can serve
    for i, (index, student, teacher) in enumerate(expected):
        assert student.shape == (3, 48, 48) and teacher.shape == (3, 64, 64) and student.dtype == torch.float32
        again = kept[i]
        assert again[0] == index and torch.equal(again[1], student) and torch.equal(again[2], teacher)
    with pytest.raises(FileNotFoundError):
        fresh[0]
    same_size = TwoViewImages([root / "world" / "images" / paths[0].name], 64, 64, mean, std, in_memory=True)
    _, student, teacher = same_size[0]
    assert student is teacher  # one view, preprocessed once


def test_token_loss_grad_accumulation_and_sampling_points_run(setup, tmp_path):
    out = tmp_path / "tok"
    extra = ("--token-loss-weight", "0.5", "--grad-accum", "2", "--cache-teacher", "--num-sampling-points", "9")
    cli_main(["bootstrap", *_args(setup, out, "--steps", "2", *extra)])
    report = json.loads((out / "bootstrap_report.json").read_text())
    assert report["steps"] == 2 and report["loss_terms"]["token_loss_weight"] == 0.5
    # the same first step without the token term: same weights and batch, so the loss differs by the term alone
    without = list(extra)
    without[1] = "0"
    cli_main(["bootstrap", *_args(setup, tmp_path / "no-tok", "--steps", "1", *without)])
    first = json.loads((tmp_path / "no-tok" / "bootstrap_report.json").read_text())["loss_curve"][0]
    assert report["loss_curve"][0] > first
    model = AutoModel.from_pretrained(out)
    assert model.config.num_sampling_points == 9
    with torch.no_grad():
        points = model(torch.randn(1, 3, 64, 64), output_sampling_points=True).sampling_points
    assert {p.shape[-2] for p in points if p is not None} == {9}


@pytest.mark.parametrize("budgets", [(), ("--budgets", "1", "4", "8", "9")])
def test_torchrun_with_two_cpu_ranks_matches_one_process(budgets, setup, tmp_path):
    """Data parallel through a real `torchrun` launch (2 CPU ranks, gloo): same global batch, same training, the
    region term's random boxes included; for one budget and for an elastic student (whose steps leave some budgets'
    RoI tables without a gradient)."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("--steps", "3", "--grad-accum", "2", "--cache-teacher", "--region-distill-weight", "0.5", *budgets)
    assert cli_main(["bootstrap", *_args(setup, one, *extra)]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [*launch, "-m", "mllm_sparse_recipes.cli", "bootstrap", *_args(setup, two, *extra)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report_one = json.loads((one / "bootstrap_report.json").read_text())
    report_two = json.loads((two / "bootstrap_report.json").read_text())
    assert report_two["ranks"] == 2 and report_one["ranks"] == 1
    assert report_two["loss_curve"] == pytest.approx(report_one["loss_curve"], abs=1e-5)
    # Weights agree to float noise: AdamW turns the noise-level gradients of parameters the loss barely sees (a
    # key bias: softmax ignores it) into steps of up to lr, so the bound is a small fraction of 3 steps × lr 3e-3.
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=3e-4, rtol=1e-4, msg=key)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_00000003"]


def test_batch_must_split_over_ranks_and_accumulation(setup, tmp_path):
    with pytest.raises(ValueError, match="multiple of ranks × --grad-accum = 1 × 3"):
        bootstrap_main(_args(setup, tmp_path / "b", "--steps", "1", "--grad-accum", "3"))


def test_off_grid_warning_names_the_token_counts_that_fill_the_grid():
    assert off_grid_warning(16) is None and off_grid_warning(49) is None
    assert "6 of the 15 latent tokens" in off_grid_warning(15)
    assert off_grid_warning(15).endswith("use --num-latent-tokens 9 or 16")
    assert off_grid_warning(48).endswith("use --num-latent-tokens 36 or 49")


def test_roi_pooling_averages_the_patches_inside_each_box():
    patches = torch.arange(16, dtype=torch.float32).view(1, 16, 1)  # 4x4 grid, value = index
    rois = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.3, 0.3, 0.32, 0.32]]])
    pooled = roi_pooled_patches(patches, rois)
    assert pooled[0, 0, 0] == pytest.approx((0 + 1 + 4 + 5) / 4)
    assert pooled[0, 1, 0] == pytest.approx((10 + 11 + 14 + 15) / 4)
    assert pooled[0, 2, 0] == 5  # no centre inside: the nearest patch


def test_nan_loss_stops_with_a_clear_error(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "alignment_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(DivergenceError, match="loss became nan in step 1; stopped before its backward pass"):
        bootstrap_main(_args(setup, tmp_path / "nan", "--steps", "1"))


def test_bad_inputs(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="Bootstrap data not found"):
        bootstrap_main(_args(setup, tmp_path / "x", "--steps", "1")[: -0 or None] + ["--data", str(tmp_path / "no")])
    with pytest.raises(ValueError, match="must look like"):
        bootstrap_main(["--teacher", "vit", "--num-latent-tokens", "9", "--data", ".", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--num-latent-tokens must be >= 1, got 0"):
        bootstrap_main(_args(setup, tmp_path / "y", "--steps", "1") + ["--num-latent-tokens", "0"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        bootstrap_main(_args(setup, tmp_path / "z", "--steps", "1", "--resume"))
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match="Malformed JSON"):
        bootstrap_main(_args(setup, tmp_path / "w", "--steps", "1") + ["--data", str(bad)])
