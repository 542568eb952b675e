"""What `mllm-sparse train-teacher` does: train a small open_clip CLIP contrastively on a synthetic world's captions
(`run(TeacherSettings(data=WORLD, out=DIR, steps=S))`), saved in open_clip's own formats, with checkpoints that
`resume` continues exactly; the files it writes and the resume rules are in the command's help
(`mllm_sparse_recipes/commands/train_teacher.py`).

The loop is written here, not on HF `Trainer`: `--minutes` budgets a run by time and the learning rate follows that
fraction of the run (`lr_at`), which neither Trainer nor transformers' step-count schedules can.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from mllm_sparse.configuration import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from mllm_sparse.files import atomic_path, paths_as_paths, write_json
from mllm_sparse.synth.dataset import SyntheticWorld
from mllm_sparse.training import RunFolder, adamw

from .optim import param_groups
from .region_captions import RegionCaptions, box_weights, region_loss
from .teacher_models import TEACHER_MODELS, register_teacher_configs
from .zero_shot import zero_shot_report

logger = logging.getLogger(__name__)

DEFAULT_MINUTES = 10.0  # when neither minutes nor steps is given


@dataclass
class TeacherSettings:
    """What `mllm-sparse train-teacher` does: one field per option of the command.

    Attributes:
        data: a world written by `mllm-sparse synth`.
        out: the teacher's folder.
        model: an open_clip architecture (`TEACHER_MODELS` for the synthetic world).
        minutes: train for this long (the schedule follows the clock); with `steps` None too: 10.
        steps: train for this many steps (instead of `minutes`).
        batch_size: images per step.
        lr, weight_decay: AdamW's.
        warmup: warm-up fraction of the budget.
        caption_weights: sampling weight of each caption of an image (full, principal + two, principal alone).
        region_weight: weight of the region-caption term (each object's caption at its box, from scenes.jsonl;
            `bootstrap.region_captions`); 0 trains on whole-image captions alone.
        seed: the seed of the initialisation, the data order and the caption choice.
        save_every: steps between checkpoints, also written at the end (0: none).
        resume: continue from the newest checkpoint in OUT/checkpoints.
        threads: torch CPU threads; None: torch's default.
        device: "cuda" or "cpu"; None: cuda when available.
    """

    data: Path
    out: Path
    model: str = "synth-vit-t-8"
    minutes: float | None = None
    steps: int | None = None
    # Small batches: on a CPU the budget is optimiser steps, and 32 captions still hold most of the 48 classes.
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: float = 0.05
    caption_weights: list[float] = field(default_factory=lambda: [0.0, 0.0, 1.0])
    region_weight: float = 1.0
    seed: int = 0
    save_every: int = 0
    resume: bool = False
    threads: int | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        paths_as_paths(self)
        self.caption_weights = list(self.caption_weights)


def caption_weights(weights: list[float], per_image: int) -> Tensor:
    """[K] sampling weights of an image's captions (K = len(weights) >= `per_image`, the most captions an image has).

    The default trains on the principal-object caption alone: only it makes the principal's shape matter in a
    batch, where colours and positions tell full captions apart; with every caption sampled alike a small ViT
    learns colours and stays near chance on shapes."""
    if len(weights) < per_image:
        raise ValueError(f"--caption-weights gives {len(weights)} weights, but images have {per_image} captions")
    w = torch.tensor(weights, dtype=torch.float)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"--caption-weights must be non-negative with a positive sum, got {weights}")
    return w


def cut_captions_warning(
    tokenizer, captions: list[list[str]], weights: Tensor, paths: list[str], model_name: str
) -> str | None:
    """A warning naming how many of the captions that training samples (weight > 0) are longer than the text
    context and so lose their ends, with the longest one's image; None when every such caption fits.

    The synthetic world's full captions list the objects largest first, so a short context drops the small ones;
    open_clip's tokenizer cuts without a word."""
    context = tokenizer.context_length
    slots = [k for k in range(len(weights)) if weights[k] > 0]
    texts = [(path, c[k % len(c)]) for path, c in zip(paths, captions, strict=True) for k in slots]
    # Token counts, measured in a context far longer than any caption (0 pads: open_clip's SimpleTokenizer).
    chunks = [[t for _, t in texts[i : i + 1024]] for i in range(0, len(texts), 1024)]
    lengths = torch.cat([(tokenizer(chunk, context_length=512) != 0).sum(1) for chunk in chunks])
    cut = int((lengths > context).sum())
    if not cut:
        return None
    longest = int(lengths.argmax())
    return (
        f"train-teacher: {cut} of the {len(texts)} captions sampled for training are longer than {model_name}'s "
        f"{context}-token text context and lose their ends (the longest, for {texts[longest][0]}, has "
        f"{int(lengths[longest])} tokens); give the long captions weight 0 in --caption-weights, or use a model with a "
        "longer context_length"
    )


def lr_at(progress: float, base_lr: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` fraction, then cosine decay to zero; `progress` in [0, 1]."""
    if progress < warmup:
        return base_lr * progress / warmup
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


WEIGHTS_FILE = "open_clip_model.safetensors"


def save_teacher(model: torch.nn.Module, name: str, out: Path, image_size: int) -> None:
    """Write the weights and both config files (see the module docstring), atomically."""
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = open_clip.get_model_config(name)
    preprocess_cfg = {
        "size": image_size,
        "mean": list(OPENAI_CLIP_MEAN),
        "std": list(OPENAI_CLIP_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
    write_json(out / f"{name}.json", model_cfg)
    write_json(out / "open_clip_config.json", {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})


# Settings that cannot change the weights: they may differ on --resume (and are stated); every other one may not.
FREE_SETTINGS = ("threads", "device", "save_every")


def check_settings(settings: TeacherSettings) -> None:
    """One clear `ValueError` for a numeric setting outside its range."""
    if settings.minutes is not None and settings.steps is not None:
        raise ValueError("give --minutes or --steps, not both")
    if (settings.minutes is not None and not settings.minutes > 0) or (
        settings.steps is not None and settings.steps <= 0
    ):
        raise ValueError("--minutes and --steps must be positive")
    if settings.batch_size < 1 or settings.save_every < 0 or (settings.threads is not None and settings.threads < 1):
        raise ValueError("--batch-size and --threads must be >= 1, --save-every >= 0")
    if not (math.isfinite(settings.lr) and settings.lr > 0) or not (
        math.isfinite(settings.weight_decay) and settings.weight_decay >= 0
    ):
        raise ValueError(
            f"--lr must be a finite number > 0 and --weight-decay >= 0, got {settings.lr}, {settings.weight_decay}"
        )
    if not 0 <= settings.warmup < 1:
        raise ValueError(f"--warmup is a fraction of the budget in [0, 1), got {settings.warmup}")
    if settings.region_weight < 0:
        raise ValueError(f"--region-weight must be >= 0, got {settings.region_weight}")


class _NoRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextmanager
def untrained_model_expected() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded" warning while building a model that is about to be trained:
    it has no weights by design. open_clip logs it on the root logger (a logger's filters see only its own records,
    so no other message is touched); its own module logger is covered too, should a later version use that."""
    loggers = [logging.getLogger(), logging.getLogger("open_clip.factory")]
    quiet = _NoRandomInitWarning()
    for target in loggers:
        target.addFilter(quiet)
    try:
        yield
    finally:
        for target in loggers:
            target.removeFilter(quiet)


def run(settings: TeacherSettings) -> dict[str, Any]:
    """Train the teacher into `settings.out` (see the module docstring); its zero-shot report (`zero_shot.json`)."""
    register_teacher_configs()
    if settings.model not in open_clip.list_models():
        raise ValueError(
            f"Unknown open_clip model {settings.model!r}; teachers for the synthetic world: {TEACHER_MODELS}"
        )
    check_settings(settings)
    settings = dataclasses.replace(
        settings,
        minutes=DEFAULT_MINUTES if settings.minutes is None and settings.steps is None else settings.minutes,
        device=settings.device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )
    if settings.threads:
        torch.set_num_threads(settings.threads)
    folder = RunFolder.from_settings(settings, "train-teacher", FREE_SETTINGS, [WEIGHTS_FILE])
    resumed = folder.start(settings.resume)
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)

    with untrained_model_expected():
        model = open_clip.create_model(settings.model, output_dict=True).to(device)
    tokenizer = open_clip.get_tokenizer(settings.model)
    image_size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    world = SyntheticWorld(settings.data)
    train = world.captioned_images("train", image_size)
    # [N, K, L]: K caption slots per image (one per weight; an image with fewer captions repeats them), tokenised
    # once; each step samples one slot per image.
    weights = caption_weights(settings.caption_weights, max(len(c) for c in train.captions))
    tokens = torch.stack([tokenizer([c[k % len(c)] for k in range(len(weights))]) for c in train.captions])
    if warning := cut_captions_warning(tokenizer, train.captions, weights, train.paths, settings.model):
        logger.warning(warning)
    logger.info(
        f"teacher {settings.model}: {sum(p.numel() for p in model.visual.parameters()) / 1e6:.2f} M visual params, "
        f"{model.visual.grid_size[0] * model.visual.grid_size[1]} patch tokens; {len(train)} training images"
    )

    regions = RegionCaptions.from_scenes(train.scenes, train.paths) if settings.region_weight > 0 else None
    region_text = tokenizer(regions.texts) if regions is not None else None
    grid = model.visual.grid_size[0]

    optimizer = adamw(param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    generator = torch.Generator().manual_seed(settings.seed)
    state = {"step": 0, "cursor": 0, "order": torch.randperm(len(train), generator=generator), "seconds": 0.0}
    state["losses"] = []
    if resumed is not None:
        model.load_state_dict({k: v.to(device) for k, v in resumed.weights[WEIGHTS_FILE].items()}, strict=True)
        optimizer.load_state_dict(resumed.trainer_state["optimizer"])
        generator.set_state(resumed.trainer_state["generator"])
        torch.set_rng_state(resumed.trainer_state["torch_rng"])
        state = resumed.trainer_state["state"]
        logger.info("resumed from %s at step %d", resumed.path, state["step"])

    def save() -> None:
        cpu = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        trainer_state = {
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "state": state,
        }
        folder.save(state["step"], lambda folder: save_file(cpu, folder / WEIGHTS_FILE), cpu, trainer_state)

    start = time.perf_counter()
    before = state["seconds"]  # training time of the runs this one continues
    bar = tqdm(
        total=settings.steps if settings.steps else None, initial=state["step"], unit="step", desc="train-teacher"
    )
    model.train()
    model.visual.output_tokens = True  # (pooled, final patch tokens) for the region term
    while True:
        state["seconds"] = before + time.perf_counter() - start
        progress = state["step"] / settings.steps if settings.steps else state["seconds"] / (settings.minutes * 60)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(progress, settings.lr, settings.warmup)
        if state["cursor"] + settings.batch_size > len(state["order"]):
            state["order"], state["cursor"] = torch.randperm(len(train), generator=generator), 0
        idx = state["order"][state["cursor"] : state["cursor"] + settings.batch_size]
        state["cursor"] += settings.batch_size
        pixels = train.pixels(idx).to(device)
        choice = torch.multinomial(weights, len(idx), replacement=True, generator=generator)
        pooled, patches = model.visual(pixels)
        texts = tokens[idx, choice]
        if regions is not None:
            rows, position = regions.rows_of(idx)
            captions, target = regions.caption[rows].unique(return_inverse=True)
            texts = torch.cat([texts, region_text[captions]])
        text_features = model.encode_text(texts.to(device), normalize=True)
        loss = loss_fn(F.normalize(pooled, dim=-1), text_features[: len(idx)], model.logit_scale.exp())
        if regions is not None:
            loss = loss + settings.region_weight * region_loss(
                patches,
                model.visual.proj,
                box_weights(regions.boxes[rows], grid).to(device),
                position.to(device),
                text_features[len(idx) :],
                target.to(device),
                model.logit_scale,
            )
        value = folder.check_loss(loss, state["step"] + 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        folder.check_grad_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), state["step"] + 1)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        state["step"] += 1
        state["losses"].append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}", img_s=f"{state['step'] * settings.batch_size / state['seconds']:.0f}")
        if settings.save_every and state["step"] % settings.save_every == 0:
            save()
    bar.close()
    step, losses, train_seconds = state["step"], state["losses"], state["seconds"]

    model.visual.output_tokens = False
    model.eval()
    if settings.save_every and step % settings.save_every:
        save()
    folder.check_weights(model.state_dict(), step)  # nothing non-finite reaches DIR
    save_teacher(model, settings.model, settings.out, image_size)
    report = zero_shot_report(model, tokenizer, world, "test", image_size, device)
    report.update(
        model=settings.model,
        data=str(settings.data),
        steps=step,
        batch_size=settings.batch_size,
        region_weight=settings.region_weight,
        train_seconds=round(train_seconds, 1),
        images_per_second=round(step * settings.batch_size / train_seconds, 1),
        loss_curve=[round(float(np.mean(losses[i : i + 10])), 4) for i in range(0, len(losses), 10)],
    )
    write_json(settings.out / "zero_shot.json", report)
    (settings.out / "zero_shot.md").write_text(zero_shot_markdown(report))
    return report


def zero_shot_markdown(report: dict) -> str:
    lines = [
        f"# Teacher `{report['model']}`: zero-shot on `{report['data']}` ({report['split']})",
        "",
        f"- top-1: **{report['top1'] * 100:.1f}%** over {report['num_images']} images, {report['num_classes']} classes",
        f"- training: {report['steps']} steps of {report['batch_size']} in {report['train_seconds']} s "
        f"({report['images_per_second']} images/s)",
        "",
        "| principal object size | images | top-1 |",
        "|---|---:|---:|",
    ]
    for size, row in report["by_principal_size"].items():
        lines.append(f"| {size} | {row['images']} | {row['top1'] * 100:.1f}% |")
    return "\n".join(lines) + "\n"
