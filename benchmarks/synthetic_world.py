"""The synthetic world and its CLIP teacher: generation speed, teacher training, and what difficulty does.

    uv run python benchmarks/synthetic_world.py                      # trains a 10-minute teacher (about 15 min)
    uv run python benchmarks/synthetic_world.py --teacher DIR        # reuse a trained teacher

Measures, in one run:
  - generation speed (images/s at 224 px, all cores) and scene statistics for each difficulty;
  - teacher training time and throughput on the default world;
  - the teacher's zero-shot top-1 on each difficulty's test split, and a CLIP probe of every question type
    (answer choices ranked by the image embedding), by type and by the size of the object asked about.
Writes benchmarks/results/synthetic_world.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import open_clip
from results_io import RESULTS, machine, write_results

import bootstrap
from bootstrap import train_teacher
from bootstrap.zero_shot import question_probe_report, zero_shot_report
from mllm_sparse.files import read_jsonl
from mllm_sparse.synth import generate_world
from mllm_sparse.synth.dataset import SyntheticWorld
from mllm_sparse.synth.world import DIFFICULTIES
from mllm_sparse_recipes.cli import configure_logging


def scene_stats(root: Path) -> dict:
    scenes = read_jsonl(root / "scenes.jsonl")
    objects = [o for s in scenes for o in s["objects"]]
    return {
        "objects_per_image": sum(len(s["objects"]) for s in scenes) / len(scenes),
        "small_object_fraction": sum(o["size"] == "small" for o in objects) / len(objects),
    }


def to_markdown(report: dict) -> str:
    lines = [
        "# Synthetic world and teacher",
        "",
        f"Machine: {report['machine']}",
        "",
        "## Generation (224 px)",
        "",
        "| difficulty | images/s | objects/image | small objects |",
        "|---|---:|---:|---:|",
    ]
    for d, row in report["generation"].items():
        lines.append(
            f"| {d} | {row['images_per_second']:.0f} | {row['objects_per_image']:.2f} | "
            f"{row['small_object_fraction'] * 100:.0f}% |"
        )
    t = report["teacher"]
    lines += [
        "",
        "## Teacher",
        "",
        f"- `{t['model']}` trained on the default world ({t['train_images']} images): "
        f"{t['steps']} steps of {t['batch_size']} in {t['train_seconds']:.0f} s ({t['images_per_second']} images/s)",
        "",
        "## Accuracy by difficulty (teacher trained on default)",
        "",
        "| difficulty | zero-shot top-1 | "
        + " | ".join(f"probe: {q}" for q in report["question_types"])
        + " | probe: small objects |",
        "|---|---:|" + "---:|" * (len(report["question_types"]) + 1),
    ]
    for d, row in report["accuracy"].items():
        probe = row["probe"]
        cells = [
            f"{probe['by_type'][q]['accuracy'] * 100:.1f}%" if q in probe["by_type"] else "-"
            for q in report["question_types"]
        ]
        small = probe["by_target_size"].get("small", {}).get("accuracy")
        lines.append(
            f"| {d} | **{row['zero_shot_top1'] * 100:.1f}%** | "
            + " | ".join(cells)
            + f" | {'-' if small is None else f'{small * 100:.1f}%'} |"
        )
    chance = report["accuracy"]["default"]["probe"]["chance"]
    lines += [
        "",
        "Chance level of each probe: " + ", ".join(f"{q} {v * 100:.1f}%" for q, v in chance.items()) + ".",
        "The probe ranks each question's answer choices by CLIP similarity to the image; it measures what the "
        "embedding alone knows, before any LLM.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    configure_logging()  # the libraries' progress lines, as the command line shows them
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/benchmark_synthetic_world"))
    parser.add_argument("--teacher", type=Path, help="a trained teacher folder (skips training)")
    parser.add_argument("--model", default="synth-vit-t-8")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--train-images", type=int, default=15000)
    parser.add_argument("--speed-images", type=int, default=2000)
    parser.add_argument("--eval-images", type=int, default=3000, help="per difficulty; 10% form the test split")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    bootstrap.register_teacher_configs()

    generation = {}
    for difficulty in DIFFICULTIES:
        root = args.work / f"speed_{difficulty}"
        shutil.rmtree(root, ignore_errors=True)
        world = generate_world(root, args.speed_images, 224, seed=1, difficulty=difficulty, progress=False)
        generation[difficulty] = {
            "images_per_second": args.speed_images / world["generation_seconds"],
            **scene_stats(root),
        }
        shutil.rmtree(root)
        print(difficulty, generation[difficulty], flush=True)

    train_root = args.work / "train_default"
    if not (train_root / "world.json").is_file():
        generate_world(train_root, args.train_images, 224, seed=0, difficulty="default")
    teacher_dir = args.teacher or args.work / "teacher"
    if args.teacher is None:
        train_teacher.run(
            train_teacher.TeacherSettings(data=train_root, out=teacher_dir, model=args.model, minutes=args.minutes)
        )
    trained = json.loads((teacher_dir / "zero_shot.json").read_text())
    model_name = trained["model"]
    model = open_clip.create_model(model_name, pretrained=str(teacher_dir / "open_clip_model.safetensors")).eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    size = model.visual.image_size
    image_size = size[0] if isinstance(size, tuple) else size

    accuracy = {}
    for difficulty in DIFFICULTIES:
        root = args.work / f"eval_{difficulty}"
        if not (root / "world.json").is_file():
            generate_world(root, args.eval_images, 224, seed=2, difficulty=difficulty, progress=False)
        world = SyntheticWorld(root)
        zero_shot = zero_shot_report(model, tokenizer, world, "test", image_size, "cpu")
        probe = question_probe_report(model, tokenizer, world, "test", image_size, "cpu")
        accuracy[difficulty] = {"zero_shot_top1": zero_shot["top1"], "zero_shot": zero_shot, "probe": probe}
        print(difficulty, f"zero-shot {zero_shot['top1']:.3f}", f"probe {probe['overall']:.3f}", flush=True)

    report = {
        "machine": machine(),
        "generation": generation,
        "teacher": {
            **{k: trained[k] for k in ("model", "steps", "batch_size", "train_seconds", "images_per_second")},
            "train_images": int(args.train_images * 0.8),
            "zero_shot_default_train_world": trained["top1"],
        },
        "question_types": sorted(accuracy["default"]["probe"]["by_type"]),
        "accuracy": accuracy,
    }
    write_results(args.out_dir, "synthetic_world", report, to_markdown(report))
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
