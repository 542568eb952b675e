import json
import logging
import shutil
import signal

import cli_process
import open_clip
import pytest
import torch
from safetensors.torch import load_file

import bootstrap  # registers the teacher architectures
from bootstrap.train_teacher import caption_weights, cut_captions_warning, lr_at
from mllm_sparse.checkpoint import load_safetensors
from mllm_sparse.synth.dataset import SyntheticWorld
from mllm_sparse_recipes.cli import main as cli
from mllm_sparse_recipes.commands.train_teacher import main as train_teacher

NAME = "synth-vit-test-16"


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory):
    from mllm_sparse.synth import generate_world

    root = tmp_path_factory.mktemp("teacher")
    generate_world(root / "world", num_images=30, image_size=64, seed=1, workers=1, progress=False)
    assert (
        train_teacher(
            [
                "--data",
                str(root / "world"),
                "--out",
                str(root / "teacher"),
                "--model",
                NAME,
                "--steps",
                "3",
                "--batch-size",
                "8",
            ]
        )
        == 0
    )
    return root


def test_teacher_architectures_are_registered_and_vit_like():
    for name in ("synth-vit-t-8", "synth-vit-t-16", "synth-vit-s-16"):
        model = open_clip.create_model(name)
        assert tuple(model.visual.grid_size) == (14, 14)  # 196 patch tokens: 224 px / 16 or 112 px / 8


def test_the_command_help_names_the_registered_architectures():
    from mllm_sparse_recipes.commands.train_teacher import teacher_models

    assert teacher_models() == list(bootstrap.TEACHER_MODELS) and "synth-vit-t-8" in teacher_models()


def test_training_writes_open_clip_checkpoints_that_load(trained_teacher):
    out = trained_teacher / "teacher"
    assert {p.name for p in out.iterdir()} >= {
        "open_clip_model.safetensors",
        f"{NAME}.json",
        "open_clip_config.json",
        "zero_shot.json",
        "zero_shot.md",
    }
    by_name = open_clip.create_model(NAME, pretrained=str(out / "open_clip_model.safetensors"))
    by_dir = open_clip.create_model(f"local-dir:{out}")
    fresh = open_clip.create_model(NAME)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b, c = by_name.encode_image(x), by_dir.encode_image(x), fresh.encode_image(x)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert json.loads((out / f"{NAME}.json").read_text()) == open_clip.get_model_config(NAME)


def test_zero_shot_report(trained_teacher):
    report = json.loads((trained_teacher / "teacher" / "zero_shot.json").read_text())
    assert report["steps"] == 3 and report["num_images"] == 3 and report["num_classes"] == 48
    assert 0.0 <= report["top1"] <= 1.0
    assert sum(row["images"] for row in report["by_principal_size"].values()) == 3


def test_training_moves_the_weights_and_lowers_the_loss(tmp_path, trained_teacher):
    out = tmp_path / "t"
    train_teacher(
        [
            "--data",
            str(trained_teacher / "world"),
            "--out",
            str(out),
            "--model",
            NAME,
            "--steps",
            "12",
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
        ]
    )
    curve = json.loads((out / "zero_shot.json").read_text())["loss_curve"]
    assert curve[-1] < 0.95 * curve[0]  # 12 steps at 3e-3 take off about a tenth (5.76 → 5.21 measured)


def test_an_untrained_teacher_is_built_without_the_no_pretrained_weights_warning(trained_teacher, tmp_path, caplog):
    """open_clip warns that a model it builds has no pretrained weights; train-teacher builds one to train it, so
    that warning says nothing there, and only there."""
    caplog.set_level(logging.INFO)
    assert train_teacher(teacher_args(trained_teacher / "world", tmp_path / "t", "--steps", "1")) == 0
    assert f"teacher {NAME}:" in caplog.text  # the run's own lines are logged
    assert "No pretrained weights loaded" not in caplog.text
    caplog.clear()
    open_clip.create_model(NAME)  # elsewhere open_clip still says it
    assert f"No pretrained weights loaded for model '{NAME}'" in caplog.text


def test_caption_weights():
    torch.testing.assert_close(caption_weights([0.0, 0.0, 1.0], 3), torch.tensor([0.0, 0.0, 1.0]))
    assert caption_weights([0.0, 0.0, 1.0], 1).shape == (3,)  # one-caption worlds repeat their caption
    with pytest.raises(ValueError, match="images have 3 captions"):
        caption_weights([1.0], 3)
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        caption_weights([0.0, 0.0, 0.0], 3)


def test_schedule():
    assert lr_at(0.0, 1.0, 0.1) == 0.0
    assert lr_at(0.1, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_at(1.0, 1.0, 0.1) == pytest.approx(0.0, abs=1e-12)


def test_bad_arguments(tmp_path, trained_teacher):
    with pytest.raises(ValueError, match="Unknown open_clip model 'ViT-Q'"):
        train_teacher(["--data", str(trained_teacher / "world"), "--out", str(tmp_path), "--model", "ViT-Q"])
    with pytest.raises(FileNotFoundError, match="World folder not found"):
        train_teacher(["--data", str(tmp_path / "none"), "--out", str(tmp_path), "--model", NAME, "--steps", "1"])
    with pytest.raises(ValueError, match="must be positive"):
        train_teacher(["--data", str(trained_teacher / "world"), "--out", str(tmp_path), "--steps", "0"])
    with pytest.raises(SystemExit):
        train_teacher(["--data", "x", "--out", "y", "--steps", "1", "--minutes", "1"])
    assert SyntheticWorld(trained_teacher / "world").class_names[0] == "red circle"


def test_question_probe_scores_every_image_question(trained_teacher):
    from bootstrap.zero_shot import probe_prompt, question_probe_report

    model = open_clip.create_model(NAME, pretrained=str(trained_teacher / "teacher" / "open_clip_model.safetensors"))
    world = SyntheticWorld(trained_teacher / "world")
    report = question_probe_report(model.eval(), open_clip.get_tokenizer(NAME), world, "train", 64, "cpu")
    records = json.loads((trained_teacher / "world" / "llava_train.json").read_text())
    asked = sum(len(r["qa_meta"]) for r in records if "image" in r)
    assert sum(row["questions"] for row in report["by_type"].values()) == asked
    assert 0 <= report["overall"] <= 1 and report["chance"]["existence"] == 0.5
    assert probe_prompt("position", "red circle", "left") == "a red circle on the left"
    assert probe_prompt("count", "circles", "3") == "three circles"
    with pytest.raises(ValueError, match="no CLIP probe"):
        probe_prompt("text", "", "")


def test_captions_longer_than_the_text_context_are_reported():
    tokenizer = open_clip.get_tokenizer("synth-vit-t-8")  # 32-token context
    full = "a large red star" + ", a small blue ring at the top right" * 6 + "."
    captions = [[full, "a large red star."], ["a large green cross.", "a large green cross."]]
    paths = ["images/0000000.png", "images/0000001.png"]
    warning = cut_captions_warning(tokenizer, captions, torch.tensor([1.0, 1.0]), paths, "synth-vit-t-8")
    assert warning is not None
    assert "1 of the 4 captions" in warning and "images/0000000.png" in warning and "32-token" in warning
    # Training only on the short captions cuts nothing.
    assert cut_captions_warning(tokenizer, captions, torch.tensor([0.0, 1.0]), paths, "synth-vit-t-8") is None


# Keeping the user's work: checkpoints, exact resume after kill -9, refused settings, damaged checkpoints, divergence.


def teacher_args(world, out, *extra):
    return ["--data", str(world), "--out", str(out), "--model", NAME, "--batch-size", "8", "--threads", "1", *extra]


def same_teacher_weights(a, b):
    """Bit-identical: the same ops on the same batches in the same order, one thread, give the same floats."""
    wa, wb = load_file(a / "open_clip_model.safetensors"), load_file(b / "open_clip_model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_kill_9_then_resume_matches_an_uninterrupted_run(trained_teacher, tmp_path):
    world, straight, killed = trained_teacher / "world", tmp_path / "straight", tmp_path / "killed"
    extra = ("--steps", "12", "--save-every", "1")
    victim = cli_process.start("train-teacher", *teacher_args(world, killed, *extra), log=tmp_path / "kill.log")
    code = cli_process.kill_when(victim, killed / "checkpoints" / "step_00000002")
    assert code == -signal.SIGKILL, (tmp_path / "kill.log").read_text()[-2000:]
    assert not (killed / "open_clip_model.safetensors").exists()
    assert cli(["train-teacher", *teacher_args(world, straight, *extra)]) == 0  # the same command, uninterrupted
    resumed = cli_process.run("train-teacher", *teacher_args(world, killed, *extra, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr  # logged
    assert same_teacher_weights(straight, killed)
    a, b = (json.loads((p / "zero_shot.json").read_text()) for p in (straight, killed))
    assert a["loss_curve"] == b["loss_curve"] and a["top1"] == b["top1"]


def test_resume_refuses_changed_settings_falls_back_from_a_damaged_checkpoint(
    trained_teacher, tmp_path, capsys, caplog
):
    caplog.set_level(logging.INFO, logger="bootstrap")
    world, straight, out = trained_teacher / "world", tmp_path / "straight", tmp_path / "run"
    extra = ("--steps", "3", "--save-every", "1")
    assert cli(["train-teacher", *teacher_args(world, straight, *extra)]) == 0
    shutil.copytree(straight, out)
    capsys.readouterr()
    assert cli(["train-teacher", *teacher_args(world, out, *extra, "--resume", "--lr", "0.5")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "was trained with other settings: --lr 0.002 -> 0.5" in line
    assert cli(["train-teacher", *teacher_args(world, out, *extra)]) == 2
    assert "already holds checkpoints of a run (newest step_00000003): pass --resume" in capsys.readouterr().err
    newest = out / "checkpoints" / "step_00000003" / "open_clip_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    (out / "open_clip_model.safetensors").unlink()
    assert cli(["train-teacher", *teacher_args(world, out, "--steps", "3", "--save-every", "3", "--resume")]) == 0
    assert "skipping damaged checkpoint" in caplog.text and "step_00000003" in caplog.text
    assert "resumed from" in caplog.text and "at step 2" in caplog.text
    assert "do not change the weights: --save-every 1 -> 3" in caplog.text
    assert same_teacher_weights(straight, out)


def test_a_diverging_run_stops_before_a_nan_gradient_reaches_the_weights(trained_teacher, tmp_path, capsys):
    """At --lr 1e3 the loss of step 3 is finite but its gradient is NaN: the run stops before the update."""
    world, out = trained_teacher / "world", tmp_path / "div"
    args = teacher_args(world, out, "--steps", "20", "--save-every", "1", "--lr", "1e3")
    for extra in ((), ("--resume",)):
        assert cli(["train-teacher", *args, *extra]) == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert "the gradient norm became nan in step 3; stopped before the update" in line
        assert f"the last good checkpoint is {out / 'checkpoints' / 'step_00000002'}" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    load_safetensors(out / "checkpoints" / "step_00000002" / "open_clip_model.safetensors")  # finite
    assert not (out / "open_clip_model.safetensors").exists()


@pytest.mark.parametrize(
    "extra", [("--batch-size", "0"), ("--lr", "-1"), ("--lr", "inf"), ("--warmup", "1"), ("--save-every", "-2")]
)
def test_absurd_numbers_get_one_line(trained_teacher, tmp_path, capsys, extra):
    assert cli(["train-teacher", *teacher_args(trained_teacher / "world", tmp_path / "x", "--steps", "1"), *extra]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mllm-sparse train-teacher: error: ") and extra[0] in line
