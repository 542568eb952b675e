"""Resuming LLaVA training safely: which checkpoint, with which settings, loaded how.

- A `checkpoint-N` folder counts only once every rank has finished writing it (`COMPLETE_MARKER`, written after a
  barrier); a folder a kill cut short is passed over with a message and the previous one is used.
- The run's settings are recorded in `OUT/train_settings.json`; resuming with a setting that changes the result is
  refused, naming each change, and changes that cannot (logging, saving, workers) are stated.
- Every `torch.load` in the process is weights-only (`TORCH_FORCE_WEIGHTS_ONLY_LOAD`), DeepSpeed's included, with an
  allow-list of the few plain classes DeepSpeed's checkpoints hold.
- Full-model weights are loaded back under the live model's key names (transformers saves LLaVA under its original
  layout, which the Trainer's own resume does not map back), strictly.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from mllm_sparse.checkpoint import CheckpointError, load_safetensors
from mllm_sparse.files import normal_modes, read_json, write_json

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
SETTINGS_FILE = "train_settings.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Settings that cannot change the trained weights: they may differ on resume (and are stated).
HARMLESS_SETTINGS = frozenset(
    {
        "output_dir", "logging_dir", "logging_steps", "logging_strategy", "logging_first_step",
        "logging_nan_inf_filter", "save_steps", "save_strategy", "save_total_limit", "save_on_each_node",
        "report_to", "run_name", "project", "trackio_space_id", "disable_tqdm", "resume_from_checkpoint",
        "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
        "dataloader_prefetch_factor", "overwrite_output_dir", "local_rank", "use_cpu", "eval_steps",
        "eval_strategy", "per_device_eval_batch_size", "push_to_hub", "hub_model_id", "hub_strategy",
        "hub_token", "hub_private_repo", "hub_always_push", "hub_revision", "ddp_timeout", "image_folder",
        "log_level", "log_level_replica", "log_on_each_node",
    }
)  # fmt: skip


def checkpoint_step(path: Path) -> int:
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else -1


def checkpoints(output_dir: Path) -> list[Path]:
    """OUT/checkpoint-N folders, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=checkpoint_step)


def mark_complete(checkpoint: Path) -> None:
    normal_modes(checkpoint)  # the Trainer's safetensors files are owner-only as written
    write_json(checkpoint / COMPLETE_MARKER, {"step": checkpoint_step(checkpoint)})


def damage(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it can."""
    if not (checkpoint / COMPLETE_MARKER).is_file():
        return "it was not finished (the run stopped while writing it)"
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        return f"its trainer_state.json cannot be read ({err})"
    return None


def latest_complete(output_dir: Path) -> Path | None:
    """The newest checkpoint that can be resumed from; newer damaged ones are reported and passed over."""
    for checkpoint in reversed(checkpoints(output_dir)):
        reason = damage(checkpoint)
        if reason is None:
            return checkpoint
        logger.warning("passing over %s: %s; trying the one before", checkpoint, reason)
    return None


def finished_outputs(output_dir: Path) -> list[str]:
    """Final outputs a finished run left in `output_dir`."""
    names = (
        "mm_projector.safetensors",
        "model.safetensors",
        "model.safetensors.index.json",
        "adapter_model.safetensors",
    )
    return [name for name in names if (output_dir / name).is_file()]


def clear_progress(output_dir: Path) -> None:
    """Remove the checkpoints and settings of an earlier run (`--overwrite_output_dir True`)."""
    for checkpoint in checkpoints(output_dir):
        shutil.rmtree(checkpoint)
    (output_dir / SETTINGS_FILE).unlink(missing_ok=True)


def resolve_resume(output_dir: Path, requested: str | None, overwrite: bool) -> Path | None:
    """The checkpoint to resume from, or None to start afresh.

    Args:
        requested: `--resume_from_checkpoint`: None (resume from the newest complete checkpoint, as LLaVA's
            `train.py` does), "true" (the same, but one must exist), or a checkpoint folder.
        overwrite: `--overwrite_output_dir`: start afresh, deleting the earlier run's checkpoints.
    """
    if overwrite:
        if requested is not None:
            raise ValueError("--overwrite_output_dir starts afresh; it excludes --resume_from_checkpoint")
        return None
    if requested is not None and requested.lower() not in ("true", "1", "yes"):
        path = Path(requested)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint: no checkpoint folder at {path}")
        if reason := damage(path):
            raise ValueError(f"--resume_from_checkpoint {path}: cannot resume from it: {reason}")
        return path
    found = latest_complete(output_dir)
    if found is None and requested is not None:
        raise FileNotFoundError(f"--resume_from_checkpoint True: no complete checkpoint in {output_dir}")
    if found is None and (done := finished_outputs(output_dir)):
        raise ValueError(
            f"{output_dir} holds a finished run ({', '.join(done)}); choose another --output_dir, or pass "
            "--overwrite_output_dir True to train again over it"
        )
    if found is None and checkpoints(output_dir):
        logger.warning("no complete checkpoint in %s: starting afresh", output_dir)
    return found


def check_settings(output_dir: Path, settings: dict, resuming: bool, write: bool = True) -> list[str]:
    """Record the run's settings (`write`: on the main rank only), or, when resuming, compare them with the recorded
    ones first.

    Returns the harmless changes (to be stated); raises ValueError naming every change that would alter the
    result of a resumed run.
    """
    path = output_dir / SETTINGS_FILE
    settings = json.loads(json.dumps(settings, default=str))
    if not resuming or not path.is_file():
        if write:
            write_json(path, settings)
        return []
    recorded = read_json(path)
    if recorded.get("budgets") and "budgets_per_step" not in recorded:
        recorded["budgets_per_step"] = 1  # recorded before there was a choice: one budget drawn per batch
    changes = {
        key: (recorded.get(key), settings.get(key))
        for key in sorted(set(recorded) | set(settings))
        if recorded.get(key) != settings.get(key)
    }
    refused = [f"--{k} {old!r} -> {new!r}" for k, (old, new) in changes.items() if k not in HARMLESS_SETTINGS]
    if refused:
        raise ValueError(
            f"resuming {output_dir} with changed settings ({'; '.join(refused)}): the result would be neither run's. "
            "Resume with the recorded settings (see train_settings.json), or choose another --output_dir"
        )
    if write:
        write_json(path, settings)
    return [f"--{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()]


def deepspeed_safe_globals() -> list:
    """The non-tensor classes in DeepSpeed's checkpoints, allowed by the weights-only unpickler; none where DeepSpeed
    is not installed (no run here wrote or reads a DeepSpeed checkpoint)."""
    if importlib.util.find_spec("deepspeed") is None:
        return []
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def force_weights_only_loads() -> None:
    """Make every `torch.load` in this process weights-only, also where a library asks for a full unpickle."""
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    torch.serialization.add_safe_globals(deepspeed_safe_globals())


def saved_key_names(model: nn.Module) -> dict[str, str]:
    """{key as `save_pretrained` writes it: the live model's key}, from transformers' own conversion table."""
    from transformers.core_model_loading import revert_weight_conversion

    live = {name: torch.empty(0) for name in model.state_dict()}
    # Each tensor is distinct, so the reverted dict maps back one to one.
    ids = {id(t): name for name, t in live.items()}
    return {saved: ids[id(t)] for saved, t in revert_weight_conversion(model, live).items()}


def load_full_weights(model: nn.Module, checkpoint: Path) -> None:
    """Load a full-model checkpoint (`model.safetensors`, or shards) into `model` under its live key names, strictly:
    a key the model lacks, or a weight it has that the checkpoint lacks (tied weights aside), is an error."""
    index = checkpoint / "model.safetensors.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_safetensors(checkpoint / name))
    names = saved_key_names(model)
    state = {names.get(k, k): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{checkpoint}: weights do not match the model (missing {missing[:10]}, unexpected "
            f"{sorted(result.unexpected_keys)[:10]})"
        )
