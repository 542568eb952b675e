"""`mllm-sparse ablate` on the parts of a smoke quickstart: arms trained and scored on the same answers, compared,
timed and plotted; budgets added to a finished ablation; changed settings and bad arguments refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from llava_adapter.evaluate import question_only_prior
from mllm_sparse_recipes import ablation
from mllm_sparse_recipes.ablation.run import arm_towers, checked_train_args, tower_of_arguments
from mllm_sparse_recipes.cli import main as cli_main

TINY = ["--stage1-epochs", "0.25", "--stage2-epochs", "0.25", "--eval-limit", "3", "--timing-questions", "1"]


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def parts(run: Path) -> list[str]:
    return ["--world", str(run / "world"), "--teacher", str(run / "teacher"), "--llm", str(run / "llm")]


@pytest.fixture(scope="module")
def ablation_dir(smoke_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ablation")
    argv = [*parts(smoke_run), "--budgets", "9", "--encoders", f"9={smoke_run / 'encoder'}",
            "--arms", "vit", "sparseformer", "pooled", "visionzip", *TINY, "--out", str(out)]  # fmt: skip
    assert cli_main(["ablate", *argv]) == 0
    return out


def predictions(out: Path, arm: str, stage: str = "stage1") -> list[dict]:
    return json.loads((out / "arms" / arm / f"eval_{stage}" / "eval_vlm.json").read_text())["predictions"]


def language_model(state: dict) -> dict:
    prefix = "language_model.model."
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def test_every_arm_is_trained_scored_compared_timed_and_plotted(ablation_dir, smoke_run):
    report = json.loads((ablation_dir / "ablation.json").read_text())
    arms = report["arms"]
    assert list(arms) == ["vit", "sparseformer-9", "pooled-9", "visionzip-9"]
    assert {n: a["stage2"]["image_tokens"] for n, a in arms.items()} == {
        "vit": 196, "sparseformer-9": 9, "pooled-9": 9, "visionzip-9": 9}  # fmt: skip
    visionzip = json.loads((ablation_dir / "arms" / "visionzip-9" / "stage2" / "config.json").read_text())
    assert visionzip["vision_config"]["model_type"] == "visionzip"
    assert all(list(a) == ["stage1", "stage2"] for a in arms.values())
    # every arm answered the same questions, and the prior was scored on them too
    answers = {n: a["stage2"]["answers"] for n, a in arms.items()}
    assert len(set(answers.values())) == 1 and report["prior"]["answers"] == answers["vit"] > 0
    prior = question_only_prior(smoke_run / "world" / "llava_train.json", predictions(ablation_dir, "vit"))
    assert report["prior"]["accuracy"] == prior["accuracy"]
    evaluation = json.loads((ablation_dir / "arms" / "pooled-9" / "eval_stage1" / "eval_vlm.json").read_text())
    assert arms["pooled-9"]["stage1"]["accuracy"] == evaluation["accuracy"]
    assert evaluation["model"].endswith("arms/pooled-9/stage1")
    assert arms["vit"]["stage2"]["train_seconds"] > arms["vit"]["stage1"]["train_seconds"] > 0

    # stage 1 trains the projector on the frozen LLM, stage 2 continues from it with the LLM trained too
    llm = {k.removeprefix("model."): v for k, v in load_file(smoke_run / "llm" / "model.safetensors").items()}
    arm = ablation_dir / "arms" / "pooled-9"
    base, stage1, stage2 = (load_file(arm / d / "model.safetensors") for d in ("base", "stage1", "stage2"))
    assert len(language_model(stage1)) == len([k for k in llm if not k.startswith("lm_head")]) > 10
    assert all(torch.equal(v, llm[k]) for k, v in language_model(stage1).items())
    assert any(not torch.equal(base[k], stage1[k]) for k in base if "multi_modal_projector" in k)
    assert any(not torch.equal(v, language_model(stage1)[k]) for k, v in language_model(stage2).items())

    pairs = [(p["a"], p["b"]) for p in report["paired"]["stage2"]]
    assert pairs == [("sparseformer-9", "pooled-9"), ("sparseformer-9", "visionzip-9"), ("sparseformer-9", "vit"),
                     ("pooled-9", "vit"), ("visionzip-9", "vit")]  # fmt: skip
    first = report["paired"]["stage2"][0]["all"]
    expected = arms["sparseformer-9"]["stage2"]["accuracy"] - arms["pooled-9"]["stage2"]["accuracy"]
    assert first["difference"] == pytest.approx(expected) and first["low"] <= first["difference"] <= first["high"]
    assert set(report["timing"]) == set(arms) and all(t["ttft_ms"] > 0 for t in report["timing"].values())

    for name in ("ablation_accuracy.png", "ablation_speed.png"):
        image = Image.open(ablation_dir / name)
        assert image.format == "PNG" and image.width > 1000
    markdown = (ablation_dir / "ablation.md").read_text()
    assert "## After stage 2" in markdown and "## Paired differences after stage 1" in markdown
    assert "| sparseformer-9 | 9 |" in markdown
    assert "![accuracy against image tokens](ablation_accuracy.png)" in markdown


def test_a_budget_added_later_reuses_the_trained_arms_and_the_one_model_arms_serve_both(
    ablation_dir, smoke_run, tmp_path, capsys
):
    out = copy_of(ablation_dir, tmp_path)
    argv = [*parts(smoke_run), "--budgets", "9", "4", "--encoders", f"9={smoke_run / 'encoder'}",
            "--bootstrap-steps", "2", "--arms", "elastic", "m3", "sparseformer", *TINY, "--out", str(out)]  # fmt: skip
    capsys.readouterr()
    assert cli_main(["ablate", *argv, "--budgets-per-step", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done earlier") == 5  # sparseformer-9's base, 2 stages, 2 evaluations
    report = json.loads((out / "ablation.json").read_text())
    # no ViT, pooled or VisionZip arm asked for this time; one M3 and one elastic model, each scored at both budgets
    assert list(report["arms"]) == ["sparseformer-9", "sparseformer-4", "m3-9", "m3-4", "elastic-9", "elastic-4"]
    m3 = json.loads((out / "arms" / "m3" / "stage2" / "config.json").read_text())["vision_config"]
    assert (m3["model_type"], m3["budgets"], m3["num_latent_tokens"]) == ("pooled_vision", [4, 9], 9)
    assert {n: report["arms"][f"m3-{n}"]["stage2"]["image_tokens"] for n in (9, 4)} == {9: 9, 4: 4}
    encoder = json.loads((out / "encoders" / "n4" / "config.json").read_text())
    assert encoder["num_latent_tokens"] == 4 and report["encoders"]["4"] == str(out / "encoders" / "n4")

    elastic = json.loads((out / "encoders" / "elastic" / "config.json").read_text())
    assert elastic["budgets"] == [4, 9] and elastic["num_latent_tokens"] == 9
    assert {n: report["arms"][f"elastic-{n}"]["stage2"]["image_tokens"] for n in (9, 4)} == {9: 9, 4: 4}
    assert sorted(p.name for p in (out / "arms").iterdir() if p.name.startswith("elastic")) == [
        "elastic", "elastic-4", "elastic-9"]  # fmt: skip
    assert not (out / "arms" / "elastic-4" / "stage2").exists()  # scored there, trained once in arms/elastic
    scored = json.loads((out / "arms" / "elastic-4" / "eval_stage2" / "eval_vlm.json").read_text())
    assert scored["model"].endswith("arms/elastic/stage2") and scored["num_latent_tokens"] == 4
    recipe = json.loads((out / "arms" / "elastic" / "arm.json").read_text())
    assert recipe["budgets"] == [9, 4] and recipe["tower"] == {"encoder": str(out / "encoders" / "elastic")}
    assert recipe["budgets_per_step"] == 2
    for arm, stage in (("elastic", "stage1"), ("m3", "stage2")):  # both one-model arms ran every batch at both
        trained = json.loads((out / "arms" / arm / stage / "train_settings.json").read_text())
        assert (sorted(trained["budgets"]), trained["budgets_per_step"]) == ([4, 9], 2)
    pairs = [(p["a"], p["b"]) for p in report["paired"]["stage2"]]
    assert pairs == [("sparseformer-9", "m3-9"), ("sparseformer-4", "m3-4"), ("elastic-9", "sparseformer-9"),
                     ("elastic-9", "m3-9"), ("elastic-4", "sparseformer-4"), ("elastic-4", "m3-4")]  # fmt: skip
    seconds = {n: report["arms"][n]["stage2"]["train_seconds"] for n in ("elastic-9", "elastic-4")}
    assert seconds["elastic-9"] == seconds["elastic-4"] > 0  # one training, shared
    assert {"elastic-9", "elastic-4"} <= set(report["timing"])
    assert report["arms"]["sparseformer-4"]["stage2"]["image_tokens"] == 4
    settings = json.loads((out / ablation.SETTINGS_FILE).read_text())
    assert settings["bootstrap_steps"] == 2
    assert cli_main(["ablate", *argv, "--budgets-per-step", "1"]) == 2  # the one-model arms ran two per batch
    assert "arm m3" in capsys.readouterr().err
    for arm in ("m3", "elastic"):  # as ablations recorded one-model arms before the choice existed: one per batch
        path = out / "arms" / arm / "arm.json"
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "budgets_per_step"}))
    assert cli_main(["ablate", *argv, "--budgets-per-step", "2"]) == 2
    assert "budgets_per_step 1 -> 2" in capsys.readouterr().err


def test_another_eval_limit_only_scores_again(ablation_dir, smoke_run, tmp_path, capsys):
    out = copy_of(ablation_dir, tmp_path)
    argv = [*parts(smoke_run), "--budgets", "9", "--encoders", f"9={smoke_run / 'encoder'}", "--arms", "sparseformer",
            *TINY, "--eval-limit", "2", "--out", str(out)]  # fmt: skip
    capsys.readouterr()
    assert cli_main(["ablate", *argv]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done earlier") == 3  # base and the 2 stages; both evaluations again
    assert {p["id"] for p in predictions(out, "sparseformer-9", "stage2")} < {
        p["id"] for p in predictions(ablation_dir, "sparseformer-9", "stage2")
    }


def test_no_timing_questions_time_nothing_and_draw_no_speed_plot(ablation_dir, smoke_run, tmp_path):
    out = copy_of(ablation_dir, tmp_path)
    (out / "ablation_speed.png").unlink()
    argv = [*parts(smoke_run), "--budgets", "9", "--encoders", f"9={smoke_run / 'encoder'}", "--arms", "sparseformer",
            *TINY, "--timing-questions", "0", "--out", str(out)]  # fmt: skip
    assert cli_main(["ablate", *argv]) == 0
    assert json.loads((out / "ablation.json").read_text())["timing"] == {}
    assert "not timed (`--timing-questions 0`)" in (out / "ablation.md").read_text()
    assert (out / "ablation_accuracy.png").is_file() and not (out / "ablation_speed.png").exists()


def test_another_encoder_for_a_trained_budget_is_refused(ablation_dir, smoke_run, tmp_path, capsys):
    out = copy_of(ablation_dir, tmp_path)
    other = Path(shutil.copytree(smoke_run / "encoder", tmp_path / "other_encoder"))
    argv = [*parts(smoke_run), "--budgets", "9", "--encoders", f"9={other}", *TINY, "--out", str(out)]
    assert cli_main(["ablate", *argv]) == 2
    assert "arm sparseformer-9" in capsys.readouterr().err
    assert str(other) not in (out / ablation.SETTINGS_FILE).read_text()  # refused before anything was written


def test_other_training_settings_are_refused(ablation_dir, smoke_run, tmp_path, capsys):
    out = copy_of(ablation_dir, tmp_path)
    argv = [*parts(smoke_run), "--budgets", "9", "--encoders", f"9={smoke_run / 'encoder'}", *TINY,
            "--stage2-lr", "1e-3", "--out", str(out)]  # fmt: skip
    assert cli_main(["ablate", *argv]) == 2
    assert "stage2_lr 0.0002 -> 0.001" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--budgets", "8"], "8 is not a square number"),
        (["--budgets", "16", "--encoders", "16=ENCODER"], "that encoder has 9 latent tokens, not 16"),
        (["--budgets", "9", "--encoders", "ENCODER"], "expected N=DIR"),
        (["--budgets", "9", "--encoders", "4=ENCODER"], "4 is not one of --budgets [9]"),
        (["--budgets", "9", "--threads", "0"], "--threads must be positive"),
        (["--budgets", "0"], "0 is not a positive number of tokens"),
        (["--budgets", "9", "--encoders", "elastic=ENCODER"], "an elastic encoder is for the elastic arm"),
        (
            ["--budgets", "9", "4", "--arms", "elastic", "--encoders", "elastic=ENCODER"],
            "serves [] latent tokens, not [9, 4]",
        ),
        (["--budgets", "8", "--arms", "m3", "visionzip"], "8 is not a square number (the m3 arm pools"),
        (["--budgets", "9", "4", "--arms", "m3", "--budgets-per-step", "3"], "--budgets-per-step 3: choose 1 to 2"),
        (["--budgets", "9", "--train-args", "--budgets_per_step 2"], "use ablate's --budgets-per-step"),
    ],
)
def test_bad_arguments_fail_before_any_work(smoke_run, tmp_path, capsys, extra, message):
    out = tmp_path / "ablation"
    extra = [e.replace("ENCODER", str(smoke_run / "encoder")) for e in extra]
    assert cli_main(["ablate", *parts(smoke_run), *extra, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [([], "--llm tiny-llama is trained from scratch: give --tokenizer-corpus"),
     (["--tokenizer-corpus", "CORPUS"], "--train-data is required without --world")],
)  # fmt: skip
def test_without_a_world_the_data_must_be_named(tmp_path, capsys, extra, message):
    (tmp_path / "corpus.txt").write_text("What colour is the star?")
    extra = [e.replace("CORPUS", str(tmp_path / "corpus.txt")) for e in extra]
    argv = ["ablate", "--teacher", "open_clip:ViT-B-32@openai", "--llm", "tiny-llama", "--budgets", "16", *extra]
    assert cli_main([*argv, "--out", str(tmp_path / "a")]) == 2
    assert message in capsys.readouterr().err


def test_arm_towers_order_and_kinds():
    settings = {"teacher": "open_clip:T@w", "budgets": [49, 16], "arms": ["sparseformer", "pooled", "visionzip", "m3"]}
    towers = arm_towers(settings, {49: "e49", 16: "e16"})
    assert list(towers) == ["sparseformer-49", "pooled-49", "visionzip-49", "sparseformer-16", "pooled-16",
                            "visionzip-16", "m3"]  # fmt: skip
    assert towers["pooled-16"] == {"encoder": "open_clip:T@w", "num_latent_tokens": 16}
    assert towers["visionzip-16"] == {"encoder": "open_clip:T@w", "num_latent_tokens": 16, "reduction": "visionzip"}
    assert towers["m3"] == {"encoder": "open_clip:T@w", "budgets": [16, 49]}


def test_an_arm_recorded_as_build_vlm_arguments_reads_as_todays_tower():
    assert tower_of_arguments(["--encoder", "open_clip:T@w", "--pool-tokens", "16"]) == {
        "encoder": "open_clip:T@w",
        "num_latent_tokens": 16,
    }
    assert tower_of_arguments(["--encoder", "runs/e16"]) == {"encoder": "runs/e16"}
    with pytest.raises(ValueError, match="--projector"):
        tower_of_arguments(["--encoder", "e", "--projector", "linear"])


def test_train_args_are_read_before_any_work():
    assert (
        checked_train_args("--bf16 True --gradient_checkpointing True") == "--bf16 True --gradient_checkpointing True"
    )
    with pytest.raises(ValueError, match="--bf17"):
        checked_train_args("--bf17 True")
