"""The recipe: the settings every stage runs with, shared by `mllm-sparse quickstart`, `mllm-sparse ablate` and the
benchmarks, so that a quickstart run, an ablation arm and a benchmark arm are the same pipeline at different sizes.
The learning rates and batch sizes were chosen on the synthetic world.

Each function returns the argument list of a stage's `main(argv)`, exactly what a user would type after the command.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llava_adapter.train import TrainArguments

# The bootstrap's region term: with it a 16-token SparseFormer keeps small objects (token probe small-only AUC
# 0.602 -> 0.866 at weight 4; 12 gives 0.869), README § Speed.
REGION_DISTILL_WEIGHT = 4.0
BOOTSTRAP_BATCH_SIZE = 64
BOOTSTRAP_LR = 1e-3

# LLaVA's two stages on the world (chosen on the pooled-16 arm, commit f9a9893): stage 1 trains the projector with the
# LLM frozen, stage 2 the LLM and the projector; the tower stays frozen.
TEMPLATE = "chat_template"
VLM_BATCH_SIZE = 16
STAGE1_PROJECTOR_LR = 2e-3
STAGE2_LR = 2e-4


def teacher_spec(teacher: Path) -> str:
    """The `open_clip:NAME@WEIGHTS` spec of a `mllm-sparse train-teacher` folder."""
    from mllm_sparse.files import read_json

    model = read_json(teacher / "zero_shot.json")["model"]
    return f"open_clip:{model}@{teacher / 'open_clip_model.safetensors'}"


def bootstrap_arguments(
    teacher: str,
    data: Path,
    out: Path,
    num_latent_tokens: int,
    steps: int,
    *extra: str,
    batch_size: int = BOOTSTRAP_BATCH_SIZE,
    lr: float = BOOTSTRAP_LR,
    region_distill_weight: float = REGION_DISTILL_WEIGHT,
) -> list[str]:
    """`mllm-sparse bootstrap` of a SparseFormer with `num_latent_tokens` latent tokens (and the CLS token) from the
    teacher spec `teacher` (see `teacher_spec`) on the images of `data`, with the region term; `extra` are further
    bootstrap arguments (e.g. `--cache-teacher`)."""
    return [
        "--teacher", teacher, "--num-tokens", str(num_latent_tokens + 1), "--data", str(data),
        "--out", str(out), "--steps", str(steps), "--batch-size", str(batch_size), "--lr", str(lr),
        "--warmup-steps", str(max(1, steps // 20)), "--region-distill-weight", str(region_distill_weight), *extra,
    ]  # fmt: skip


def train_vlm_settings(
    start: Path,
    out: Path,
    train_data: Path,
    image_folder: Path,
    epochs: float,
    lr: float,
    projector_lr: float,
    *,
    batch_size: int = VLM_BATCH_SIZE,
    seed: int = 0,
    model_max_length: int = 512,
    overrides: Mapping[str, Any] | None = None,
) -> TrainArguments:
    """The arguments of `llava_adapter.train.run` from the LLaVA folder `start` into `out` on `train_data` (LLaVA
    JSON, images under `image_folder`): `lr` for the LLM (0: frozen), `projector_lr` for the projector, the tower
    frozen; a full model folder is saved, and an interrupted run resumes from its newest checkpoint. 512 tokens hold
    every synthetic-world conversation; real data with a 576-token tower wants LLaVA's 2048. `overrides` (field name
    -> value, e.g. from `llava_adapter.train.parse_overrides`) replace or add to these."""
    from llava_adapter.train import arguments

    values = {
        "model_name_or_path": str(start), "data_path": str(train_data), "image_folder": str(image_folder),
        "version": TEMPLATE, "output_dir": str(out),
        "num_train_epochs": float(epochs), "per_device_train_batch_size": int(batch_size),
        "learning_rate": float(lr), "mm_projector_lr": float(projector_lr), "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03, "weight_decay": 0.0, "logging_steps": 50.0,
        # a checkpoint every tenth of the run, the newest kept: a killed stage continues from it
        "save_strategy": "steps", "save_steps": 0.1, "save_total_limit": 1,
        "report_to": "none", "seed": int(seed), "model_max_length": int(model_max_length),
        "dataloader_num_workers": 0,
    }  # fmt: skip
    return arguments({**values, **(overrides or {})})


def eval_vlm_arguments(
    model: Path, test_data: Path, image_folder: Path, out: Path, limit: int | None, progress: bool = True
) -> list[str]:
    """`mllm-sparse eval-vlm` of `model` on `test_data` (the first `limit` records; None or 0: all)."""
    return [
        "--model", str(model), "--data", str(test_data), "--image_folder", str(image_folder),
        "--template", TEMPLATE, "--batch-size", "32", "--max-new-tokens", "8", "--out", str(out),
        *(["--limit", str(limit)] if limit else []), *([] if progress else ["--no-progress"]),
    ]  # fmt: skip
