"""Damaged weights and bad input at every LLaVA load path (eval-vlm / chat, projectors, build-vlm, merge-lora; swap:
test_vlm.py):
one line through the CLI naming the file; model folders written in one step, also under a real kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_files import one_line, poison, run, truncate
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_vlm import save_tiny_vlm, tiny_llm, tiny_vlm
from transformers import AutoProcessor, LlavaForConditionalGeneration

import mllm_sparse
from llava_adapter.chat import ChatEngine
from llava_adapter.data import LlavaJsonDataset
from llava_adapter.modeling import (
    PROJECTOR_PREFIX,
    load_projector,
    model_folder,
    projector_state_dict,
    read_projector,
    save_projector,
)
from llava_adapter.train import NON_LORA_FILE
from mllm_sparse.checkpoint import CheckpointError

PROJECTOR_KEY = "multi_modal_projector.linear_1.weight"


@pytest.fixture(scope="module")
def vlm_dir(tokenizer, tmp_path_factory) -> Path:
    return save_tiny_vlm(tokenizer, tmp_path_factory.mktemp("vlm"))


@pytest.fixture
def vlm_copy(vlm_dir, tmp_path) -> Path:
    return Path(shutil.copytree(vlm_dir, tmp_path / "vlm"))


@pytest.fixture
def encoder_dir(tmp_path) -> Path:
    mllm_sparse.create_model("test_sparseformer_btsp").save_pretrained(tmp_path / "encoder")
    return tmp_path / "encoder"


@pytest.fixture
def llm_dir(tokenizer, tmp_path) -> Path:
    folder = tmp_path / "llm"
    tiny_llm(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def text_data(write_data, text_record) -> Path:
    return write_data([text_record("t0")], "text.json")


def eval_vlm(capsys, model: Path, data: Path, *extra: str) -> int:
    return run(capsys, "eval-vlm", "--model", str(model), "--data", str(data), "--no-progress", *extra)


# ------------------------------------------------------------------------------------------- eval-vlm, chat, demo


def test_eval_vlm_truncated_model_names_the_file(vlm_copy, text_data, capsys):
    truncate(vlm_copy / "model.safetensors")
    assert eval_vlm(capsys, vlm_copy, text_data) == 2
    one_line(capsys, str(vlm_copy / "model.safetensors"), "truncated")


def test_vlm_with_nan_weights_is_refused_by_name(vlm_copy, text_data, capsys):
    poison(vlm_copy / "model.safetensors", PROJECTOR_KEY)
    assert eval_vlm(capsys, vlm_copy, text_data) == 2
    one_line(capsys, str(vlm_copy), "non-finite", PROJECTOR_KEY)
    with pytest.raises(CheckpointError, match=PROJECTOR_KEY):  # chat and the demo load through the same path
        ChatEngine.from_pretrained(vlm_copy, device="cpu")


def test_eval_vlm_on_a_folder_that_is_not_llava(vlm_copy, encoder_dir, text_data, capsys):
    for name in ("config.json", "model.safetensors"):  # an encoder's files where the VLM's should be
        shutil.copy(encoder_dir / name, vlm_copy / name)
    assert eval_vlm(capsys, vlm_copy, text_data) == 2
    one_line(capsys, str(vlm_copy), "model_type 'sparseformer'", "'llava'")


@pytest.mark.parametrize("name", ["tokenizer.json", "processor_config.json"])
def test_eval_vlm_truncated_processor_file_names_the_folder(vlm_copy, text_data, capsys, name):
    truncate(vlm_copy / name)
    assert eval_vlm(capsys, vlm_copy, text_data) == 2
    one_line(capsys, str(vlm_copy), "processor")


def test_eval_vlm_out_is_a_file(vlm_dir, text_data, tmp_path, capsys):
    (tmp_path / "report.json").write_text("{}")
    assert eval_vlm(capsys, vlm_dir, text_data, "--out", str(tmp_path / "report.json")) == 2
    one_line(capsys, "report.json is a file")


def _records(image_record, text_record) -> list[dict]:
    return [image_record("r1", "a.png"), image_record("r2", "corrupt.png"), text_record("r3")]


def test_eval_vlm_skip_bad_records_keeps_the_other_answers(
    vlm_dir, image_folder, image_record, text_record, write_data, tmp_path, capsys
):
    records = _records(image_record, text_record) + [image_record("r4", "no-such.png")]
    data = write_data(records, "bad.json")
    out = tmp_path / "report"
    args = ("--image_folder", str(image_folder), "--max-new-tokens", "2", "--out", str(out))
    assert eval_vlm(capsys, vlm_dir, data, *args, "--skip-bad-records") == 0
    report = json.loads((out / "eval_vlm.json").read_text())
    assert [row["id"] for row in report["predictions"]] == ["r1", "r3"]
    assert report["num_answers"] == 2 and all(row["prediction"] is not None for row in report["predictions"])
    skipped = {row["id"]: row for row in report["skipped"]}
    assert skipped.keys() == {"r2", "r4"}
    assert skipped["r2"]["turn"] == 1 and "corrupt.png" in skipped["r2"]["error"]
    assert skipped["r4"]["turn"] is None and "no-such.png" in skipped["r4"]["error"]
    assert "2 skipped" in (out / "eval_vlm.md").read_text()
    # Without the flag: one line naming the record and the image (the decode error comes at its batch).
    assert eval_vlm(capsys, vlm_dir, write_data(records[:3], "corrupt.json"), *args) == 2
    one_line(capsys, "'r2'", "corrupt.png", "--skip-bad-records")


def test_eval_vlm_directory_as_image(vlm_dir, image_folder, image_record, write_data, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    shutil.copy(image_folder / "a.png", tmp_path / "images" / "a.png")
    (tmp_path / "images" / "dir.png").mkdir()
    data = write_data([image_record("r1", "a.png"), image_record("r2", "dir.png")], "dir.json")
    assert eval_vlm(capsys, vlm_dir, data, "--image_folder", str(tmp_path / "images")) == 2
    one_line(capsys, "'r2'", "dir.png is a directory, not an image")


# -------------------------------------------------------------------------------------------------- projectors


def test_projector_files_that_cannot_be_used_are_named(tokenizer, tmp_path):
    model, _ = tiny_vlm(tokenizer)
    path = save_projector(projector_state_dict(model), model.config, tmp_path)
    state = load_file(str(path))
    truncate(path)
    for load in (read_projector, lambda p: load_projector(model, p)):
        with pytest.raises(CheckpointError, match=f"{path}.*truncated"):
            load(path)
    # An all-NaN projector (what a diverged stage 1 saved) is refused by tensor name, the model left as it was.
    nan = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
    save_file(nan, str(tmp_path / "nan.safetensors"))
    before = projector_state_dict(model)
    with pytest.raises(CheckpointError, match=r"nan\.safetensors: non-finite .*linear_1\.weight"):
        load_projector(model, tmp_path / "nan.safetensors")
    for key, value in projector_state_dict(model).items():
        torch.testing.assert_close(value, before[key])
    torch.save([1, 2, 3], tmp_path / "list.bin")  # a pickle of the wrong thing
    with pytest.raises(CheckpointError, match="list.bin does not hold a state_dict of tensors"):
        read_projector(tmp_path / "list.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="junk.bin"):
        read_projector(tmp_path / "junk.bin")
    with pytest.raises(CheckpointError, match="is a directory"):
        read_projector(tmp_path)


# --------------------------------------------------------------------------------------------------- build-vlm


def test_llava_projector_bin_lands_key_by_key(tokenizer, tmp_path):
    """haotian-liu/LLaVA's stage-1 `mm_projector.bin` (`model.mm_projector.{0,2}.*`, a pickle) loads each tensor into
    its own linear; a LLaVA-1 single-linear file is refused as such, not as unknown keys."""
    model, _ = tiny_vlm(tokenizer)
    torch.manual_seed(1)
    theirs = {
        "model.mm_projector.0.weight": torch.randn_like(model.model.multi_modal_projector.linear_1.weight),
        "model.mm_projector.0.bias": torch.randn_like(model.model.multi_modal_projector.linear_1.bias),
        "model.mm_projector.2.weight": torch.randn_like(model.model.multi_modal_projector.linear_2.weight),
        "model.mm_projector.2.bias": torch.randn_like(model.model.multi_modal_projector.linear_2.bias),
    }
    torch.save(theirs, tmp_path / "mm_projector.bin")
    read = read_projector(tmp_path / "mm_projector.bin")
    assert read.keys() == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    for ours, key in [("linear_1", "0"), ("linear_2", "2")]:
        for kind in ("weight", "bias"):
            assert torch.equal(read[f"{ours}.{kind}"], theirs[f"model.mm_projector.{key}.{kind}"])
    load_projector(model, tmp_path / "mm_projector.bin")
    for name, value in model.model.multi_modal_projector.state_dict().items():
        assert torch.equal(value, read[name])
    single = {"model.mm_projector.weight": theirs["model.mm_projector.0.weight"], "model.mm_projector.bias": theirs[
        "model.mm_projector.0.bias"]}  # fmt: skip
    torch.save(single, tmp_path / "llava1.bin")
    with pytest.raises(ValueError, match="llava1.bin: a single-linear LLaVA-1 projector"):
        read_projector(tmp_path / "llava1.bin")


def test_build_vlm_damaged_encoder_or_llm_is_one_line(encoder_dir, llm_dir, tmp_path, capsys):
    good = ("--encoder", str(encoder_dir), "--llm", str(llm_dir), "--out", str(tmp_path / "vlm"))
    assert run(capsys, "build-vlm", *good) == 0
    original = encoder_dir / "model.safetensors"
    backup = original.read_bytes()
    truncate(original)
    assert run(capsys, "build-vlm", *good) == 2
    one_line(capsys, str(original), "truncated")
    original.write_bytes(backup)
    poison(original, "proj.weight")
    assert run(capsys, "build-vlm", *good) == 2
    one_line(capsys, str(encoder_dir), "proj.weight")
    original.write_bytes(backup)
    (tmp_path / "empty").mkdir()
    assert run(capsys, "build-vlm", "--encoder", str(tmp_path / "empty"), *good[2:]) == 2
    one_line(capsys, str(tmp_path / "empty"), "no config.json")
    truncate(llm_dir / "model.safetensors")
    assert run(capsys, "build-vlm", *good) == 2
    one_line(capsys, str(llm_dir / "model.safetensors"), "truncated")


# ------------------------------------------------------------------------------------------------- merge-lora


@pytest.fixture
def lora_run(vlm_dir, tmp_path) -> Path:
    """A LoRA training run's output folder, as `scripts/train_vlm.py --lora_enable True` leaves it."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path / "lora"
    base = LlavaForConditionalGeneration.from_pretrained(vlm_dir)
    extra = {k: v.detach() + 0.01 for k, v in base.named_parameters() if ".multi_modal_projector." in k}
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(out)
    save_file(extra, str(out / NON_LORA_FILE))
    (out / "lora_base.json").write_text(json.dumps({"base": str(vlm_dir)}))
    AutoProcessor.from_pretrained(vlm_dir).save_pretrained(out)
    return out


def test_merge_lora_damaged_inputs_are_one_line(lora_run, vlm_copy, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert run(capsys, "merge-lora", "--adapter", str(lora_run), "--out", str(merged)) == 0
    assert (merged / "model.safetensors").is_file() and (merged / "processor_config.json").is_file()

    def merge() -> int:
        return run(capsys, "merge-lora", "--adapter", str(lora_run), "--out", str(tmp_path / "merged-2"))

    adapter = lora_run / "adapter_model.safetensors"
    backup = adapter.read_bytes()
    truncate(adapter)
    assert merge() == 2
    one_line(capsys, str(adapter), "truncated")
    adapter.write_bytes(backup)
    key = next(k for k in load_file(str(adapter)) if "lora_A" in k)
    poison(adapter, key)
    assert merge() == 2
    one_line(capsys, str(adapter), key)
    adapter.write_bytes(backup)

    extra = lora_run / NON_LORA_FILE
    backup = extra.read_bytes()
    truncate(extra)
    assert merge() == 2
    one_line(capsys, str(extra), "truncated")
    save_file({"model.no_such.weight": torch.zeros(2)}, str(extra))
    assert merge() == 2
    one_line(capsys, str(extra), "model.no_such.weight")
    extra.write_bytes(backup)

    (lora_run / "lora_base.json").write_text(json.dumps({"base": str(vlm_copy)}))
    truncate(vlm_copy / "model.safetensors")
    assert merge() == 2
    one_line(capsys, str(vlm_copy / "model.safetensors"), "truncated")
    (lora_run / "lora_base.json").write_text('["not", "an", "object"]')
    assert merge() == 2
    one_line(capsys, "lora_base.json")
    assert not (tmp_path / "merged-2").exists()


# --------------------------------------------------------------------------------------------- atomic folders


def test_model_folder_is_all_or_nothing(tmp_path):
    out = tmp_path / "vlm"
    with pytest.raises(RuntimeError), model_folder(out) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")
    assert not out.exists() and not list(tmp_path.iterdir())
    with model_folder(out) as tmp:
        (tmp / "config.json").write_text('{"v": 1}')
    with pytest.raises(RuntimeError), model_folder(out) as tmp:
        (tmp / "config.json").write_text('{"v": 2}')
        raise RuntimeError("killed mid-write")
    assert json.loads((out / "config.json").read_text()) == {"v": 1}
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("a user's own files")
    with pytest.raises(ValueError, match="not a model folder"), model_folder(tmp_path / "work"):
        pass
    assert (tmp_path / "work" / "notes.txt").read_text() == "a user's own files"


def test_build_vlm_killed_mid_write_leaves_the_previous_model(encoder_dir, llm_dir, tmp_path, capsys):
    out = tmp_path / "vlm"
    args = ["build-vlm", "--encoder", str(encoder_dir), "--llm", str(llm_dir), "--out", str(out)]
    assert run(capsys, *args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    saved = tmp_path / "saved"
    # A second build (other seed, other weights) that is killed after the model is written, before the processor.
    script = textwrap.dedent(f"""
        import sys, time
        import transformers
        from mllm_sparse_recipes.cli import main

        save = transformers.PreTrainedModel.save_pretrained

        def slow_save(self, *args, **kwargs):
            save(self, *args, **kwargs)
            open({str(saved)!r}, "w").close()
            time.sleep(120)

        transformers.PreTrainedModel.save_pretrained = slow_save
        sys.exit(main({[*args, "--seed", "1"]!r}))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 120
        while not saved.exists():
            assert process.poll() is None, "build-vlm ended before it was killed"
            assert time.monotonic() < deadline, "build-vlm never reached its save"
            time.sleep(0.1)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    engine = ChatEngine.from_pretrained(out, device="cpu")
    assert engine.num_image_tokens == 15


# ------------------------------------------------------------------------------------------ images in datasets


def test_16_bit_image_in_a_llava_dataset_matches_its_8_bit_version(
    write_data, tmp_path, tokenizer, image_processor, image_record
):
    wide = np.round(np.linspace(0, 65535, 40 * 48)).astype(np.uint16).reshape(40, 48)
    Image.fromarray(wide).save(tmp_path / "g16.png")
    Image.fromarray(np.round(wide / 257).astype(np.uint8)).save(tmp_path / "g8.png")
    (tmp_path / "folder.png").mkdir()
    data = write_data([image_record("w", "g16.png"), image_record("n", "g8.png")])
    dataset = LlavaJsonDataset(data, tmp_path, tokenizer, image_processor, "vicuna_v1", 16, 512)
    torch.testing.assert_close(dataset[0]["pixel_values"], dataset[1]["pixel_values"])
    from llava_adapter.conversation import RecordError

    with pytest.raises(RecordError, match="'d'.*folder.png is a directory, not an image"):
        LlavaJsonDataset(
            write_data([image_record("d", "folder.png")]), tmp_path, tokenizer, image_processor, "vicuna_v1", 16, 512
        )


# ------------------------------------------------------------------------------------------- strict loading


def test_projector_file_missing_keys_or_with_an_extra_key_is_refused_by_name(tokenizer, tmp_path):
    model, _ = tiny_vlm(tokenizer)
    state = projector_state_dict(model)
    before = {k: v.clone() for k, v in state.items()}
    partial = {k: v for k, v in state.items() if ".linear_1." in k}  # linear_2 absent
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"partial\.safetensors: projector keys .* do not match") as err:
        load_projector(model, tmp_path / "partial.safetensors")
    assert "linear_2.weight" in str(err.value) and "linear_2.bias" in str(err.value)
    # under the projector prefix, so the file reads as a projector and only the key check can refuse it
    extra = {**{k: v + 1 for k, v in state.items()}, PROJECTOR_PREFIX + "linear_3.weight": torch.zeros(2, 2)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"extra\.safetensors: .*linear_3\.weight"):
        load_projector(model, tmp_path / "extra.safetensors")
    save_file(state, str(tmp_path / "good.safetensors"))
    load_projector(model, tmp_path / "good.safetensors")  # the right keys and shapes load
    misshapen = {**state, next(iter(state)): torch.zeros(3, 3)}  # every key right, one shape wrong
    save_file(misshapen, str(tmp_path / "misshapen.safetensors"))
    with pytest.raises(ValueError, match=r"misshapen\.safetensors: projector shape mismatch"):
        load_projector(model, tmp_path / "misshapen.safetensors")
    for key, value in projector_state_dict(model).items():  # no file changed the model
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


@pytest.mark.parametrize("side", ["extra", "missing"])
def test_a_full_checkpoint_with_an_extra_or_a_missing_key_is_refused_by_name(tokenizer, tmp_path, side):
    """Resume's full-weight load (`checkpoints.load_full_weights`) is strict from both sides."""
    from llava_adapter.checkpoints import load_full_weights

    model, _ = tiny_vlm(tokenizer)
    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(str(path))
    load_full_weights(model, tmp_path / "ckpt")  # the checkpoint as saved loads
    key = next(k for k in state if k.endswith("multi_modal_projector.linear_2.bias"))
    if side == "extra":
        state["model.no_such_module.weight"] = torch.zeros(2)
        named = "model.no_such_module.weight"
    else:
        del state[key]
        named = "multi_modal_projector.linear_2.bias"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=rf"ckpt: weights do not match the model \(.*{named}"):
        load_full_weights(model, tmp_path / "ckpt")


HUB_KERNELS_PROBE = """
import sys, tempfile
import llava_adapter  # noqa: F401
from transformers import LlamaConfig, LlamaForCausalLM

folder = tempfile.mkdtemp()
config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
LlamaForCausalLM(config).save_pretrained(folder)
model = LlamaForCausalLM.from_pretrained(folder)
model.train()
print(model.use_kernels)
"""


@pytest.mark.parametrize(("setting", "kernelized"), [(None, "False"), ("1", "True")])
def test_models_keep_pytorch_ops_unless_hub_kernels_are_asked_for(setting, kernelized):
    """transformers kernelizes every `from_pretrained` model by default, which on a GPU fetches code from the Hub
    (and fails offline); importing the project turns that off, and a user's USE_HUB_KERNELS=1 still turns it on."""
    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    if setting is not None:
        env["USE_HUB_KERNELS"] = setting
    result = subprocess.run(
        [sys.executable, "-c", HUB_KERNELS_PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == kernelized
