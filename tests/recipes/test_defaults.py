"""The recipe's settings: the typed arguments the recipes hand to `llava_adapter.train.run` are exactly what
`scripts/train_vlm.py` made of the command line the recipes used to pass, so runs recorded before resume unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_adapter import train
from mllm_sparse_recipes import defaults


def command_line(start, out, train_data, image_folder, epochs, lr, projector_lr, *, batch_size, seed, max_length):
    """The `scripts/train_vlm.py` arguments the recipes passed before they called `train.run` with typed arguments."""
    return [
        "--model_name_or_path", str(start), "--data_path", str(train_data), "--image_folder", str(image_folder),
        "--version", defaults.TEMPLATE, "--output_dir", str(out),
        "--num_train_epochs", str(epochs), "--per_device_train_batch_size", str(batch_size),
        "--learning_rate", str(lr), "--mm_projector_lr", str(projector_lr), "--lr_scheduler_type", "cosine",
        "--warmup_steps", "0.03", "--weight_decay", "0.0", "--logging_steps", "50",
        "--save_strategy", "steps", "--save_steps", "0.1", "--save_total_limit", "1",
        "--report_to", "none", "--seed", str(seed), "--model_max_length", str(max_length),
        "--dataloader_num_workers", "0", "--group_by_modality_length", "True",
    ]  # fmt: skip


# (epochs, lr, projector_lr, batch size, seed, max length): quickstart's two stages, an ablation arm's, odd numbers
CASES = [
    (2.0, 0.0, defaults.STAGE1_PROJECTOR_LR, defaults.VLM_BATCH_SIZE, 0, 512),
    (0.25, defaults.STAGE2_LR, defaults.STAGE2_LR, defaults.VLM_BATCH_SIZE, 3, 512),
    (1.0, 0.0, 2e-3, 8, 0, 2048),
    (1, 1e-5, 3e-4, 2, 7, 128),
]


@pytest.mark.parametrize("case", CASES)
def test_the_typed_training_arguments_equal_the_parsed_command_line(case, tmp_path):
    epochs, lr, projector_lr, batch_size, seed, max_length = case
    paths = (tmp_path / "vlm", tmp_path / "stage1", tmp_path / "world" / "llava_train.json", tmp_path / "world")
    typed = defaults.train_vlm_settings(*paths, epochs, lr, projector_lr, batch_size=batch_size, seed=seed,
                                        model_max_length=max_length)  # fmt: skip
    parsed = train.parse_args(command_line(*paths, epochs, lr, projector_lr, batch_size=batch_size, seed=seed,
                                           max_length=max_length))  # fmt: skip
    for mine, theirs in zip(typed, parsed, strict=True):
        assert type(mine) is type(theirs) and mine == theirs
    training = typed[2]
    assert training.warmup_steps == 0.03 and training.save_steps == 0.1 and training.report_to == parsed[2].report_to
    # what train_settings.json records, which decides whether a rerun resumes or is refused
    assert train.run_settings(*typed) == train.run_settings(*parsed)


def test_extra_arguments_override_as_on_the_command_line(tmp_path):
    """The ablation's --train-args: given after the recipe's arguments, they win."""
    extra = ["--gradient_checkpointing", "True", "--logging_steps", "5", "--lr_scheduler_type", "linear",
             "--use_cpu", "--mm_vision_select_layer", "-2", "--image_aspect_ratio", "resize"]  # fmt: skip
    paths = (tmp_path / "a", tmp_path / "b", tmp_path / "c.json", tmp_path)
    typed = defaults.train_vlm_settings(*paths, 1.0, 2e-4, 2e-4, overrides=train.parse_overrides(extra))
    parsed = train.parse_args(
        command_line(*paths, 1.0, 2e-4, 2e-4, batch_size=defaults.VLM_BATCH_SIZE, seed=0, max_length=512) + extra
    )
    assert typed == parsed and typed[2].logging_steps == 5 and typed[1].image_aspect_ratio == "resize"
    assert train.parse_overrides([]) == {}
    with pytest.raises(ValueError, match=r"not used by the HfArgumentParser: \['--no_such_flag', '1'\]"):
        train.parse_overrides(["--no_such_flag", "1"])


def test_typed_arguments_are_checked_as_the_command_line_is(tmp_path):
    paths = (tmp_path / "a", tmp_path / "b", tmp_path / "c.json", Path(tmp_path))
    both_stages = {"tune_mm_mlp_adapter": True, "lora_enable": True}
    with pytest.raises(ValueError, match="exclude each other"):
        defaults.train_vlm_settings(*paths, 1.0, 1e-4, 1e-4, overrides=both_stages)
    with pytest.raises(ValueError, match="nothing would train"):
        defaults.train_vlm_settings(*paths, 1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="not training arguments: no_such_field"):
        defaults.train_vlm_settings(*paths, 1.0, 1e-4, 1e-4, overrides={"no_such_field": 1})
