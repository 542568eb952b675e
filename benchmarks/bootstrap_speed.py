"""Bootstrapping throughput at CLIP scale: SparseFormer-L from ViT-L-14-336, with the teacher per batch and from its
cache, and the projected time of one ImageNet-1k epoch; with `--budgets`, also one elastic student's step (`bootstrap
--budgets`: the smallest and the largest budget, every other step one between, on the same images and targets)
against the dedicated student's.

Both use `bootstrap`'s own pieces (`load_teacher`, `inherit`, `TeacherTargets`, `AlignmentObjective`, AdamW
over `param_groups`) on random weights and random images already on the device: this measures the training step, not
image decoding (a real run needs data loaders that keep up). The two modes alternate step by step, so noise hits
both alike. One step is one global batch: targets (the teacher's forward, or rows of a cache), the student's forward
and backward, and the optimizer step; the teacher cache's one-off cost is timed too (the teacher alone, per image).

    uv run python benchmarks/bootstrap_speed.py --device cuda --bf16          # one GPU
    uv run python benchmarks/bootstrap_speed.py --budgets 9 16 25 36 49 63    # + the elastic student's step
    uv run python benchmarks/bootstrap_speed.py --quick                       # tiny teacher: checks the code path

Writes benchmarks/results/bootstrap_speed.{json,md} (or --out-dir / --name).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
from results_io import RESULTS, machine, write_results

from bootstrap.inherit import inherit
from bootstrap.optim import param_groups
from bootstrap.targets import TeacherTargets
from bootstrap.teachers import load_teacher
from bootstrap.train import AlignmentObjective, BootstrapSettings, step_budgets
from mllm_sparse import make_elastic

IMAGENET_TRAIN_IMAGES = 1_281_167


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="open_clip:ViT-L-14-336", help="(default: open_clip:ViT-L-14-336)")
    parser.add_argument("--num-latent-tokens", type=int, default=63, help="(default: 63, the released CLIP-L's)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch per step (default: 128)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first (default: 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, as `bootstrap --bf16`")
    parser.add_argument(
        "--region-distill-weight", type=float, default=4.0, help="the region term's weight (default: 4.0)"
    )
    parser.add_argument(
        "--budgets", type=int, nargs="+", help="also time one elastic student serving these (the largest: "
        "--num-latent-tokens), as `bootstrap --budgets` trains it (default: none)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny teacher and batch: checks the code path")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="(default: benchmarks/results)")
    parser.add_argument("--name", default="bootstrap_speed", help="result file stem (default: bootstrap_speed)")
    args = parser.parse_args(argv)
    if args.quick:
        args.teacher, args.num_latent_tokens, args.batch_size, args.steps, args.warmup = (
            "open_clip:synth-vit-t-8", 16, 4, 2, 1,
        )  # fmt: skip
    if args.budgets and max(args.budgets) != args.num_latent_tokens:
        parser.error(f"--budgets' largest must be --num-latent-tokens ({args.num_latent_tokens}): the dedicated arm")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    defaults = BootstrapSettings(
        teacher=args.teacher, num_latent_tokens=args.num_latent_tokens, data=Path(), out=Path(),
        region_distill_weight=args.region_distill_weight,
    )  # fmt: skip

    torch.manual_seed(0)
    teacher = load_teacher(args.teacher)
    teacher.model.to(device).requires_grad_(False)
    student, _ = inherit(teacher, args.num_latent_tokens, num_sampling_points=defaults.num_sampling_points)
    student.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(student, defaults.weight_decay), lr=defaults.lr)
    budgets = sorted(set(args.budgets or []))
    if budgets:
        elastic = AlignmentObjective(make_elastic(student, budgets), defaults)
        elastic_optimizer = torch.optim.AdamW(param_groups(elastic.student, defaults.weight_decay), lr=defaults.lr)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    size = teacher.arch.image_size
    pixels = torch.randn(args.batch_size, 3, size, size, device=device)
    targets = TeacherTargets(teacher, args.region_distill_weight > 0, autocast)
    cache = {key: value.cpu() for key, value in targets.compute(pixels).items()}  # rows as a cache file holds them
    index = torch.arange(args.batch_size)

    dedicated = AlignmentObjective(student, defaults)

    def step(from_cache: bool, objective=dedicated, opt=optimizer, trained=(args.num_latent_tokens,)) -> float:
        """One optimizer step of `objective`'s student at the budgets `trained` (their losses averaged, as `bootstrap`
        does)."""
        synchronize(device)
        start = time.perf_counter()
        batch_targets = {k: v[index].to(device) for k, v in cache.items()} if from_cache else targets.compute(pixels)
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = objective(trained, pixels, batch_targets, index)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in objective.parameters() if p.requires_grad], defaults.clip_grad)
        opt.step()
        synchronize(device)
        return time.perf_counter() - start

    def elastic_step(from_cache: bool, i: int) -> float:
        """Steps 2i and 2i+1 averaged: one with a budget between the smallest and the largest, one without."""
        steps = (2 * i, 2 * i + 1)
        return sum(step(from_cache, elastic, elastic_optimizer, step_budgets(budgets, 0, s)) for s in steps) / 2

    def teacher_only() -> float:
        synchronize(device)
        start = time.perf_counter()
        targets.compute(pixels)
        synchronize(device)
        return time.perf_counter() - start

    modes = ["teacher_per_batch", "from_cache", "teacher_forward"]
    modes += ["elastic_per_batch", "elastic_from_cache"] if budgets else []
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for i in range(args.warmup + args.steps):
        row = {"teacher_per_batch": step(False), "from_cache": step(True), "teacher_forward": teacher_only()}
        if budgets:  # interleaved with the dedicated steps, so noise hits both alike
            row |= {"elastic_per_batch": elastic_step(False, i), "elastic_from_cache": elastic_step(True, i)}
        if i >= args.warmup:
            for key, value in row.items():
                times[key].append(value)
    ips = {key: args.batch_size / statistics.median(values) for key, values in times.items()}
    cache_hours = IMAGENET_TRAIN_IMAGES / ips["teacher_forward"] / 3600
    report = {
        "machine": machine(),
        "device": device.type,
        "teacher": args.teacher,
        "student_latent_tokens": args.num_latent_tokens,
        "trainable_params": sum(p.numel() for p in student.parameters() if p.requires_grad),
        "batch_size": args.batch_size,
        "bf16": args.bf16,
        "region_distill_weight": args.region_distill_weight,
        "steps": args.steps,
        "budgets": budgets,
        "images_per_s": ips,
        "cache_speedup": ips["from_cache"] / ips["teacher_per_batch"],
        "imagenet_epoch_hours": {
            "teacher_per_batch": IMAGENET_TRAIN_IMAGES / ips["teacher_per_batch"] / 3600,
            "from_cache_first_epoch": cache_hours + IMAGENET_TRAIN_IMAGES / ips["from_cache"] / 3600,
            "from_cache_later_epochs": IMAGENET_TRAIN_IMAGES / ips["from_cache"] / 3600,
        },
    }
    if budgets:  # the elastic step's time as a multiple of the dedicated one's (the cost target: <= 1.5x)
        report["elastic_cost"] = {
            "teacher_per_batch": ips["teacher_per_batch"] / ips["elastic_per_batch"],
            "from_cache": ips["from_cache"] / ips["elastic_from_cache"],
        }
    write_results(args.out_dir, args.name, report, to_markdown(report))
    print(to_markdown(report))
    return 0


def to_markdown(report: dict) -> str:
    ips, hours = report["images_per_s"], report["imagenet_epoch_hours"]
    lines = [
        "# Bootstrapping throughput",
        "",
        f"- Machine: {report['machine']}; {'bf16 autocast' if report['bf16'] else 'fp32'}.",
        f"- Teacher `{report['teacher']}` → SparseFormer with {report['student_latent_tokens']} latent tokens "
        f"({report['trainable_params'] / 1e6:.1f} M trainable parameters); global batch {report['batch_size']}, "
        f"region term at weight {report['region_distill_weight']}; medians of {report['steps']} steps, random "
        "images already on the device (no image decoding).",
        "",
        "| mode | images/s | one ImageNet-1k epoch (1.28 M images) |",
        "|---|---:|---:|",
        f"| teacher per batch | {ips['teacher_per_batch']:.1f} | {hours['teacher_per_batch']:.2f} h |",
        f"| from the teacher cache | {ips['from_cache']:.1f} | {hours['from_cache_later_epochs']:.2f} h "
        f"(first epoch, building the cache too: {hours['from_cache_first_epoch']:.2f} h) |",
        f"| teacher forward alone (the cache's cost) | {ips['teacher_forward']:.1f} | |",
        "",
        f"The cache makes a step {report['cache_speedup']:.2f}× faster.",
    ]
    if report.get("budgets"):
        cost = report["elastic_cost"]
        lines += [
            "",
            f"One elastic student for {report['budgets']} latent tokens (each step the smallest and the largest, "
            "every other step one between, as `bootstrap --budgets` trains it; two steps averaged), against the "
            "dedicated student above:",
            "",
            "| mode | elastic images/s | elastic step ÷ dedicated step |",
            "|---|---:|---:|",
            f"| teacher per batch | {ips['elastic_per_batch']:.1f} | {cost['teacher_per_batch']:.2f}× |",
            f"| from the teacher cache | {ips['elastic_from_cache']:.1f} | {cost['from_cache']:.2f}× |",
        ]
    if report["device"] == "cpu":
        lines += ["", "CPU times depend on the shared machine; compare the ratio."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
