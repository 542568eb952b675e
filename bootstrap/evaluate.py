"""Evaluating a bootstrapped encoder against its teacher: held-out cosine, GFLOPs, zero-shot retention.

`run(EvalEncoderSettings(...))` (`mllm-sparse eval-encoder --encoder DIR --teacher SPEC --data DIR`) runs it on its
own.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mllm_sparse import SparseFormerModel, profile
from mllm_sparse.files import write_text
from mllm_sparse.profiling import count_gflops

from .data import TwoViewImages, list_images
from .targets import TeacherTargets
from .teachers import Teacher, load_teacher
from .zero_shot import text_classifier


@torch.no_grad()
def held_out_cosine(student, teacher_embed: Callable, loader: DataLoader, device, autocast) -> float:
    """Mean cosine between student and teacher embeddings over a loader of `TwoViewImages`."""
    was_training = student.training
    student.eval()
    sims = []
    for _, pixels, teacher_pixels in loader:
        with autocast():
            embeds = student(pixels.to(device)).image_embeds.float()
        target = teacher_embed(teacher_pixels.to(device))["embeds"]
        sims.append(F.cosine_similarity(embeds, target, dim=-1).cpu())
    student.train(was_training)
    return float(torch.cat(sims).mean())


@torch.no_grad()
def zero_shot_side_by_side(student, teacher: Teacher, world_dir: Path, image_size: int, device) -> dict:
    """Zero-shot top-1 of teacher and student with the teacher's text tower (the student replaces `clip.visual`)."""
    from mllm_sparse.synth.dataset import SyntheticWorld

    world = SyntheticWorld(world_dir)
    classifier = text_classifier(teacher.encode_text, world.class_names, world.templates)
    paths = list_images(world_dir, "test")
    arch = teacher.arch
    data = TwoViewImages(paths, image_size, arch.image_size, arch.mean, arch.std)
    labels = {r["image"]: r["label"] for r in world.labels["images"]}
    hits: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
    for index, pixels, teacher_pixels in DataLoader(data, batch_size=64):
        truth = torch.tensor([labels[paths[i].relative_to(world_dir).as_posix()] for i in index.tolist()])
        for name, embeds in (
            ("student", student(pixels.to(device)).image_embeds),
            ("teacher", teacher.encode_image(teacher_pixels.to(device))),
        ):
            pred = (F.normalize(embeds.float(), dim=-1) @ classifier).argmax(-1).cpu()
            hits[name].append(pred == truth)
    top1 = {name: float(torch.cat(h).float().mean()) for name, h in hits.items()}
    top1["retention"] = top1["student"] / top1["teacher"] if top1["teacher"] > 0 else None
    return top1


def evaluate_encoder(
    student, teacher: Teacher, loader: DataLoader, image_size: int, device, autocast, world_dir: Path | None
) -> dict:
    """Held-out cosine to the teacher (over `loader`), GFLOPs and tokens of both, and zero-shot side by side when
    `world_dir` is a synthetic world and the teacher has a text tower."""
    arch = teacher.arch
    example = torch.randn(1, 3, arch.image_size, arch.image_size, device=device)
    result = {
        "student_gflops": profile(student, image_size).gflops,
        "teacher_gflops": count_gflops(teacher.encode_image, example),
        "student_tokens": student.num_tokens,
        "teacher_tokens": arch.num_patches + int(arch.has_cls),
    }
    if len(loader.dataset):
        targets = TeacherTargets(teacher, need_patches=False, autocast=autocast)
        result["held_out_cosine"] = held_out_cosine(student, targets.compute, loader, device, autocast)
    if world_dir is not None and teacher.has_text:
        result["zero_shot"] = zero_shot_side_by_side(student, teacher, world_dir, image_size, device)
    return result


@dataclass
class EvalEncoderSettings:
    """What `mllm-sparse eval-encoder` does: one field per option of the command.

    Attributes:
        encoder: a bootstrapped encoder folder.
        teacher: `open_clip:NAME[@TAG|PATH]` or `hf:ID|DIR` (`bootstrap.load_teacher`).
        data: a synthetic world (its test split), an image folder or a LLaVA .json.
        image_folder: root of a LLaVA .json's image paths; None: the .json's folder.
        batch_size: images per batch.
        device: "cuda" or "cpu"; None: cuda when available.
        out: also write the result as JSON here.
    """

    encoder: Path
    teacher: str
    data: Path
    image_folder: Path | None = None
    batch_size: int = 64
    device: str | None = None
    out: Path | None = None


def run(settings: EvalEncoderSettings) -> dict:
    """The encoder against its teacher (`evaluate_encoder`) on `settings.data`; written to `settings.out` if given."""
    if settings.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {settings.batch_size}")
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data_path = Path(settings.data)
    student = SparseFormerModel.from_pretrained(settings.encoder).to(device).eval()
    teacher = load_teacher(settings.teacher)
    teacher.model.to(device)
    world = data_path.is_dir() and (data_path / "world.json").is_file()
    paths = list_images(data_path, "test" if world else "train", settings.image_folder)
    arch, size = teacher.arch, student.config.image_size
    data = TwoViewImages(paths, size, arch.image_size, arch.mean, arch.std)
    result = evaluate_encoder(
        student,
        teacher,
        DataLoader(data, batch_size=settings.batch_size),
        size,
        device,
        lambda: torch.autocast(device.type, enabled=False),
        data_path if world else None,
    )
    if settings.out is not None:
        write_text(settings.out, json.dumps(result, indent=2) + "\n")
    return result
