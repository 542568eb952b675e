"""Damaged or wrong weights at every encoder load path: one line through the CLI naming the file, no traceback."""

from __future__ import annotations

import json

import pytest
import torch
from bad_files import one_line, poison, run, truncate
from safetensors.torch import save_file
from transformers import AutoModel, LlamaConfig

import mllm_sparse
from mllm_sparse.checkpoint import CheckpointError

PRESET = "test_sparseformer_btsp"


def inspect(tmp_path, capsys, *args: str) -> int:
    return run(capsys, "inspect", *args, "--out", str(tmp_path / "roi.png"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_inspect_truncated_pretrained_file(tmp_path, capsys, btsp_model, suffix):
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(btsp_model.state_dict(), str(path))
    else:
        torch.save(btsp_model.state_dict(), path)
    truncate(path)
    assert inspect(tmp_path, capsys, PRESET, "--pretrained", str(path)) == 2
    one_line(capsys, str(path))


def test_inspect_truncated_encoder_folder(tmp_path, capsys, btsp_model):
    btsp_model.save_pretrained(tmp_path / "enc")
    weights = tmp_path / "enc" / "model.safetensors"
    truncate(weights)
    assert inspect(tmp_path, capsys, str(tmp_path / "enc")) == 2
    one_line(capsys, str(weights), "truncated")
    # create_model(pretrained=FOLDER) and stock AutoModel.from_pretrained name the file too
    assert inspect(tmp_path, capsys, PRESET, "--pretrained", str(tmp_path / "enc")) == 2
    one_line(capsys, str(weights))
    with pytest.raises(CheckpointError, match=str(weights)):
        AutoModel.from_pretrained(tmp_path / "enc")


def test_truncated_legacy_bin_folder_names_the_folder(tmp_path, capsys, btsp_model):
    (tmp_path / "enc").mkdir()
    btsp_model.config.save_pretrained(tmp_path / "enc")
    torch.save(btsp_model.state_dict(), tmp_path / "enc" / "pytorch_model.bin")
    assert inspect(tmp_path, capsys, str(tmp_path / "enc")) == 0
    truncate(tmp_path / "enc" / "pytorch_model.bin")
    assert inspect(tmp_path, capsys, str(tmp_path / "enc")) == 2
    one_line(capsys, str(tmp_path / "enc"), "cannot load this SparseFormer encoder")


def test_non_finite_encoder_weights_are_refused_by_name(tmp_path, capsys, btsp_model):
    btsp_model.save_pretrained(tmp_path / "enc")
    poison(tmp_path / "enc" / "model.safetensors", "proj.weight")
    assert inspect(tmp_path, capsys, str(tmp_path / "enc")) == 2
    one_line(capsys, str(tmp_path / "enc"), "non-finite", "proj.weight")
    assert inspect(tmp_path, capsys, PRESET, "--pretrained", str(tmp_path / "enc" / "model.safetensors")) == 2
    one_line(capsys, "model.safetensors", "proj.weight")
    with pytest.raises(CheckpointError, match="proj.weight"):
        mllm_sparse.SparseFormerModel.from_pretrained(tmp_path / "enc")


def test_inspect_a_folder_that_is_not_an_encoder(tmp_path, capsys, btsp_model):
    (tmp_path / "empty").mkdir()
    assert inspect(tmp_path, capsys, str(tmp_path / "empty")) == 2
    one_line(capsys, str(tmp_path / "empty"), "no config.json")
    LlamaConfig(hidden_size=32, num_hidden_layers=1).save_pretrained(tmp_path / "llm")
    assert inspect(tmp_path, capsys, str(tmp_path / "llm")) == 2
    one_line(capsys, str(tmp_path / "llm"), "model_type 'llama'", "'sparseformer'")
    btsp_model.config.save_pretrained(tmp_path / "config-only")
    assert inspect(tmp_path, capsys, str(tmp_path / "config-only")) == 2
    one_line(capsys, str(tmp_path / "config-only"), "no weights file")
    (tmp_path / "bad-config").mkdir()
    (tmp_path / "bad-config" / "config.json").write_text('{"model_type": ')
    assert inspect(tmp_path, capsys, str(tmp_path / "bad-config")) == 2
    one_line(capsys, str(tmp_path / "bad-config" / "config.json"), "Malformed JSON")


def test_sharded_folder_with_a_missing_shard_names_it(tmp_path, capsys, btsp_model):
    btsp_model.save_pretrained(tmp_path / "enc", max_shard_size="200KB")
    index = json.loads((tmp_path / "enc" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / "enc" / shard).unlink()
    assert inspect(tmp_path, capsys, str(tmp_path / "enc")) == 2
    one_line(capsys, shard, "missing")


def test_inspect_bad_image_size_and_out(tmp_path, capsys):
    for size in ("-5", "0"):
        assert inspect(tmp_path, capsys, PRESET, "--image-size", size) == 2
        one_line(capsys, f"--image-size must be a positive number of pixels, got {size}")
    assert run(capsys, "inspect", PRESET, "--out", str(tmp_path)) == 2
    one_line(capsys, "is a directory")
