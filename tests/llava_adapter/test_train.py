"""Training: freeze policy, stage-1 and LoRA outputs, LoRA merge equivalence, and real DeepSpeed launches
(2 CPU ranks, gloo) for stage 1 under ZeRO-2 and stage 2 (LoRA) under ZeRO-3."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from cli_process import communicate_or_kill
from peft import PeftModel
from safetensors.torch import load_file
from tiny_vlm import allreduce_buffers_left, common_args, deepspeed_launcher, free_port, save_tiny_vlm
from transformers import AutoModelForImageTextToText, AutoProcessor

from llava_adapter import train
from llava_adapter.merge_lora import merge_lora
from llava_adapter.modeling import PROJECTOR_FILE, projector_state_dict

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def vlm_dir(tokenizer, tmp_path):
    return save_tiny_vlm(tokenizer, tmp_path / "vlm")


@pytest.fixture
def data(image_folder, image_record, text_record, write_data):
    records = [image_record(f"img-{i}", image="abc"[i % 3] + ".png") for i in range(6)] + [text_record("txt-0")]
    return write_data(records)


def test_freeze_policy(vlm_dir):
    model = AutoModelForImageTextToText.from_pretrained(vlm_dir)
    args = train.VlmTrainingArguments(output_dir="unused", tune_mm_mlp_adapter=True, report_to="none")
    train.set_trainable(model, args)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".multi_modal_projector." in n for n in trainable)
    args = train.VlmTrainingArguments(output_dir="unused", tune_vision_last_k=1, report_to="none")
    train.set_trainable(model, args)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    last = len(model.model.vision_tower.layers) - 1
    assert any(n.startswith("model.language_model.") for n in trainable)
    assert {n.split(".")[3] for n in trainable if ".vision_tower." in n} == {str(last)}


def test_zero_learning_rate_trains_the_projector_alone_into_a_full_model(vlm_dir, data, image_folder, tmp_path):
    """`--learning_rate 0 --mm_projector_lr X`: the LLM is frozen (not merely stepped at a zero rate) and the output is
    a full model whose projector moved and whose LLM did not."""
    model = AutoModelForImageTextToText.from_pretrained(vlm_dir)
    args = train.VlmTrainingArguments(output_dir="unused", learning_rate=0.0, mm_projector_lr=1e-2, report_to="none")
    train.set_trainable(model, args)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".multi_modal_projector." in n
    }
    out = tmp_path / "frozen_llm"
    extra = ["--version", "chat_template", "--learning_rate", "0", "--mm_projector_lr", "1e-2", "--use_cpu", "True"]
    assert train.main(common_args(vlm_dir, data, image_folder, out, *extra)) == 0
    assert AutoProcessor.from_pretrained(out).conversation_template == "chat_template"  # how to prompt it
    before = AutoModelForImageTextToText.from_pretrained(vlm_dir).state_dict()
    after = AutoModelForImageTextToText.from_pretrained(out).state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(".multi_modal_projector." in k for k in moved)
    for bad, message in [
        (["--learning_rate", "0"], "nothing would train"),
        (["--learning_rate", "0", "--mm_projector_lr", "1e-2", "--lora_enable", "True"], "LoRA adapters would never"),
    ]:
        with pytest.raises(ValueError, match=message):
            train.main(common_args(vlm_dir, data, image_folder, tmp_path / "bad", "--version", "vicuna_v1", *bad))


def test_stage1_trains_only_the_projector_and_saves_it_alone(vlm_dir, data, image_folder, tmp_path):
    out = tmp_path / "stage1"
    args = ["--tune_mm_mlp_adapter", "True", "--version", "plain", "--learning_rate", "1e-2", "--use_cpu", "True"]
    plain = json.loads(Path(data).read_text())[:6]  # plain (stage 1) takes caption-style single-turn image records
    Path(data).write_text(json.dumps(plain))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train.main(common_args(vlm_dir, data, image_folder, out, *args)) == 0
    assert not [w for w in caught if "pin_memory" in str(w.message)]  # nothing to pin on a CPU: no warning for it
    assert sorted(
        p.name for p in out.iterdir() if not p.name.startswith(("training_args", "README", "train_settings"))
    ) == [PROJECTOR_FILE]
    trained = load_file(str(out / PROJECTOR_FILE))
    before = projector_state_dict(AutoModelForImageTextToText.from_pretrained(vlm_dir))
    assert trained.keys() == before.keys()
    assert any(not torch.equal(trained[k], before[k]) for k in trained)


def test_stage1_leaves_text_only_records_out(
    vlm_dir, image_folder, image_record, text_record, write_data, tmp_path, caplog
):
    """Only the projector trains in stage 1, so a batch of text-only records has no gradient at all (backward
    fails on it): such records are left out, and the log says how many."""
    records = [image_record("img-0", image="a.png"), text_record("txt-0"), text_record("txt-1")]
    data = write_data(records + [image_record("img-1", image="b.png")])
    args = common_args(vlm_dir, data, image_folder, tmp_path / "stage1", "--tune_mm_mlp_adapter", "True")
    args += ["--version", "vicuna_v1", "--learning_rate", "1e-2", "--use_cpu", "True"]
    args[args.index("--per_device_train_batch_size") + 1] = "1"  # each record a batch of its own
    args[args.index("--max_steps") + 1] = "4"
    with caplog.at_level(logging.WARNING):
        assert train.main(args) == 0
    assert "2 text-only records left out" in caplog.text


def test_a_typed_run_trains_what_the_command_line_trains(vlm_dir, data, image_folder, tmp_path):
    """`train.run` with the argument groups built in code: the same projector as `main` with the same arguments on
    the command line, the same settings recorded, and the same refusal of a folder holding a finished run."""
    extra = ["--version", "vicuna_v1", "--tune_mm_mlp_adapter", "True", "--learning_rate", "1e-2", "--use_cpu", "True"]
    assert train.main(common_args(vlm_dir, data, image_folder, tmp_path / "argv", *extra)) == 0
    values = {
        "model_name_or_path": str(vlm_dir), "data_path": str(data), "image_folder": str(image_folder),
        "output_dir": str(tmp_path / "typed"), "per_device_train_batch_size": 2, "max_steps": 2, "report_to": "none",
        "save_strategy": "no", "logging_steps": 1.0, "model_max_length": 128, "dataloader_num_workers": 0,
        "version": "vicuna_v1", "tune_mm_mlp_adapter": True, "learning_rate": 1e-2, "use_cpu": True,
    }  # fmt: skip
    train.run(*train.arguments(values))
    argv, typed = (load_file(str(tmp_path / name / PROJECTOR_FILE)) for name in ("argv", "typed"))
    assert argv.keys() == typed.keys() and all(torch.equal(argv[k], typed[k]) for k in argv)
    recorded = [json.loads((tmp_path / name / "train_settings.json").read_text()) for name in ("argv", "typed")]
    paths = ("output_dir", "logging_dir")
    assert [{k: v for k, v in r.items() if k not in paths} for r in recorded][0] == {
        k: v for k, v in recorded[1].items() if k not in paths
    }
    with pytest.raises(ValueError, match="holds a finished run"):
        train.run(*train.arguments({**values, "output_dir": str(tmp_path / "argv")}))


def test_lora_save_reload_and_merge_give_the_same_logits(vlm_dir, data, image_folder, tmp_path, tokenizer):
    out = tmp_path / "lora"
    args = ["--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "5e-2"]
    assert train.main(common_args(vlm_dir, data, image_folder, out, "--use_cpu", "True", *args)) == 0
    assert json.loads((out / "lora_base.json").read_text())["base"] == str(vlm_dir)
    non_lora = load_file(str(out / train.NON_LORA_FILE))
    assert non_lora and all(".multi_modal_projector." in k for k in non_lora)

    base = AutoModelForImageTextToText.from_pretrained(vlm_dir).eval()
    base.load_state_dict(non_lora, strict=False)
    reloaded = PeftModel.from_pretrained(base, str(out)).eval()
    lora_b = [p for n, p in reloaded.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the adapter learned something, so the check below has teeth
    merged_dir = tmp_path / "merged"
    merge_lora(out, merged_dir)
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()

    from PIL import Image

    processor = AutoProcessor.from_pretrained(merged_dir)
    assert processor.conversation_template == "vicuna_v1"  # the adapter's training template survives the merge
    batch = processor(images=[Image.open(image_folder / "a.png")], text=["<image>\nWhat colour?"], return_tensors="pt")
    with torch.no_grad():
        plain_base = AutoModelForImageTextToText.from_pretrained(vlm_dir).eval()(**batch).logits
        adapted = reloaded(**batch).logits
        folded = merged(**batch).logits
    torch.testing.assert_close(folded, adapted, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain_base, adapted, atol=1e-4)


def deepspeed_launch(script_args: list[str], timeout: int = 600) -> str:
    """Run `scripts/train_vlm.py` under `deepspeed` on 2 CPU ranks to its end; its output. A launch that overruns
    `timeout` is killed with its ranks (their own process group), and the run leaves no buffer in /dev/shm."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    port = free_port()
    process = subprocess.Popen(
        deepspeed_launcher(port) + script_args,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output = communicate_or_kill(process, timeout)
    assert process.returncode == 0, output[-6000:]
    assert allreduce_buffers_left(port) == []
    return output


@pytest.mark.deepspeed
def test_deepspeed_stage1_zero2_then_stage2_lora_zero3(vlm_dir, data, image_folder, tmp_path):
    stage1 = tmp_path / "stage1"
    plain = json.loads(Path(data).read_text())[:6]
    plain_data = tmp_path / "plain.json"
    plain_data.write_text(json.dumps(plain))
    deepspeed_launch(
        common_args(vlm_dir, plain_data, image_folder, stage1, "--deepspeed", "scripts/zero2.json")
        + ["--tune_mm_mlp_adapter", "True", "--version", "plain", "--learning_rate", "1e-2"]
    )
    projector = load_file(str(stage1 / PROJECTOR_FILE))
    before = projector_state_dict(AutoModelForImageTextToText.from_pretrained(vlm_dir))
    assert any(not torch.equal(projector[k], before[k]) for k in projector)

    # Stage 2 loads the stage-1 projector into a ZeRO-3-partitioned model (LLaVA's "size mismatch
    # torch.Size([0])" case), trains LoRA + projector on both ranks and saves gathered (non-empty) weights.
    stage2 = tmp_path / "stage2"
    deepspeed_launch(
        common_args(vlm_dir, data, image_folder, stage2, "--deepspeed", "scripts/zero3.json")
        + ["--pretrain_mm_mlp_adapter", str(stage1 / PROJECTOR_FILE), "--lora_enable", "True", "--lora_r", "4"]
        + ["--lora_alpha", "8", "--learning_rate", "1e-2", "--mm_projector_lr", "1e-5", "--version", "vicuna_v1"]
    )
    adapter = load_file(str(stage2 / "adapter_model.safetensors"))
    assert adapter and all(v.numel() > 0 and v.ndim == 2 for v in adapter.values())
    non_lora = load_file(str(stage2 / train.NON_LORA_FILE))
    assert set(non_lora) == set(projector)
    # Stage 2 started from the stage-1 projector on every rank: two steps at 1e-5 stay within 1e-4 of it, while the
    # untrained projector is stage 1's two steps at 1e-2 away.
    for key in projector:
        assert 0 < (non_lora[key] - projector[key]).abs().max() < 1e-4, key
        assert (before[key] - projector[key]).abs().max() > 1e-3, key
    merged = merge_lora(stage2, tmp_path / "merged")
    assert isinstance(merged, torch.nn.Module)


def test_gradient_accumulation_matches_one_batch(
    vlm_dir, image_folder, image_record, write_data, tmp_path, monkeypatch, one_thread
):
    """Global batch 4 as 1×4, 2×2 and 4×1 (micro-batch × accumulation): the same loss curve and projector. The answers
    differ in length, so a loss averaged per micro-batch instead of over the global batch's tokens shows."""
    answers = ["Red.", "A blue square on the left.", "Green.", "Two.", "A red circle.", "Yes.", "No.", "Three stars."]
    records = [image_record(f"r{i}", image="abc"[i % 3] + ".png", answer=a) for i, a in enumerate(answers)]
    data = write_data(records)
    losses: dict[int, list[float]] = {}
    original = train.save_outputs

    def recording(trainer, *args, **kwargs):
        steps = trainer.args.gradient_accumulation_steps
        losses[steps] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return original(trainer, *args, **kwargs)

    monkeypatch.setattr(train, "save_outputs", recording)
    projectors = {}
    for batch, steps in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"accum{steps}"
        extra = ["--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(steps)]
        extra += [
            "--tune_mm_mlp_adapter",
            "True",
            "--version",
            "vicuna_v1",
            "--learning_rate",
            "1e-2",
            "--use_cpu",
            "True",
        ]
        assert train.main(common_args(vlm_dir, data, image_folder, out, *extra)) == 0
        projectors[steps] = load_file(str(out / PROJECTOR_FILE))
    assert len(losses[1]) == 2
    for steps in (2, 4):
        assert losses[steps] == pytest.approx(losses[1], abs=1e-4)
        for key, value in projectors[1].items():
            torch.testing.assert_close(projectors[steps][key], value, atol=1e-5, rtol=1e-4, msg=f"{steps}: {key}")
