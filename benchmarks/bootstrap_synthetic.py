"""Bootstrapping on the synthetic world: zero-shot retention at N = 1/4 and 1/9 of the teacher's patch tokens,
and student training throughput with and without the teacher cache.

    uv run python benchmarks/bootstrap_synthetic.py --teacher runs/sw/teacher --world runs/sw/train_default

(the teacher and world of `uv run python benchmarks/synthetic_world.py --work runs/sw`). A budget N counts latent
tokens, the tokens the VLM benchmark gives the LLM (`--num-latent-tokens N`); the student also has the CLS token.
N = 1/4 and 1/9 of a 196-token teacher are 49 and 16: square numbers, so every latent starts on the RoI grid (a latent
past the largest square starts on the whole image and stays there) and the pooled baseline matches.
Results and their history: benchmarks/README.md.
Writes benchmarks/results/bootstrap_synthetic.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

from results_io import RESULTS, machine, write_results

from bootstrap import train as bootstrap_train
from mllm_sparse_recipes.cli import configure_logging
from mllm_sparse_recipes.defaults import (
    BOOTSTRAP_BATCH_SIZE,
    BOOTSTRAP_LR,
    REGION_DISTILL_WEIGHT,
    bootstrap_settings,
    teacher_spec,
)


def run(args, out: Path, num_latent: int, steps: int, cache: Path | None = None, **settings) -> dict:
    """Bootstrap a student with `num_latent` latent tokens (and the CLS token) into `out`, with further
    `BootstrapSettings` fields `settings`; its report."""
    shutil.rmtree(out, ignore_errors=True)
    if cache is not None:  # teacher targets depend on the teacher and the images only: share one cache
        out.mkdir(parents=True)
        shutil.copy(cache, out / cache.name)
    bootstrap_train.run(
        bootstrap_settings(
            teacher_spec(args.teacher),
            args.world,
            out,
            num_latent,
            steps,
            batch_size=args.batch_size,
            lr=args.lr,
            region_distill_weight=args.region_distill_weight,
            **settings,
        )
    )
    return json.loads((out / "bootstrap_report.json").read_text())


def main(argv: list[str] | None = None) -> int:
    configure_logging()  # the libraries' progress lines, as the command line shows them
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=Path("runs/sw/teacher"))
    parser.add_argument("--world", type=Path, default=Path("runs/sw/train_default"))
    parser.add_argument("--work", type=Path, default=Path("runs/sw/bootstrap"))
    parser.add_argument("--steps", type=int, default=2400, help="per budget; about 15 min at 112 px on 2 cores")
    parser.add_argument("--eval-every", type=int, default=400, help="held-out cosine every this many steps")
    parser.add_argument("--throughput-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=BOOTSTRAP_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=BOOTSTRAP_LR)
    parser.add_argument(
        "--region-distill-weight",
        type=float,
        default=REGION_DISTILL_WEIGHT,
        help="the bootstrap's region term (0: the pooled embedding alone)",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.model = json.loads((args.teacher / "zero_shot.json").read_text())["model"]
    patches = json.loads((args.teacher / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]
    num_patches = (patches["image_size"] // patches["patch_size"]) ** 2
    budgets = {"1/4": num_patches // 4, "1/9": math.isqrt(num_patches // 9) ** 2}

    # Throughput: the same short run with the teacher computed per batch, then from the cache (cache built first).
    no_cache = run(args, args.work / "throughput_no_cache", budgets["1/4"], args.throughput_steps)
    cached = run(args, args.work / "throughput_cache", budgets["1/4"], args.throughput_steps, cache_teacher=True)
    throughput = {
        "without_cache_images_per_s": no_cache["images_per_second_this_run"],
        "with_cache_images_per_s": cached["images_per_second_this_run"],
    }
    throughput["speedup"] = throughput["with_cache_images_per_s"] / throughput["without_cache_images_per_s"]

    results = {}
    for fraction, latent in budgets.items():
        report = run(
            args,
            args.work / f"n{latent}",
            latent,
            args.steps,
            cache_teacher=True,
            eval_every=args.eval_every,
            cache=args.work / "throughput_cache" / "teacher_cache.safetensors",
        )
        results[fraction] = {
            "num_latent_tokens": latent,
            "steps": report["steps"],
            **report["final"],
            "train_seconds": report["train_seconds_this_run"],
            "held_out_cosine_curve": report["evals"],
        }
    report = {
        "machine": machine(),
        "teacher": str(args.teacher),
        "teacher_patch_tokens": num_patches,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "region_distill_weight": args.region_distill_weight,
        "throughput": throughput,
        "results": results,
    }
    lines = [
        "# Bootstrapping on the synthetic world",
        "",
        f"Machine: {report['machine']}. Teacher: `{args.model}` "
        f"({num_patches} patch tokens). {args.steps} steps of {args.batch_size}, region term weight "
        f"{args.region_distill_weight}.",
        "",
        "| budget | latent tokens (+ CLS) | teacher top-1 | student top-1 | retention | held-out cosine "
        "| GFLOPs (student / teacher) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for fraction, row in results.items():
        z = row["zero_shot"]
        retention = "n/a" if z["retention"] is None else f"{z['retention'] * 100:.1f}%"
        lines.append(
            f"| {fraction} | {row['num_latent_tokens']} | {z['teacher'] * 100:.1f}% | {z['student'] * 100:.1f}% | "
            f"{retention} | {row['held_out_cosine']:.3f} | {row['student_gflops']:.2f} / "
            f"{row['teacher_gflops']:.2f} |"
        )
    lines += [
        "",
        f"Student training throughput: {throughput['without_cache_images_per_s']:.1f} images/s with the "
        f"teacher run per batch, {throughput['with_cache_images_per_s']:.1f} images/s from the teacher cache "
        f"({throughput['speedup']:.2f}×).",
    ]
    write_results(args.out_dir, "bootstrap_synthetic", report, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
