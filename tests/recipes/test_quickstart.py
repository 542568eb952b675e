"""`mllm-sparse quickstart`: the whole pipeline on a tiny synthetic world (the smoke plan), continued runs, settings
that changed, bad arguments; and the question-only prior it reports against."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from smoke_runs import SMOKE_QUICKSTART
from transformers import AutoModelForImageTextToText

from llava_adapter.evaluate import question_only_prior
from mllm_sparse_recipes import quickstart
from mllm_sparse_recipes.cli import main as cli_main
from mllm_sparse_recipes.stages import DONE_DIR

SMOKE = SMOKE_QUICKSTART


@pytest.fixture
def run_dir(smoke_run) -> Path:
    return smoke_run


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    return out


def llm_weights(state: dict) -> dict:
    """The language model's transformer tensors of a saved LLaVA or causal-LM state_dict, keyed without prefix."""
    prefixes = ("language_model.model.", "model.language_model.", "model.")  # LLaVA as saved, as built; a causal LM
    out = {}
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is not None and "vision_tower" not in key and "multi_modal_projector" not in key:
            out[key.removeprefix(prefix)] = value
    return out


def test_every_stage_runs_and_the_report_reads_their_outputs(run_dir):
    report = json.loads((run_dir / "quickstart.json").read_text())
    assert list(report["seconds"]) == list(quickstart.STAGES)
    assert sorted(p.name for p in (run_dir / DONE_DIR).iterdir()) == sorted(quickstart.STAGES)
    settings = report["settings"]
    assert settings["num_images"] == quickstart.PLANS["smoke"].num_images and settings["num_latent_tokens"] == 9

    # the VLM is a stock LLaVA with the encoder's 9 latent tokens
    model = AutoModelForImageTextToText.from_pretrained(run_dir / "stage2")
    assert model.config.image_seq_length == report["vlm"]["image_tokens"] == 9
    assert model.config.vision_config.num_latent_tokens == 9
    # stage 1 trained the projector on the frozen pretrained LLM; stage 2 the LLM too
    llm = load_file(run_dir / "llm" / "model.safetensors")
    base, stage1, stage2 = (load_file(run_dir / d / "model.safetensors") for d in ("vlm", "stage1", "stage2"))
    llm, stage1_llm = llm_weights(llm), llm_weights(stage1)
    assert len(llm) > 10 and set(llm) <= set(stage1_llm)
    for key, value in llm.items():
        torch.testing.assert_close(stage1_llm[key], value)
    projector = [k for k in base if "multi_modal_projector" in k]
    assert projector and any(not torch.equal(base[k], stage1[k]) for k in projector)
    assert any(not torch.equal(stage1_llm[k], v) for k, v in llm_weights(stage2).items())

    evaluation = json.loads((run_dir / "eval" / "eval_vlm.json").read_text())
    assert evaluation["model"] == str(run_dir / "stage2")
    assert report["vlm"]["accuracy"] == evaluation["accuracy"]
    assert report["vlm"]["answers"] == evaluation["num_answers"] > 0
    prior = question_only_prior(run_dir / "world" / "llava_train.json", evaluation["predictions"])
    assert report["vlm"]["prior"]["accuracy"] == prior["accuracy"]
    teacher = json.loads((run_dir / "teacher" / "zero_shot.json").read_text())
    assert report["teacher"]["zero_shot_top1"] == teacher["top1"] and report["teacher"]["classes"] == 48
    scene = json.loads((run_dir / "llm" / "scene_pretrain.json").read_text())
    assert scene["steps"] == 5 and report["llm"]["accuracy"] == pytest.approx(scene["final"]["accuracy"] / 100)

    # where the tokens look, as the demo draws it: one 448-px panel per test image; a chat about the first
    rois = Image.open(run_dir / "show" / "rois.png")
    assert rois.width == (448 + 8) * quickstart.SHOW_IMAGES - 8 and rois.height > 448  # a legend under each panel
    show = report["show"]
    assert 1 <= len(show["chat"]) <= 3 and all({"question", "answer", "gold"} <= set(c) for c in show["chat"])
    markdown = (run_dir / "quickstart.md").read_text()
    assert "| eval |" in markdown and "question-only prior" in markdown and "mllm-sparse demo --model" in markdown
    assert "it learns nothing" in markdown and "reads the image" not in markdown  # a smoke run claims nothing


def test_every_file_of_the_run_is_as_readable_as_the_umask_allows(run_dir):
    """Models, checkpoints, caches, tables and reports alike: no stage leaves an owner-only file (safetensors writes
    them so), so a run can be shared with a group or read by a server."""
    umask = os.umask(0)
    os.umask(umask)
    readable = 0o444 & ~umask
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert [str(p.relative_to(run_dir)) for p in files if p.stat().st_mode & readable != readable] == []


def test_the_report_says_what_beating_the_prior_means():
    vlm = {"accuracy": 0.6, "prior": {"accuracy": 0.4}}
    assert quickstart.prior_verdict("laptop", vlm) == "The VLM scores above it: it reads the image."
    assert "does not read the image yet" in quickstart.prior_verdict("laptop", {**vlm, "accuracy": 0.4})
    assert "learns nothing" in quickstart.prior_verdict("smoke", vlm)
    report = {"vlm": vlm, "seconds": {"world": 60, "vlm": 30}, "plan": "laptop", "folders": {"stage2": "q/stage2"}}
    first, second = quickstart.summary_line(report, Path("q")).splitlines()  # the console's summary: two lines
    assert first == ("Quickstart (laptop plan) done in 1.5 min: the VLM answers 60.0% of the test questions "
                     "(question-only prior 40.0%). The VLM scores above it: it reads the image.")  # fmt: skip
    assert second == "Report: q/quickstart.md. Chat with it: uv run mllm-sparse demo --model q/stage2"


def test_a_rerun_continues_from_checkpoints_and_redoes_unfinished_stages(run_dir, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)  # the stages' libraries log their resumes
    out = copy_of(run_dir, tmp_path)
    for stage in quickstart.STAGES[2:]:  # as if stopped during the bootstrap
        (out / DONE_DIR / stage).unlink()
    (out / "encoder" / "bootstrap_report.json").unlink()
    (out / "llm" / "scene_pretrain.json").unlink()
    shutil.rmtree(out / "vlm")
    (out / "vlm").mkdir()
    (out / "vlm" / "config.json").write_text("{}")  # a half-written folder: cleared, not trusted
    capsys.readouterr()
    caplog.set_level(logging.INFO)
    assert cli_main(["quickstart", "--out", str(out), *SMOKE]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done earlier") == 2  # world, teacher
    said = printed + caplog.text  # what the stages print and what the libraries log
    assert said.count("resumed from") == 2  # encoder, llm: from their last checkpoints, not from scratch
    assert "at step 3" in said and "at step 5" in said
    assert AutoModelForImageTextToText.from_pretrained(out / "vlm").config.image_seq_length == 9


def test_a_rerun_may_change_what_is_not_done_yet(run_dir, tmp_path, capsys):
    out = copy_of(run_dir, tmp_path)
    assert cli_main(["quickstart", "--out", str(out), *SMOKE, "--teacher-steps", "7"]) == 2
    error = capsys.readouterr().err
    assert "teacher_steps 3 -> 7 (stage teacher is done)" in error and str(out) in error

    for stage in ("eval", "show"):
        (out / DONE_DIR / stage).unlink()
    assert cli_main(["quickstart", "--out", str(out), *SMOKE, "--eval-records", "2"]) == 0
    assert json.loads((out / "eval" / "eval_vlm.json").read_text())["num_records"] == 2
    assert json.loads((out / quickstart.SETTINGS_FILE).read_text())["eval_records"] == 2


def test_a_run_recorded_with_one_epoch_count_for_both_stages_continues(run_dir, tmp_path, capsys):
    out = copy_of(run_dir, tmp_path)
    recorded = json.loads((out / quickstart.SETTINGS_FILE).read_text())
    epochs = recorded.pop("stage1_epochs")
    assert recorded.pop("stage2_epochs") == epochs
    (out / quickstart.SETTINGS_FILE).write_text(json.dumps({**recorded, "vlm_epochs": epochs}))
    assert cli_main(["quickstart", "--out", str(out), *SMOKE]) == 0
    assert "stage2: done earlier" in capsys.readouterr().out
    assert json.loads((out / quickstart.SETTINGS_FILE).read_text()) == {
        **recorded,
        "stage1_epochs": epochs,
        "stage2_epochs": epochs,
    }


def test_a_folder_with_stage_folders_but_no_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "runs"
    (out / "world").mkdir(parents=True)
    (out / "world" / "mine.txt").write_text("not a quickstart's")
    assert cli_main(["quickstart", "--out", str(out), "--plan", "smoke"]) == 2
    assert "already holds world" in capsys.readouterr().err
    assert (out / "world" / "mine.txt").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num-images", "50"], "--num-images 50 leaves 40 training images"),
        (["--teacher-steps", "0"], "--teacher-steps must be positive"),
        (["--num-latent-tokens", "0"], "--num-latent-tokens must be positive"),
        (["--threads", "0"], "--threads must be positive"),
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
    system = {"from": "system", "value": "Answer briefly."}  # a leading system turn does not shift the pairs
    records += [{"id": str(i), "conversations": [system, conversation[0], {"from": "gpt", "value": "blue"}]}
                for i in (4, 5, 6)]  # fmt: skip
    train.write_text(json.dumps(records))
    rows = [
        {"question": "<image>\nWhat colour is the star?", "gold": "Red.", "type": "color", "target_size": "small"},
        {"question": "What colour is the star?", "gold": "blue", "type": "color", "target_size": "large"},
        {"question": "Is there a circle?", "gold": "yes", "type": "existence", "target_size": None},
        {"question": "Never asked in training?", "gold": "no", "type": "existence", "target_size": None},
    ]
    prior = question_only_prior(train, rows)
    assert [r["prediction"] for r in prior["predictions"]] == ["blue", "blue", "no", ""]  # blue 4 : red 3
    assert prior["accuracy"] == 0.25 and prior["num_answers"] == 4
    assert prior["by_type"]["color"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert prior["by_target_size"] == {
        "small": {"correct": 0, "total": 1, "accuracy": 0.0},
        "large": {"correct": 1, "total": 1, "accuracy": 1.0},
    }
