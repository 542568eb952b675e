"""`mllm-sparse quickstart`: the whole pipeline on a tiny synthetic world (the smoke plan), continued runs, settings
that changed, bad arguments; and the question-only prior it reports against."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoModelForImageTextToText

from llava_adapter import quickstart
from llava_adapter.evaluate import question_only_prior
from mllm_sparse.cli import main as cli_main

STAGES = ["world", "teacher", "encoder", "llm", "vlm", "stage1", "stage2", "eval", "show"]
SMOKE = ["--plan", "smoke", "--num-latent-tokens", "9", "--threads", "2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quickstart")
    assert cli_main(["quickstart", "--out", str(out), *SMOKE]) == 0
    return out


def test_every_stage_runs_and_the_report_reads_their_outputs(run_dir):
    report = json.loads((run_dir / "quickstart.json").read_text())
    assert list(report["seconds"]) == STAGES
    assert all(seconds >= 0 for seconds in report["seconds"].values())
    settings = report["settings"]
    assert settings["num_images"] == quickstart.PLANS["smoke"].num_images and settings["num_latent_tokens"] == 9

    # the VLM is a stock LLaVA with the encoder's 9 latent tokens, trained in two stages from the pretrained LLM
    model = AutoModelForImageTextToText.from_pretrained(run_dir / "stage2")
    assert model.config.image_seq_length == report["vlm"]["image_tokens"] == 9
    assert model.config.vision_config.num_latent_tokens == 9
    evaluation = json.loads((run_dir / "eval" / "eval_vlm.json").read_text())
    assert evaluation["model"] == str(run_dir / "stage2")
    assert report["vlm"]["accuracy"] == evaluation["accuracy"]
    assert report["vlm"]["answers"] == evaluation["num_answers"] > 0
    prior = question_only_prior(run_dir / "world" / "llava_train.json", evaluation["predictions"])
    assert report["vlm"]["prior"]["accuracy"] == prior["accuracy"]
    teacher = json.loads((run_dir / "teacher" / "zero_shot.json").read_text())
    assert report["teacher"]["zero_shot_top1"] == teacher["top1"]
    scene = json.loads((run_dir / "llm" / "scene_pretrain.json").read_text())
    assert scene["steps"] == 5 and report["llm"]["accuracy"] == scene["final"]["accuracy"]

    # where the tokens look: one panel per test image; a chat with the final model about the first
    rois = Image.open(run_dir / "show" / "rois.png")
    assert rois.width > 3 * rois.height
    show = report["show"]
    assert 1 <= len(show["chat"]) <= 3 and all({"question", "answer", "gold"} <= set(c) for c in show["chat"])
    markdown = (run_dir / "quickstart.md").read_text()
    assert "| eval |" in markdown and "question-only prior" in markdown and "uv run mllm-sparse eval-vlm" in markdown


def test_a_rerun_continues_and_does_only_what_is_missing(run_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    shutil.rmtree(out / "eval")
    shutil.rmtree(out / "show")
    before = json.loads((out / quickstart.TIMES_FILE).read_text())

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    import bootstrap.train
    import bootstrap.train_teacher
    import llava_adapter.train

    for module in (bootstrap.train, bootstrap.train_teacher, llava_adapter.train):
        monkeypatch.setattr(module, "main", refuse)
    capsys.readouterr()
    assert cli_main(["quickstart", "--out", str(out), *SMOKE]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done earlier") == 7
    after = json.loads((out / quickstart.TIMES_FILE).read_text())
    assert {k: after[k] for k in before if k not in ("eval", "show")} == {
        k: v for k, v in before.items() if k not in ("eval", "show")
    }
    assert (out / "eval" / "eval_vlm.json").is_file() and (out / "show" / "rois.png").is_file()


def test_other_settings_in_the_same_folder_are_refused(run_dir, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    assert cli_main(["quickstart", "--out", str(out), *SMOKE, "--teacher-steps", "7"]) == 2
    error = capsys.readouterr().err
    assert "teacher_steps 3 -> 7" in error and str(out) in error


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num-images", "5"], "--num-images must be at least 10"),
        (["--teacher-steps", "0"], "--teacher-steps must be positive"),
        (["--num-latent-tokens", "0"], "--num-latent-tokens must be positive"),
        (["--llm", "/nonexistent/llm"], "--llm /nonexistent/llm: no config.json"),
    ],
)
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, extra, message):
    out = tmp_path / "qs"
    assert cli_main(["quickstart", "--out", str(out), "--plan", "smoke", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_question_only_prior_answers_with_the_most_frequent_training_answer(tmp_path):
    train = tmp_path / "train.json"
    conversation = [
        {"from": "human", "value": "<image>\nWhat colour is the star?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "Is there a circle?"},
        {"from": "gpt", "value": "no"},
    ]
    records = [{"id": str(i), "image": "a.png", "conversations": conversation} for i in range(3)]
    records.append({"id": "3", "conversations": [conversation[0], {"from": "gpt", "value": "blue"}]})
    train.write_text(json.dumps(records))
    rows = [
        {"question": "<image>\nWhat colour is the star?", "gold": "Red.", "type": "color", "target_size": "small"},
        {"question": "What colour is the star?", "gold": "blue", "type": "color", "target_size": "large"},
        {"question": "Is there a circle?", "gold": "yes", "type": "existence", "target_size": None},
        {"question": "Never asked in training?", "gold": "no", "type": "existence", "target_size": None},
    ]
    prior = question_only_prior(train, rows)
    assert [r["prediction"] for r in prior["predictions"]] == ["red", "red", "no", ""]
    assert prior["accuracy"] == 0.25 and prior["num_answers"] == 4
    assert prior["by_type"]["color"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert prior["by_target_size"] == {
        "small": {"correct": 1, "total": 1, "accuracy": 1.0},
        "large": {"correct": 0, "total": 1, "accuracy": 0.0},
    }
