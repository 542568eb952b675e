"""Training-loop pieces shared by the bootstrap and scene pretraining: the schedule, the data order and resumable
checkpoints written atomically."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """`LambdaLR` factor: linear warm-up over `warmup` steps, then a cosine from 1 to 0 at step `total`."""

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return fn


def epoch_order(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of an epoch, a function of (seed, epoch) only, so a resumed run replays it exactly."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def latest_checkpoint(out: Path) -> Path | None:
    """The newest OUT/checkpoints/step_* folder, or None."""
    checkpoints = sorted((out / CHECKPOINTS).glob("step_*"))
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(out: Path, step: int, write_weights: Callable[[Path], None], trainer_state: dict) -> Path:
    """Write OUT/checkpoints/step_N atomically: into a temporary folder, then one rename.

    Args:
        write_weights: writes the model weights into the folder it is given (e.g. `model.save_pretrained`).
        trainer_state: tensors and plain values (optimizer and scheduler state, counters, RNG state), saved as
            `trainer_state.pt` and read back with `torch.load(..., weights_only=True)`.
    """
    final = out / CHECKPOINTS / f"step_{step:08d}"
    tmp = out / CHECKPOINTS / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_weights(tmp)
    torch.save(trainer_state, tmp / TRAINER_STATE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def load_trainer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / TRAINER_STATE, map_location="cpu", weights_only=True)


class DivergenceError(ValueError):
    """The loss or the gradients became non-finite: the run stopped before saving anything from that step."""
