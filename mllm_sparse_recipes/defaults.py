"""The recipe: the settings every stage runs with, shared by `mllm-sparse quickstart`, `mllm-sparse ablate` and the
benchmarks, so that a quickstart run, an ablation arm and a benchmark arm are the same pipeline at different sizes.
The learning rates and batch sizes were chosen on the synthetic world.

Each function returns a stage's typed settings, the ones its command builds from what a user types.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bootstrap.train import BootstrapSettings
    from llava_adapter.evaluate import EvalVlmSettings
    from llava_adapter.train import TrainArguments

# The bootstrap's region term keeps small objects in a 16-token SparseFormer (the token probe, benchmarks/README.md).
REGION_DISTILL_WEIGHT = 4.0
BOOTSTRAP_BATCH_SIZE = 64
BOOTSTRAP_LR = 1e-3

# LLaVA's two stages on the world (chosen on the pooled-16 arm): stage 1 trains the projector with the LLM frozen,
# stage 2 the LLM and the projector; the tower stays frozen.
TEMPLATE = "chat_template"
VLM_BATCH_SIZE = 16
STAGE1_PROJECTOR_LR = 2e-3
STAGE2_LR = 2e-4


def teacher_spec(teacher: Path) -> str:
    """The `open_clip:NAME@WEIGHTS` spec of a `mllm-sparse train-teacher` folder."""
    from mllm_sparse.files import read_json

    model = read_json(teacher / "zero_shot.json")["model"]
    return f"open_clip:{model}@{teacher / 'open_clip_model.safetensors'}"


def bootstrap_settings(
    teacher: str,
    data: Path,
    out: Path,
    num_latent_tokens: int,
    steps: int,
    *,
    batch_size: int = BOOTSTRAP_BATCH_SIZE,
    lr: float = BOOTSTRAP_LR,
    region_distill_weight: float = REGION_DISTILL_WEIGHT,
    **settings: Any,
) -> BootstrapSettings:
    """`mllm-sparse bootstrap` of a SparseFormer with `num_latent_tokens` latent tokens (plus the CLS token where the
    teacher has one) from the teacher spec `teacher` (see `teacher_spec`) on the images of `data`, with the region
    term, each image decoded once (the world's images fit in memory, and are read ~12 times in the laptop plan);
    `settings` are further `BootstrapSettings` fields (e.g. `cache_teacher=True`)."""
    from bootstrap.train import BootstrapSettings

    return BootstrapSettings(**{
        "teacher": teacher, "num_latent_tokens": num_latent_tokens, "data": data, "out": out, "steps": steps,
        "batch_size": batch_size, "lr": lr, "warmup_steps": max(1, steps // 20),
        "region_distill_weight": region_distill_weight, "images_in_memory": True, **settings,
    })  # fmt: skip


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
    every synthetic-world conversation read with up to 58 image tokens (the longest has 454 tokens with one image
    placeholder); more image tokens, or real data with a 576-token tower, want LLaVA's 2048. `overrides` (field name
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
        # batches of one modality and similar length, as LLaVA's fine-tuning runs: random batches of the world's
        # conversations pad to ~1.8x their tokens, and stage 1 and 2 steps took ~2x as long (benchmarks/README.md)
        "group_by_modality_length": True,
    }  # fmt: skip
    return arguments({**values, **(overrides or {})})


def eval_vlm_settings(
    model: Path, test_data: Path, image_folder: Path, out: Path, limit: int | None, progress: bool = True
) -> EvalVlmSettings:
    """`mllm-sparse eval-vlm` of `model` on `test_data` (the first `limit` records; None or 0: all)."""
    from llava_adapter.evaluate import EvalVlmSettings  # here: the commands' --help reads this module, without torch

    return EvalVlmSettings(
        model=model, data=test_data, image_folder=image_folder, template=TEMPLATE, batch_size=32, max_new_tokens=8,
        out=out, limit=limit or None, progress=progress,
    )  # fmt: skip
