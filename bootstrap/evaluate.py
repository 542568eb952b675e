"""Evaluating a bootstrapped encoder against its teacher: held-out cosine, GFLOPs, zero-shot retention.

`mllm-sparse eval-encoder --encoder DIR --teacher SPEC --data DIR` runs it on its own.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mllm_sparse import SparseFormerModel, profile
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mllm-sparse eval-encoder", description=__doc__)
    parser.add_argument("--encoder", type=Path, required=True, help="a bootstrapped encoder folder")
    parser.add_argument("--teacher", required=True, help="open_clip:NAME[@TAG|PATH] or hf:ID|DIR")
    parser.add_argument("--data", type=Path, required=True, help="a synthetic world, image folder or LLaVA .json")
    parser.add_argument("--image-folder", type=Path)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="write the result JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    student = SparseFormerModel.from_pretrained(args.encoder).to(device).eval()
    teacher = load_teacher(args.teacher)
    teacher.model.to(device)
    world = args.data.is_dir() and (args.data / "world.json").is_file()
    paths = list_images(args.data, "test" if world else "train", args.image_folder)
    arch, size = teacher.arch, student.config.image_size
    data = TwoViewImages(paths, size, arch.image_size, arch.mean, arch.std)
    result = evaluate_encoder(
        student,
        teacher,
        DataLoader(data, batch_size=args.batch_size),
        size,
        device,
        lambda: torch.autocast(device.type, enabled=False),
        args.data if world else None,
    )
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0
