"""`mllm-sparse quickstart`: the whole pipeline, end to end, on the built-in synthetic world.

    mllm-sparse quickstart                              # ~30 min on 2 CPU cores; a laptop is faster
    mllm-sparse quickstart --plan smoke --out runs/qs   # ~1 min: checks every stage runs, learns nothing

Stages, each the command a user would run (its `main(argv)`), each writing its own folder under `--out`:

  1. world     `mllm-sparse synth`             scenes, captions, labels, LLaVA conversations
  2. teacher   `mllm-sparse train-teacher`     a small open_clip CLIP trained on the captions (196 patch tokens)
  3. encoder   `mllm-sparse bootstrap`         a SparseFormer with N latent tokens (default 16) from the teacher
  4. llm       `mllm-sparse pretrain-llm`      a tiny Llama taught the world's QA on ground-truth object tokens
  5. vlm       `mllm-sparse build-vlm`         stock LLaVA: the SparseFormer tower + mlp2x_gelu projector + the LLM
  6. stage1    `scripts/train_vlm.py`          the projector, the LLM frozen (LLaVA's stage 1)
  7. stage2    `scripts/train_vlm.py`          the LLM and the projector (LLaVA's stage 2)
  8. eval      `mllm-sparse eval-vlm`          accuracy by question type and object size, against the
                                               question-only prior; encode / prefill / decode timing
  9. show      where the tokens look on test images (`rois.png`) and a short chat with the final model

A finished stage is not run again, so an interrupted quickstart continues where it stopped (the bootstrap and the
LLM's pretraining from their last checkpoint). The settings are saved with the run; rerunning into the same `--out`
with other settings is refused, naming them. `OUT/quickstart.{json,md}` summarise every stage: its output, its time
and what it reached; the Markdown ends with the commands to go on from here.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mllm_sparse.files import atomic_path, read_json, write_json

from . import recipe

SETTINGS_FILE = "quickstart_settings.json"
TIMES_FILE = "quickstart_times.json"
REPORT_NAME = "quickstart"


@dataclass(frozen=True)
class Plan:
    """How big each stage is."""

    num_images: int  # the world; 80% train, 10% val, 10% test
    teacher_steps: int  # of 32 images
    bootstrap_steps: int  # of 64 images
    llm_question_steps: int  # scene pretraining, phase 1: batches of 64 single questions
    llm_record_steps: int  # phase 2: batches of 16 whole conversations
    vlm_epochs: float  # of llava_train.json, for each of the two stages
    eval_records: int  # test conversations scored (0: all)


PLANS = {
    # Every stage at a size where it learns: the teacher's zero-shot accuracy, the encoder's retention of it, the
    # LLM's lookup of objects and the VLM's gain over the question-only prior are all visible (README § Quickstart).
    "laptop": Plan(
        num_images=8000,
        teacher_steps=1200,
        bootstrap_steps=1200,
        llm_question_steps=1750,
        llm_record_steps=500,
        vlm_epochs=1.0,
        eval_records=300,
    ),
    # Every stage for a few steps: checks an installation end to end in about a minute; the numbers mean nothing.
    "smoke": Plan(
        num_images=100,
        teacher_steps=3,
        bootstrap_steps=3,
        llm_question_steps=3,
        llm_record_steps=2,
        vlm_epochs=0.25,
        eval_records=4,
    ),
}
SHOW_IMAGES = 4  # test images with their RoIs drawn


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm-sparse quickstart", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="where every stage's folder goes")
    parser.add_argument("--plan", choices=sorted(PLANS), default="laptop", help="stage sizes (flags below override)")
    parser.add_argument("--num-latent-tokens", type=int, default=16, help="the encoder's token budget (the LLM's N)")
    for field in dataclasses.fields(Plan):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=float if field.type == "float" else int, help=f"default: the plan's ({flag})")
    parser.add_argument(
        "--llm", type=Path, help="a causal LM folder to use instead of pretraining one (stage 4 is then skipped)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return parser


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that decides what the stages produce (the plan with its overrides applied)."""
    plan = PLANS[args.plan]
    sizes = {f.name: getattr(args, f.name) if getattr(args, f.name) is not None else getattr(plan, f.name)
             for f in dataclasses.fields(Plan)}  # fmt: skip
    for name, value in sizes.items():
        if value < 0 or (value == 0 and name != "eval_records"):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if sizes["num_images"] < 10:
        raise ValueError(f"--num-images must be at least 10 (every split needs images), got {sizes['num_images']}")
    if args.num_latent_tokens < 1:
        raise ValueError(f"--num-latent-tokens must be positive, got {args.num_latent_tokens}")
    if args.llm is not None and not (args.llm / "config.json").is_file():
        raise FileNotFoundError(f"--llm {args.llm}: no config.json there (a causal LM folder is expected)")
    return {
        "plan": args.plan,
        **sizes,
        "num_latent_tokens": args.num_latent_tokens,
        "llm": None if args.llm is None else str(args.llm),
        "seed": args.seed,
    }


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Save the settings of a new run; refuse to continue a run made with other settings."""
    path = out / SETTINGS_FILE
    if not path.is_file():
        write_json(path, settings)
        return
    before = read_json(path)
    changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
    if changed:
        listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(
            f"{out} holds a quickstart made with other settings ({listed}); its finished stages would not match. "
            f"Use another --out, or the same settings to continue it."
        )


class Stages:
    """Runs each stage unless its output is already there, and keeps every stage's time in OUT/quickstart_times.json
    (so a continued run still reports the time of stages finished before)."""

    def __init__(self, out: Path):
        self.out = out
        self.times: dict[str, float] = read_json(out / TIMES_FILE) if (out / TIMES_FILE).is_file() else {}

    def run(self, name: str, done: Path, command: Callable[[], Any]) -> None:
        if done.exists():
            print(f"[quickstart] {name}: done earlier ({done})", flush=True)
            return
        print(f"[quickstart] {name} ...", flush=True)
        start = time.perf_counter()
        command()
        if not done.exists():
            raise RuntimeError(f"quickstart stage {name!r} finished without writing {done}")
        self.times[name] = round(time.perf_counter() - start, 1)
        write_json(self.out / TIMES_FILE, self.times)
        print(f"[quickstart] {name}: {self.times[name]:.0f} s", flush=True)


def resume_flag(folder: Path) -> list[str]:
    """`--resume` where a stage left checkpoints behind."""
    from mllm_sparse.training import latest_checkpoint

    return ["--resume"] if latest_checkpoint(folder) is not None else []


def run_pipeline(args: argparse.Namespace, s: dict[str, Any]) -> dict[str, Path]:
    """Stages 1-8; the folder of each."""
    from bootstrap import train as bootstrap_train
    from bootstrap import train_teacher
    from mllm_sparse.synth import cli as synth_cli

    from . import evaluate, pretrain_llm, train
    from .build_vlm import main as build_vlm_main

    out, seed = args.out, str(args.seed)
    threads = [] if args.threads is None else ["--threads", str(args.threads)]
    paths = {
        name: out / name for name in ("world", "teacher", "encoder", "llm", "vlm", "stage1", "stage2", "eval", "show")
    }
    if args.llm is not None:
        paths["llm"] = args.llm
    stages = Stages(out)
    world = paths["world"]
    stages.run(
        "world",
        world / "world.json",
        lambda: synth_cli.main(
            ["--out", str(world), "--num-images", str(s["num_images"]), "--seed", seed, "--overwrite"]
        ),
    )
    stages.run(
        "teacher",
        paths["teacher"] / "zero_shot.json",
        lambda: train_teacher.main(
            [
                "--data",
                str(world),
                "--out",
                str(paths["teacher"]),
                "--steps",
                str(s["teacher_steps"]),
                "--seed",
                seed,
                *threads,
            ]
        ),  # fmt: skip
    )
    encoder = paths["encoder"]
    stages.run(
        "encoder",
        encoder / "bootstrap_report.json",
        lambda: bootstrap_train.main(
            recipe.bootstrap_arguments(
                paths["teacher"],
                world,
                encoder,
                s["num_latent_tokens"],
                s["bootstrap_steps"],
                "--cache-teacher",
                "--save-every",
                str(max(1, s["bootstrap_steps"] // 4)),
                "--seed",
                seed,
                *resume_flag(encoder),
            )
        ),  # fmt: skip
    )
    if args.llm is None:
        llm = paths["llm"]
        total = s["llm_question_steps"] + s["llm_record_steps"]
        stages.run(
            "llm",
            llm / f"{pretrain_llm.REPORT_NAME}.json",
            lambda: pretrain_llm.main(
                [
                    "--data",
                    str(world),
                    "--out",
                    str(llm),
                    "--question-steps",
                    str(s["llm_question_steps"]),
                    "--record-steps",
                    str(s["llm_record_steps"]),
                    "--eval-every",
                    str(min(500, total)),
                    "--seed",
                    seed,
                    *threads,
                    *resume_flag(llm),
                ]
            ),  # fmt: skip
        )
    stages.run(
        "vlm",
        paths["vlm"] / "config.json",
        lambda: build_vlm_main(
            [
                "--encoder",
                str(encoder),
                "--llm",
                str(paths["llm"]),
                "--projector",
                "mlp2x_gelu",
                "--out",
                str(paths["vlm"]),
                "--seed",
                seed,
            ]
        ),  # fmt: skip
    )
    for stage, start, lr, projector_lr in (
        ("stage1", paths["vlm"], 0.0, recipe.STAGE1_PROJECTOR_LR),
        ("stage2", paths["stage1"], recipe.STAGE2_LR, recipe.STAGE2_LR),
    ):
        stages.run(
            stage,
            paths[stage] / "config.json",
            lambda start=start, stage=stage, lr=lr, projector_lr=projector_lr: train.main(
                recipe.train_vlm_arguments(
                    start, paths[stage], world, s["vlm_epochs"], lr, projector_lr, seed=args.seed
                )
            ),
        )
    stages.run(
        "eval",
        paths["eval"] / evaluate.JSON_NAME,
        lambda: evaluate.main(recipe.eval_vlm_arguments(paths["stage2"], world, paths["eval"], s["eval_records"])),
    )
    show_dir = paths["show"]
    stages.run("show", show_dir / "show.json", lambda: show(paths["encoder"], paths["stage2"], world, show_dir))
    return paths


def test_records(world: Path) -> list[dict]:
    return [r for r in read_json(world / "llava_test.json") if "image" in r]


@torch.no_grad()
def show(encoder_dir: Path, model_dir: Path, world: Path, out: Path) -> None:
    """`rois.png`: the encoder's final RoIs on the first test images, side by side; `show.json`: a short chat with the
    final model about the first of them (its answers next to the gold ones)."""
    from mllm_sparse.images import denormalize, load_image, preprocess
    from mllm_sparse.modeling import SparseFormerModel
    from mllm_sparse.visualize import draw_rois

    from .chat import ChatEngine

    records = test_records(world)[:SHOW_IMAGES]
    encoder = SparseFormerModel.from_pretrained(encoder_dir).eval()
    config = encoder.config
    pixels = torch.stack(
        [preprocess(load_image(world / r["image"]), config.image_size, config.image_mean, config.image_std)
         for r in records]
    )  # fmt: skip
    output = encoder(pixels)
    size = 2 * config.image_size  # drawn larger than the encoder's input so that small RoIs stay visible
    panels = [
        draw_rois(denormalize(pixels[i], config.image_mean, config.image_std).resize((size, size)), output, index=i)
        for i in range(len(records))
    ]
    gap = 8
    sheet = Image.new("RGB", ((size + gap) * len(panels) - gap, size), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * (size + gap), 0))
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "rois.png") as tmp:
        sheet.save(tmp, format="PNG")

    engine = ChatEngine.from_pretrained(model_dir, template=recipe.TEMPLATE)
    record = records[0]
    turns = record["conversations"]
    chat = []
    for human, gpt in list(zip(turns[0::2], turns[1::2], strict=False))[:3]:
        question = human["value"].replace("<image>", "").strip()
        reply = engine.chat(question, world / record["image"] if not chat else None, max_new_tokens=8)
        chat.append({"question": question, "answer": reply.text.strip(), "gold": gpt["value"]})
    write_json(out / "show.json", {"image": str(world / record["image"]), "rois": [r["image"] for r in records],
                                   "chat": chat})  # fmt: skip


def summarise(args: argparse.Namespace, s: dict[str, Any], paths: dict[str, Path]) -> dict[str, Any]:
    """What each stage reached, read from the reports the stages wrote."""
    from .evaluate import question_only_prior

    times = read_json(args.out / TIMES_FILE)
    world = read_json(paths["world"] / "world.json")
    teacher = read_json(paths["teacher"] / "zero_shot.json")
    encoder = read_json(paths["encoder"] / "bootstrap_report.json")["final"]
    evaluation = read_json(paths["eval"] / "eval_vlm.json")
    prior = question_only_prior(paths["world"] / "llava_train.json", evaluation["predictions"])
    llm_report = paths["llm"] / "scene_pretrain.json"
    llm = read_json(llm_report)["final"] if llm_report.is_file() else None
    return {
        "settings": s,
        "folders": {k: str(v) for k, v in paths.items()},
        "seconds": times,
        "world": {"splits": world["splits"], "image_size": world.get("image_size")},
        "teacher": {"model": teacher["model"], "zero_shot_top1": teacher["top1"], "steps": teacher["steps"]},
        "encoder": {
            "latent_tokens": s["num_latent_tokens"],
            "zero_shot": encoder.get("zero_shot"),
            "held_out_cosine": encoder.get("held_out_cosine"),
            "gflops": encoder["student_gflops"],
            "teacher_gflops": encoder["teacher_gflops"],
            "teacher_tokens": encoder["teacher_tokens"],
        },
        "llm": None if llm is None else {"accuracy": llm["accuracy"], "by_type": llm["by_type"]},
        "vlm": {
            "image_tokens": evaluation["throughput"]["num_image_tokens"],
            "accuracy": evaluation["accuracy"],
            "answers": evaluation["num_answers"],
            "by_type": {k: v["accuracy"] for k, v in evaluation["by_type"].items()},
            "by_target_size": {k: v["accuracy"] for k, v in evaluation["by_target_size"].items()},
            "prior": {
                "accuracy": prior["accuracy"],
                "by_type": {k: v["accuracy"] for k, v in prior["by_type"].items()},
                "by_target_size": {k: v["accuracy"] for k, v in prior["by_target_size"].items()},
            },
            "throughput": {
                k: evaluation["throughput"][k]
                for k in ("device", "encode_ms_per_image", "mean_prefill_s", "answers_per_s")
                if k in evaluation["throughput"]
            },
        },
        "show": read_json(paths["show"] / "show.json"),
    }


def to_markdown(r: dict[str, Any]) -> str:
    s, t, enc, vlm = r["settings"], r["seconds"], r["encoder"], r["vlm"]
    folders = r["folders"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def secs(stage: str) -> str:
        return f"{t[stage]:.0f}" if stage in t else "n/a"

    zero_shot = enc["zero_shot"] or {}
    sizes = [k for k in ("small", "medium", "large") if k in vlm["by_target_size"]]
    first_question = r["show"]["chat"][0]["question"]
    llm = r["llm"]
    rows = [
        ("world", f"{sum(v['images'] for v in r['world']['splits'].values())} images, "
                  f"{r['world']['splits']['train']['records']} training conversations"),
        ("teacher", f"`{r['teacher']['model']}`, zero-shot top-1 {pct(r['teacher']['zero_shot_top1'])} over the 48 "
                    f"classes"),
        ("encoder", f"SparseFormer, {enc['latent_tokens']} latent tokens (teacher: {enc['teacher_tokens']}); zero-shot "
                    f"{pct(zero_shot.get('student'))} (retention {pct(zero_shot.get('retention'))}), held-out cosine "
                    + ("n/a" if enc["held_out_cosine"] is None else f"{enc['held_out_cosine']:.3f}")),
        ("llm", "given (--llm)" if llm is None else f"scene-pretrained tiny Llama, {llm['accuracy']:.1f}% on the test "
                f"questions given ground-truth object tokens"),
        ("vlm", f"LLaVA: {vlm['image_tokens']} image tokens, mlp2x_gelu projector"),
        ("stage1", "projector trained, LLM frozen"),
        ("stage2", "LLM and projector trained"),
        ("eval", f"**{pct(vlm['accuracy'])}** of {vlm['answers']} answers (question-only prior "
                 f"{pct(vlm['prior']['accuracy'])})"),
        ("show", "`rois.png`, a chat (below)"),
    ]  # fmt: skip
    lines = [
        f"# Quickstart (`--plan {s['plan']}`)",
        "",
        "| stage | folder | seconds | result |",
        "|---|---|---:|---|",
        *[f"| {name} | `{folders[name]}` | {secs(name)} | {text} |" for name, text in rows],
        "",
        f"Total: {sum(t.values()) / 60:.1f} min.",
        "",
        "## The VLM, by question",
        "",
        "| | all | " + " | ".join(vlm["by_type"]) + " | " + " | ".join(f"{k} objects" for k in sizes) + " |",
        "|---|---:|" + "---:|" * (len(vlm["by_type"]) + len(sizes)),
        *[
            f"| {name} | {pct(row['accuracy'])} | "
            + " | ".join(pct(row["by_type"].get(k)) for k in vlm["by_type"])
            + " | "
            + " | ".join(pct(row["by_target_size"].get(k)) for k in sizes)
            + " |"
            for name, row in (("VLM", vlm), ("question-only prior", vlm["prior"]))
        ],
        "",
        "The prior answers each question with its most frequent training answer: above it, the VLM reads the image.",
        "",
        f"## A chat about `{r['show']['image']}`",
        "",
        *[f"- *{c['question']}* → **{c['answer'] or '(nothing)'}** (gold: {c['gold']})" for c in r["show"]["chat"]],
        "",
        "## From here",
        "",
        "```bash",
        f"uv run mllm-sparse inspect {folders['encoder']} --image {r['show']['image']} --points --out roi.png",
        f"uv run mllm-sparse eval-vlm --model {folders['stage2']} --data {folders['world']}/llava_test.json "
        f"--image_folder {folders['world']} --template {recipe.TEMPLATE}",
        "```",
        "",
        "```python",
        "from llava_adapter.chat import ChatEngine",
        f'engine = ChatEngine.from_pretrained("{folders["stage2"]}", template="{recipe.TEMPLATE}")',
        f'print(engine.chat("{first_question}", image="{r["show"]["image"]}").text)',
        "```",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_of(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    check_settings(args.out, settings)
    paths = run_pipeline(args, settings)
    report = summarise(args, settings, paths)
    markdown = to_markdown(report)
    write_json(args.out / f"{REPORT_NAME}.json", report)
    with atomic_path(args.out / f"{REPORT_NAME}.md") as tmp:
        tmp.write_text(markdown)
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
