"""What `mllm-sparse bootstrap` does: align a SparseFormer student with its CLIP ViT teacher, without labels.

    run(BootstrapSettings(teacher=SPEC, num_latent_tokens=N, data=PATH, out=DIR, steps=S))

N is the token budget, the image tokens an LLM reads; a CLS token, where the teacher has one, is never counted in it.
DIR becomes the encoder with its report and checkpoints, which `resume` continues exactly; the outputs, the resume
rules and data-parallel runs are in the command's help (`mllm_sparse_recipes/commands/bootstrap.py`).

The loop is written here, not on HF `Trainer`: ranks read strided shares of one global data order (N ranks take the
very steps of one process), the teacher cache is looked up by dataset index, and the loss is checked before the
backward pass; Trainer's sampler and `training_step` do none of these.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import AutoModel

from mllm_sparse import SparseFormerModel, create_model, list_models
from mllm_sparse.checkpoint import load_checked
from mllm_sparse.elastic import default_budget, make_elastic
from mllm_sparse.files import normal_modes, paths_as_paths, write_json
from mllm_sparse.training import RunFolder, adamw, epoch_order, lr_lambda, removed_on_early_failure

from .data import TwoViewImages, list_images
from .distributed import World, init_world
from .evaluate import evaluate_encoder, held_out_cosine
from .inherit import inherit, start_from
from .optim import param_groups
from .region_distill import random_boxes, region_distill_loss
from .targets import CACHE_NAME, TeacherTargets
from .teachers import load_teacher

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 1000  # when neither steps nor epochs is given


@dataclass
class BootstrapSettings:
    """What `mllm-sparse bootstrap` does: one field per option of the command.

    Attributes:
        teacher: `open_clip:NAME[@TAG|PATH]` or `hf:ID|DIR` (`bootstrap.load_teacher`).
        num_latent_tokens: the token budget: latent tokens, the image tokens an LLM reads (a CLS token, which the
            student has where the teacher has one, is not one of them); with `budgets`, the default one. None with
            `init_from`: the encoder's own.
        budgets: train one elastic student for all these budgets (`mllm_sparse.elastic`); None: one budget.
        data: an image folder, a synthetic world or a LLaVA .json.
        out: the encoder's folder.
        init_from: start from this SparseFormer instead of inheriting from the teacher: a `save_pretrained` folder,
            or a preset (`mllm_sparse.list_models()`) with `init_pretrained`; its own config sets the architecture
            (image size, sampling points), `trainable_cortex` the freeze split. With `budgets`, it becomes elastic
            and its own budget keeps its learned RoIs (e.g. the released CLIP-L SparseFormer with its teacher).
        init_pretrained: the weights of an `init_from` preset: an official `*_converted.pth`, a `.safetensors`
            file, or "official" (the reference release).
        image_folder: root of a LLaVA .json's image paths; None: the .json's folder.
        steps: optimizer steps; with `epochs` None too: 1000.
        epochs: passes over the training images (instead of `steps`).
        batch_size: the global batch (all ranks, all accumulation steps).
        grad_accum: micro-batches per optimizer step.
        lr, weight_decay, warmup_steps, clip_grad: AdamW and its schedule (linear warm-up, cosine decay).
        bf16: bf16 autocast for student and teacher.
        cache_teacher: compute the teacher's embeddings once and reuse them.
        token_loss_weight: weight of the token-level term (latent tokens vs RoI-pooled teacher patches).
        region_distill_weight: weight of the region term (random boxes: RoI-weighted student tokens vs the teacher's
            patches under the box).
        region_boxes: random boxes per image for the region term.
        token_loss_layer: the student unit whose tokens the token terms align.
        trainable_cortex: cortex blocks to fine-tune; None: half, as the paper.
        image_size: the student's input side; None: the teacher's.
        num_sampling_points: sampling points per latent token.
        val_fraction: held-out share of an image folder.
        eval_every: steps between evaluations (0: only at the end).
        save_every: steps between checkpoints (0: only at the end).
        resume: continue from the newest checkpoint in OUT/checkpoints.
        workers: data-loader workers.
        images_in_memory: decode each training image once and keep it (uint8) for the later epochs
            (`TwoViewImages`); for datasets that fit in memory, with `workers` 0 (each worker keeps its own).
        seed: the seed of the student's initialisation, the data order and the region term's boxes.
        device: "cuda" or "cpu"; None: cuda when available.
    """

    teacher: str
    num_latent_tokens: int | None
    data: Path
    out: Path
    init_from: str | None = None
    init_pretrained: str | None = None
    budgets: list[int] | None = None
    image_folder: Path | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 0
    clip_grad: float = 1.0
    bf16: bool = False
    cache_teacher: bool = False
    token_loss_weight: float = 0.0
    region_distill_weight: float = 0.0
    region_boxes: int = 16
    token_loss_layer: int = -1
    trainable_cortex: int | None = None
    image_size: int | None = None
    num_sampling_points: int = 16
    val_fraction: float = 0.05
    eval_every: int = 0
    save_every: int = 0
    resume: bool = False
    workers: int = 0
    images_in_memory: bool = False
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        paths_as_paths(self)


def roi_pooled_patches(patches: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
    """Average the teacher patch features whose centres fall inside each RoI (the nearest patch if none does).

    Args:
        patches: [B, P, C] teacher patch tokens on a square grid.
        rois: [B, N, 4] normalised x1y1x2y2.
    Returns:
        [B, N, C].
    """
    side = math.isqrt(patches.shape[1])
    centres = (torch.arange(side, device=patches.device, dtype=torch.float32) + 0.5) / side
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    cx, cy = cx.reshape(1, 1, -1), cy.reshape(1, 1, -1)
    x1, y1, x2, y2 = (rois.float()[..., i : i + 1] for i in range(4))
    inside = (
        (cx >= torch.minimum(x1, x2))
        & (cx <= torch.maximum(x1, x2))
        & (cy >= torch.minimum(y1, y2))
        & (cy <= torch.maximum(y1, y2))
    )
    distance = (cx - (x1 + x2) / 2) ** 2 + (cy - (y1 + y2) / 2) ** 2
    nearest = F.one_hot(distance.argmin(-1), patches.shape[1]).bool()
    weights = torch.where(inside.any(-1, keepdim=True), inside, nearest).float()
    weights = weights / weights.sum(-1, keepdim=True)
    return weights @ patches.float()


def save(folder: RunFolder, student, optimizer, scheduler, state: dict) -> None:
    """A checkpoint of the student after `state["step"]` steps (refused if a weight is not finite)."""
    trainer_state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": state,
        "torch_rng": torch.get_rng_state(),
    }
    folder.save(state["step"], student.save_pretrained, student.state_dict(), trainer_state)


def step_budgets(budgets: list[int], seed: int, step: int) -> list[int]:
    """The budgets an elastic bootstrap trains at `step`: the smallest and the largest every step, and on every other
    step (the even ones) one drawn from those between.

    Their losses are averaged over the same images and teacher targets (a "sandwich"; one budget drawn per step
    instead was worse at the smallest budget on two seeds, benchmarks/README.md). A budget between on every other step
    rather than every step keeps the cost within 1.5x a dedicated bootstrap's (the cortex's cost is linear in the
    tokens). A function of the seed and the step only, so the same on every rank and after a resume.
    """
    between = budgets[1:-1]
    if len(budgets) == 1:
        return list(budgets)
    if not between or step % 2:
        return [budgets[0], budgets[-1]]
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return [budgets[0], between[int(torch.randint(len(between), (1,), generator=generator))], budgets[-1]]


def alignment_loss(
    model,
    num_latent_tokens: int,
    pixels,
    targets,
    token_weight: float,
    token_layer: int,
    region_weight: float,
    region_boxes: int,
    box_keys: torch.Tensor,
    image_features: torch.Tensor | None = None,
):
    """1 − cos(student embedding, teacher embedding), plus the optional token-level and region terms, at the budget
    `num_latent_tokens`.

    Args:
        model: the student.
        box_keys: [B] one key per image for the region term's random boxes (`region_distill.random_boxes`).
        image_features: the student's `image_features(pixels)`, shared by the budgets of one step (None: computed).
    """
    need_tokens = token_weight > 0 or region_weight > 0
    out = model(
        pixels,
        output_hidden_states=need_tokens or None,
        num_latent_tokens=num_latent_tokens,
        image_features=image_features,
    )
    loss = 1 - F.cosine_similarity(out.image_embeds.float(), targets["embeds"], dim=-1).mean()
    if need_tokens:
        latent, rois = out.hidden_states[token_layer][:, -num_latent_tokens:], out.hidden_rois[token_layer]
    if region_weight > 0:
        grid = math.isqrt(targets["patches"].shape[1])
        boxes = random_boxes(box_keys.to(pixels.device), region_boxes, 1 / grid)
        loss = loss + region_weight * region_distill_loss(latent, rois, targets["patches"], boxes)
    if token_weight > 0:
        pooled = roi_pooled_patches(targets["patches"], rois.detach())
        if latent.shape[-1] != pooled.shape[-1]:
            raise ValueError(
                f"token loss: student unit {token_layer} width {latent.shape[-1]} differs from the "
                f"teacher width {pooled.shape[-1]}; choose a cortex unit"
            )
        loss = loss + token_weight * (1 - F.cosine_similarity(latent.float(), pooled, dim=-1).mean())
    return loss


class AlignmentObjective(torch.nn.Module):
    """`alignment_loss` of `student` averaged over the budgets one step trains (`step_budgets`), on the same images and
    targets, as one module call: the unit DistributedDataParallel wraps, one forward per micro-batch however many
    budgets it encodes, so DDP can find the budgets a step leaves out.

    The early convolution does not depend on the budget, so with several budgets it runs once, not once per budget."""

    def __init__(self, student: SparseFormerModel, settings: BootstrapSettings):
        super().__init__()
        self.student, self.settings = student, settings

    def forward(self, budgets: Sequence[int], pixels, targets, box_keys: torch.Tensor):
        s = self.settings
        features = self.student.image_features(pixels) if len(budgets) > 1 else None
        losses = [
            alignment_loss(self.student, n, pixels, targets, s.token_loss_weight, s.token_loss_layer,
                           s.region_distill_weight, s.region_boxes, box_keys, features)
            for n in budgets
        ]  # fmt: skip
        return sum(losses) / len(budgets)


def rank_indices(order: torch.Tensor, start: int, end: int, batch_size: int, world: World) -> list[int]:
    """Dataset indices this rank reads for the global batches order[start:end], batch after batch.

    Every rank replays the same global order (a function of seed and epoch), so the global batch, and hence the
    run, is the same for any number of ranks, and resuming needs only the position in that order.
    """
    return torch.cat([world.shard(order[i : i + batch_size]) for i in range(start, end, batch_size)]).tolist()


def off_grid_warning(num_latent: int) -> str | None:
    """A warning when some latent tokens start on the whole image: the initial RoIs tile only the largest square
    number of them (the reference's rule); on the synthetic world such tokens stay global through bootstrapping."""
    root = math.isqrt(num_latent)
    if root * root == num_latent:
        return None
    return (
        f"warning: {num_latent - root * root} of the {num_latent} latent tokens start on the whole image (the initial "
        f"RoIs tile a {root}x{root} grid); for every token on the grid use --num-latent-tokens {root * root} or "
        f"{(root + 1) ** 2}"
    )


# Settings that cannot change the weights: they may differ on --resume (and are stated); every other one may not.
FREE_SETTINGS = ("eval_every", "save_every", "workers", "images_in_memory", "device")


def check_settings(settings: BootstrapSettings) -> None:
    """One clear `ValueError` for a numeric setting outside its range."""
    at_least = {"num_latent_tokens": 1, "batch_size": 1, "grad_accum": 1, "region_boxes": 1, "num_sampling_points": 1,
                "steps": 1, "image_size": 1, "trainable_cortex": 0, "warmup_steps": 0, "eval_every": 0,
                "save_every": 0, "workers": 0}  # fmt: skip
    for name, low in at_least.items():
        value = getattr(settings, name)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    positive = ("lr", "clip_grad", "epochs")
    non_negative = ("weight_decay", "token_loss_weight", "region_distill_weight")
    for name in positive + non_negative:
        value = getattr(settings, name)
        bound = "> 0" if name in positive else ">= 0"
        if value is not None and not (math.isfinite(value) and (value > 0 if name in positive else value >= 0)):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number {bound}, got {value}")
    if not 0 <= settings.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {settings.val_fraction}")
    if settings.steps is not None and settings.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    if settings.num_latent_tokens is None and settings.init_from is None:
        raise ValueError("give --num-latent-tokens (the token budget), or --init-from an encoder that has one")
    if settings.init_pretrained is not None and settings.init_from is None:
        raise ValueError("--init-pretrained gives the weights of an --init-from preset; give --init-from too")
    if settings.budgets is not None:
        if not settings.budgets or min(settings.budgets) < 1:
            raise ValueError(f"--budgets must be positive token counts, got {settings.budgets}")
        if settings.num_latent_tokens is not None and settings.num_latent_tokens not in settings.budgets:
            raise ValueError(
                f"--num-latent-tokens {settings.num_latent_tokens} (the default budget) must be one of --budgets "
                f"{sorted(settings.budgets)}"
            )


def load_encoder(spec: str, pretrained: str | None) -> SparseFormerModel:
    """The SparseFormer `--init-from` names: a saved folder, or a preset with `--init-pretrained` weights."""
    if Path(spec).is_dir():
        if pretrained is not None:
            raise ValueError(f"--init-pretrained is for a preset; --init-from {spec} is a folder with its own weights")
        model = load_checked(AutoModel.from_pretrained, spec, what="SparseFormer")
        if not isinstance(model, SparseFormerModel):
            raise ValueError(f"--init-from {spec} holds a {type(model).__name__}, not a SparseFormer")
        return model
    if spec not in list_models():
        raise FileNotFoundError(f"--init-from {spec!r} is neither a folder nor a preset (mllm_sparse.list_models())")
    if pretrained is None:
        raise ValueError(f"--init-from {spec} is a preset: give its weights with --init-pretrained (file or official)")
    return create_model(spec, pretrained=pretrained)


def starting_budget(settings: BootstrapSettings, student: SparseFormerModel) -> BootstrapSettings:
    """`settings` with the default budget of a run that starts from `student`: the one asked for, else the
    encoder's own; a fixed run must keep the encoder's budgets (`--budgets` serves others)."""
    n = settings.num_latent_tokens if settings.num_latent_tokens is not None else student.config.num_latent_tokens
    if settings.budgets is None and n not in student.budgets:
        raise ValueError(
            f"--init-from {settings.init_from} serves {student.budgets} latent tokens, not {n}; give --budgets to "
            "make it serve others"
        )
    if settings.budgets is not None and settings.num_latent_tokens is None and n not in settings.budgets:
        n = max(settings.budgets)
    return dataclasses.replace(settings, num_latent_tokens=n)


def run(settings: BootstrapSettings) -> dict[str, Any] | None:
    """Bootstrap the encoder into `settings.out`; its report (`bootstrap_report.json`) on the main rank, None on the
    others under torchrun."""
    check_settings(settings)
    settings = dataclasses.replace(
        settings,
        steps=DEFAULT_STEPS if settings.steps is None and settings.epochs is None else settings.steps,
        device=settings.device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )
    world = init_world(settings.device)
    try:
        if not world.is_main:
            return train(settings, world)
        # a run that fails before its first checkpoint leaves no folder behind (a finished teacher cache stays)
        with removed_on_early_failure(settings.out, keep=[CACHE_NAME]):
            return train(settings, world)
    finally:
        world.close()


def train(settings: BootstrapSettings, world: World) -> dict[str, Any] | None:
    torch.manual_seed(settings.seed)
    device = world.device
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if settings.bf16
        else (lambda: torch.autocast(device.type, enabled=False))
    )
    per_rank, rest = divmod(settings.batch_size, world.size * settings.grad_accum)
    if per_rank < 1 or rest:
        raise ValueError(
            f"--batch-size {settings.batch_size} must be a multiple of ranks × --grad-accum = "
            f"{world.size} × {settings.grad_accum}"
        )

    folder = RunFolder.from_settings(
        settings, "bootstrap", FREE_SETTINGS, ["model.safetensors"], specs=["teacher", "init_from", "init_pretrained"]
    )
    resumed = folder.start(settings.resume)  # first: a refusal costs nothing
    teacher = load_teacher(settings.teacher)
    teacher.model.to(device).requires_grad_(False)
    arch = teacher.arch
    if settings.init_from is not None:
        student, report = start_from(
            load_encoder(settings.init_from, settings.init_pretrained),
            teacher,
            settings.init_from,
            settings.trainable_cortex,
        )
        settings = starting_budget(settings, student)
        image_size = student.config.image_size
    else:
        image_size = settings.image_size or arch.image_size
        student, report = inherit(
            teacher,
            settings.num_latent_tokens,
            settings.trainable_cortex,
            image_size=image_size,
            num_sampling_points=settings.num_sampling_points,
        )
    if world.is_main and (warning := off_grid_warning(settings.num_latent_tokens)):
        logger.warning(warning)
    budgets = sorted(set(settings.budgets)) if settings.budgets else student.budgets
    if settings.budgets:
        student = make_elastic(student, budgets, default=settings.num_latent_tokens)
    student.to(device).train()

    world_like = (settings.data / "world.json").is_file() if settings.data.is_dir() else False
    train_paths = list_images(settings.data, "train", settings.image_folder)
    if world_like:
        val_paths = list_images(settings.data, "val")
    else:
        num_val = int(len(train_paths) * settings.val_fraction)
        train_paths, val_paths = train_paths[num_val:], train_paths[:num_val]
    train_set = TwoViewImages(
        train_paths, image_size, arch.image_size, arch.mean, arch.std, in_memory=settings.images_in_memory
    )
    val_set = TwoViewImages(val_paths, image_size, arch.image_size, arch.mean, arch.std)
    val_loader = DataLoader(val_set, batch_size=settings.batch_size, num_workers=settings.workers)
    if len(train_set) < settings.batch_size:
        raise ValueError(
            f"--batch-size {settings.batch_size} exceeds the {len(train_set)} training images in {settings.data}"
        )
    steps_per_epoch = len(train_set) // settings.batch_size
    total_steps = settings.steps or max(1, round(settings.epochs * steps_per_epoch))

    optimizer = adamw(param_groups(student, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings.warmup_steps, total_steps))
    state = {"step": 0, "epoch": 0, "position": 0, "losses": [], "evals": []}
    if resumed is not None:
        student.load_state_dict(resumed.weights["model.safetensors"], strict=True)
        saved = resumed.trainer_state
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        torch.set_rng_state(saved["torch_rng"])
        if world.is_main:
            logger.info("resumed from %s at step %d", resumed.path, state["step"])
    objective = AlignmentObjective(student, settings)
    if world.size > 1:  # a budget left out of a step leaves its RoI table without a gradient on that step
        objective = DistributedDataParallel(objective, find_unused_parameters=len(budgets) > 2)

    targets = TeacherTargets(teacher, settings.token_loss_weight > 0 or settings.region_distill_weight > 0, autocast)
    if settings.cache_teacher:
        # The main rank computes the cache; the others load the file it wrote.
        cache_path = settings.out / CACHE_NAME
        if world.is_main:
            targets.build_cache(
                DataLoader(train_set, batch_size=settings.batch_size, num_workers=settings.workers),
                cache_path,
                device,
                settings.bf16,
            )
        world.barrier()
        if not world.is_main:
            targets.load_cache(cache_path)

    start = time.perf_counter()
    seen = 0
    bar = tqdm(total=total_steps, initial=state["step"], unit="step", desc="bootstrap", disable=not world.is_main)
    while state["step"] < total_steps:
        order = epoch_order(len(train_set), settings.seed, state["epoch"])
        usable = len(order) // settings.batch_size * settings.batch_size
        if state["position"] >= usable:
            state["epoch"], state["position"] = state["epoch"] + 1, 0
            continue
        mine = rank_indices(order, state["position"], usable, settings.batch_size, world)
        micro_batches = iter(DataLoader(train_set, batch_size=per_rank, sampler=mine, num_workers=settings.workers))
        while state["position"] < usable and state["step"] < total_steps:
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for k in range(settings.grad_accum):
                index, pixels, teacher_pixels = next(micro_batches)
                batch_targets = targets.get(index, teacher_pixels, device)
                last = k == settings.grad_accum - 1
                # Gradients are averaged across ranks once per optimizer step, on the last micro-batch.
                trained = step_budgets(budgets, settings.seed, state["step"])
                with contextlib.nullcontext() if last or world.size == 1 else objective.no_sync():
                    with autocast():
                        # the image and the step pick the region boxes, so any number of ranks draws the same ones
                        loss = objective(trained, pixels.to(device), batch_targets, index * total_steps + state["step"])
                    loss = loss / settings.grad_accum
                    # before backward: a NaN sampling grid crashes grid_sample's backward on CPU; all ranks agree
                    total += folder.check_loss(loss, state["step"] + 1, lambda ok: world.mean(float(not ok)) == 0)
                    loss.backward()
            total = world.mean(total)
            # the gradients are all-reduced, so every rank sees the same norm and stops in the same step
            norm = torch.nn.utils.clip_grad_norm_(
                [p for p in student.parameters() if p.requires_grad], settings.clip_grad
            )
            folder.check_grad_norm(norm, state["step"] + 1)
            optimizer.step()
            scheduler.step()
            state["step"] += 1
            state["position"] += settings.batch_size
            state["losses"].append(round(total, 6))
            seen += settings.batch_size
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", img_s=f"{seen / (time.perf_counter() - start):.1f}")
            if settings.eval_every and state["step"] % settings.eval_every == 0 and len(val_paths) and world.is_main:
                cosine = held_out_cosine(student, targets.compute, val_loader, device, autocast)
                state["evals"].append({"step": state["step"], "cosine": cosine})
            if settings.save_every and state["step"] % settings.save_every == 0:
                folder.check_weights(student.state_dict(), state["step"])  # on every rank, so that all stop together
                if world.is_main:
                    save(folder, student, optimizer, scheduler, state)
                world.barrier()
    bar.close()
    seconds = time.perf_counter() - start
    folder.check_weights(student.state_dict(), state["step"])
    if not world.is_main:
        world.barrier()  # wait for the main rank's final checkpoint and evaluation
        return None

    student.eval()
    save(folder, student, optimizer, scheduler, state)  # checks the weights: nothing non-finite reaches DIR
    student.save_pretrained(settings.out)
    normal_modes(settings.out)
    evaluations = {}
    for n in budgets:
        with default_budget(student, n):
            evaluations[n] = evaluate_encoder(
                student, teacher, val_loader, image_size, device, autocast, settings.data if world_like else None
            )
    final = evaluations[settings.num_latent_tokens]
    result = {
        "teacher": settings.teacher,
        "num_latent_tokens": settings.num_latent_tokens,
        "cls_tokens": int(arch.has_cls),
        "steps": state["step"],
        "ranks": world.size,
        "train_seconds_this_run": round(seconds, 1),
        "images_per_second_this_run": round(seen / max(seconds, 1e-9), 2),
        "teacher_cache": settings.cache_teacher,
        "loss_terms": {
            "token_loss_weight": settings.token_loss_weight,
            "region_distill_weight": settings.region_distill_weight,
            "region_boxes": settings.region_boxes,
            "token_loss_layer": settings.token_loss_layer,
        },
        "loss_curve": state["losses"],
        "evals": state["evals"],
        "final": final,
        "inheritance": report.to_dict(),
    }
    if settings.budgets:
        result["budgets"] = {str(n): evaluations[n] for n in budgets}
    write_json(settings.out / "bootstrap_report.json", result)
    (settings.out / "bootstrap_report.md").write_text(report_markdown(result))
    world.barrier()
    return result


def report_markdown(result: dict) -> str:
    final = result["final"]
    lines = [
        f"# Bootstrap report: {result['num_latent_tokens']} latent tokens"
        + (" (+ the CLS token)" if result["cls_tokens"] else "")
        + f" from `{result['teacher']}`",
        "",
        f"- steps: {result['steps']} ({result['images_per_second_this_run']} images/s in this run, "
        f"teacher cache: {result['teacher_cache']})",
        f"- final loss: {result['loss_curve'][-1] if result['loss_curve'] else float('nan'):.4f}",
        f"- GFLOPs: student {final['student_gflops']:.2f} ({final['student_tokens']} tokens) vs teacher "
        f"{final['teacher_gflops']:.2f} ({final['teacher_tokens']} tokens)",
    ]
    if "held_out_cosine" in final:
        lines.append(f"- held-out cosine to the teacher: {final['held_out_cosine']:.4f}")
    if "zero_shot" in final:
        z = final["zero_shot"]
        retention = "n/a" if z["retention"] is None else f"{z['retention'] * 100:.1f}%"
        lines.append(
            f"- zero-shot top-1: teacher {z['teacher'] * 100:.1f}%, student {z['student'] * 100:.1f}% "
            f"(retention {retention})"
        )
    if "budgets" in result:
        lines += [
            "",
            f"Elastic: one student for {len(result['budgets'])} budgets (each step the smallest and the largest, "
            "every other step one between); the lines above are the default budget's.",
            "",
            "| latent tokens | GFLOPs | held-out cosine | zero-shot top-1 | retention |",
            "|---|---|---|---|---|",
        ]
        for n, e in result["budgets"].items():
            z = e.get("zero_shot", {})
            cosine = f"{e['held_out_cosine']:.4f}" if "held_out_cosine" in e else "n/a"
            top1 = f"{z['student'] * 100:.1f}%" if z else "n/a"
            retention = f"{z['retention'] * 100:.1f}%" if z.get("retention") is not None else "n/a"
            lines.append(f"| {n} | {e['student_gflops']:.2f} | {cosine} | {top1} | {retention} |")
    inh = result["inheritance"]
    inherited = f"Inherited {len(inh['inherited'])} tensors (teacher blocks {sorted(inh['layer_map'])})"
    origin = f"Started from {inh['started_from']}" if inh.get("started_from") else f"{inherited}; {len(inh['new'])} new"
    lines += ["", f"{origin}; {len(inh['frozen'])} frozen; {len(inh['trained'])} trained."]
    return "\n".join(lines) + "\n"
