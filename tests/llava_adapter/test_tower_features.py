"""`--tower_features DIR`: the frozen tower's features computed once per image and served to the training steps.

The steps run no tower and train what they trained with it; a second run on the same images and tower reuses the
file, and any change to what the file was computed from rebuilds it."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_vlm import common_args, save_tiny_vlm
from transformers import AutoModelForImageTextToText

from llava_adapter import tower_features, train
from llava_adapter.conversation import RecordError
from mllm_sparse.modeling import SparseFormerModel


@pytest.fixture
def data(image_folder, image_record, text_record, write_data):
    records = [image_record(f"img-{i}", image="abc"[i % 3] + ".png") for i in range(6)] + [text_record("txt-0")]
    return write_data(records)


@pytest.fixture
def tower_calls(monkeypatch) -> list[int]:
    """The batch size of every SparseFormer forward pass, in order."""
    calls: list[int] = []
    forward = SparseFormerModel.forward

    def counted(self, pixel_values=None, *args, **kwargs):
        calls.append(pixel_values.shape[0])
        return forward(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(SparseFormerModel, "forward", counted)
    return calls


def stage2(vlm_dir, data, image_folder, out, *extra) -> list[str]:
    """Three steps that train the LLM and the projector (the tower frozen), by SGD: Adam would turn float noise in a
    near-zero gradient into a full step, and the comparisons below would compare noise."""
    args = common_args(vlm_dir, data, image_folder, out, "--version", "vicuna_v1", "--learning_rate", "0.5")
    args[args.index("--max_steps") + 1] = "3"
    return args + ["--optim", "sgd", "--use_cpu", "True", *extra]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForImageTextToText.from_pretrained(folder).state_dict()


def test_the_steps_run_no_tower_and_train_what_they_trained_with_it(
    tokenizer, data, image_folder, tmp_path, tower_calls
):
    vlm_dir = save_tiny_vlm(tokenizer, tmp_path / "vlm")
    assert train.main(stage2(vlm_dir, data, image_folder, tmp_path / "every_step")) == 0
    assert len(tower_calls) == 3  # a pass per step, over the image records of its batch
    tower_calls.clear()
    features = tmp_path / "features"
    assert train.main(stage2(vlm_dir, data, image_folder, tmp_path / "once", "--tower_features", str(features))) == 0
    assert tower_calls == [3]  # the three images, once, before the first step
    per_step, once = weights(tmp_path / "every_step"), weights(tmp_path / "once")
    assert per_step.keys() == once.keys()
    for key in per_step:
        torch.testing.assert_close(once[key], per_step[key], rtol=1e-4, atol=1e-5, msg=key)
    model = AutoModelForImageTextToText.from_pretrained(vlm_dir)
    [file] = features.iterdir()
    assert file.name == tower_features.file_name(model.config.image_seq_length)
    with safe_open(str(file), framework="pt") as f:
        table, metadata = f.get_tensor(tower_features.TABLE_KEY), f.metadata()
    assert table.shape == (3, model.config.image_seq_length, model.config.vision_config.hidden_size)
    assert metadata["images"] == "3" and json.loads(metadata["feature_layer"]) == model.config.vision_feature_layer


def test_a_second_run_reuses_the_file_and_a_change_in_its_inputs_rebuilds_it(
    tokenizer, data, image_folder, tmp_path, tower_calls, caplog
):
    """Stage 2 pointed at stage 1's folder runs no tower; a touched image or another tower makes a new file,
    and the log says why."""
    vlm_dir = save_tiny_vlm(tokenizer, tmp_path / "vlm")
    features = ["--tower_features", str(tmp_path / "features")]
    stage1 = stage2(vlm_dir, data, image_folder, tmp_path / "stage1", *features)
    stage1[stage1.index("--learning_rate") + 1] = "0"  # the projector alone, a full model saved (as the recipes do)
    assert train.main(stage1 + ["--mm_projector_lr", "0.5"]) == 0
    assert tower_calls == [3]
    tower_calls.clear()
    with caplog.at_level(logging.INFO, logger="llava_adapter.tower_features"):
        assert train.main(stage2(tmp_path / "stage1", data, image_folder, tmp_path / "stage2", *features)) == 0
    assert tower_calls == [] and "reused" in caplog.text
    caplog.clear()
    stat = (image_folder / "b.png").stat()
    try:
        os.utime(image_folder / "b.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        with caplog.at_level(logging.INFO, logger="llava_adapter.tower_features"):
            assert train.main(stage2(vlm_dir, data, image_folder, tmp_path / "touched", *features)) == 0
    finally:
        os.utime(image_folder / "b.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert tower_calls == [3] and "the image files (paths, sizes or times) changed; rebuilding it" in caplog.text
    tower_calls.clear()
    caplog.clear()
    other = AutoModelForImageTextToText.from_pretrained(vlm_dir)
    with torch.no_grad():
        next(other.model.vision_tower.parameters()).add_(0.01)
    shutil.copytree(vlm_dir, tmp_path / "other_vlm")  # the processor; the weights are replaced
    other.save_pretrained(tmp_path / "other_vlm")
    with caplog.at_level(logging.INFO, logger="llava_adapter.tower_features"):
        assert train.main(stage2(tmp_path / "other_vlm", data, image_folder, tmp_path / "other", *features)) == 0
    assert tower_calls == [3] and "the tower's weights changed" in caplog.text


def test_every_drawn_budget_gets_its_own_table(tokenizer, data, image_folder, tmp_path, tower_calls):
    """An elastic tower trained over budgets 4 and 9: one file per budget, and the steps train what they trained
    with the tower running at each batch's budget."""
    vlm_dir = save_tiny_vlm(tokenizer, tmp_path / "vlm", budgets=[4, 9, 15])
    budgets = ["--budgets", "4", "9"]
    assert train.main(stage2(vlm_dir, data, image_folder, tmp_path / "every_step", *budgets)) == 0
    tower_calls.clear()
    features = tmp_path / "features"
    once = ["--tower_features", str(features), *budgets]
    assert train.main(stage2(vlm_dir, data, image_folder, tmp_path / "once", *once)) == 0
    assert tower_calls == [3, 3]
    assert sorted(p.name for p in features.iterdir()) == [tower_features.file_name(n) for n in (4, 9)]
    per_step, cached = weights(tmp_path / "every_step"), weights(tmp_path / "once")
    for key in per_step:
        torch.testing.assert_close(cached[key], per_step[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_tower_that_trains_is_refused(tokenizer, data, image_folder, tmp_path):
    vlm_dir = save_tiny_vlm(tokenizer, tmp_path / "vlm")
    args = stage2(vlm_dir, data, image_folder, tmp_path / "out", "--tower_features", str(tmp_path / "f"))
    with pytest.raises(ValueError, match="the tower trains"):
        train.main(args + ["--tune_vision_last_k", "1"])


def test_an_unreadable_image_fails_naming_its_record_or_is_skipped(
    tokenizer, image_folder, image_record, write_data, tmp_path
):
    vlm_dir = save_tiny_vlm(tokenizer, tmp_path / "vlm")
    records = [image_record(f"img-{i}", image="ab"[i % 2] + ".png") for i in range(4)]
    data = write_data(records + [image_record("broken", image="corrupt.png")])
    features = ["--tower_features", str(tmp_path / "features")]
    args = stage2(vlm_dir, data, image_folder, tmp_path / "strict", *features)
    args[args.index("--max_steps") + 1] = "6"  # every record comes up
    with pytest.raises(RecordError, match="broken"):
        train.main(args)
    skipping = stage2(vlm_dir, data, image_folder, tmp_path / "skipping", *features, "--skip_bad_records", "True")
    with pytest.warns(UserWarning, match="skipping.*broken"):
        assert train.main(skipping) == 0
    assert not (tmp_path / "features").exists()  # a table with a hole is not kept
