"""What `mllm-sparse quickstart` runs: the whole pipeline, end to end, on the built-in synthetic world.

`run(QuickstartSettings(...))` runs (or continues) the nine stages into one folder: world, teacher, encoder, llm,
vlm, stage1, stage2, eval, show (`mllm_sparse_recipes/commands/quickstart.py` describes them). A stage counts as
finished once it has returned (`OUT/.done/STAGE`); the settings are saved with the run and a rerun may change only
those of unfinished stages; a new run refuses an `--out` that holds stage folders it did not make.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mllm_sparse.files import atomic_path, paths_as_paths, read_json, write_json
from mllm_sparse.images import load_image

from . import defaults
from .plans import PLANS, Plan
from .stages import Stages, guard_settings

SETTINGS_FILE = "quickstart_settings.json"
REPORT_NAME = "quickstart"


SHOW_IMAGES = 4  # test images with their RoIs drawn


@dataclass
class QuickstartSettings:
    """What `mllm-sparse quickstart` runs: one field per option of the command. The stage sizes left None take the
    plan's (`mllm_sparse_recipes.plans.PLANS`)."""

    out: Path = Path("runs/quickstart")
    plan: str = "laptop"
    num_latent_tokens: int = 16
    num_images: int | None = None
    teacher_steps: int | None = None
    bootstrap_steps: int | None = None
    llm_question_steps: int | None = None
    llm_record_steps: int | None = None
    stage1_epochs: float | None = None
    stage2_epochs: float | None = None
    eval_records: int | None = None
    llm: Path | None = None
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        paths_as_paths(self)


STAGES = ("world", "teacher", "encoder", "llm", "vlm", "stage1", "stage2", "eval", "show")
# Each setting and the first stage whose output it decides (every later stage builds on that one).
SETTING_STAGE = {
    "num_images": "world",
    "seed": "world",
    "teacher_steps": "teacher",
    "bootstrap_steps": "encoder",
    "num_latent_tokens": "encoder",
    "llm_question_steps": "llm",
    "llm_record_steps": "llm",
    "llm": "llm",
    "stage1_epochs": "stage1",
    "stage2_epochs": "stage2",
    "eval_records": "eval",
}


def settings_of(args: QuickstartSettings) -> dict[str, Any]:
    """Everything that decides what the stages produce: the plan's sizes with the flags' overrides applied."""
    from mllm_sparse.synth.generate import split_of

    plan = PLANS[args.plan]
    sizes = {f.name: getattr(args, f.name) if getattr(args, f.name) is not None else getattr(plan, f.name)
             for f in dataclasses.fields(Plan)}  # fmt: skip
    for name, value in sizes.items():
        if value < 0 or (value == 0 and name != "eval_records"):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    train_images = sum(split_of(i, sizes["num_images"]) == "train" for i in range(sizes["num_images"]))
    if train_images < defaults.BOOTSTRAP_BATCH_SIZE:
        raise ValueError(
            f"--num-images {sizes['num_images']} leaves {train_images} training images, fewer than the bootstrap's "
            f"batch of {defaults.BOOTSTRAP_BATCH_SIZE}; use at least 80"
        )
    for flag, value in (("--num-latent-tokens", args.num_latent_tokens), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be positive, got {value}")
    if args.llm is not None and not (args.llm / "config.json").is_file():
        raise FileNotFoundError(f"--llm {args.llm}: no config.json there (a causal LM folder is expected)")
    return {
        **sizes,
        "num_latent_tokens": args.num_latent_tokens,
        "llm": None if args.llm is None else str(args.llm.resolve()),
        "seed": args.seed,
    }


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Save the settings of a new run, or of a continued one whose changes touch only unfinished stages; refuse the
    rest, naming the settings."""
    stages = Stages(out, "quickstart")

    def blocked(key: str) -> str | None:
        done = [name for name in STAGES[STAGES.index(SETTING_STAGE[key]) :] if stages.is_done(name)]
        return f"stage {done[0]} is done" if done else None

    path = out / SETTINGS_FILE
    if path.is_file() and "vlm_epochs" in (recorded := read_json(path)):  # a run from before the stages' own epochs
        epochs = recorded.pop("vlm_epochs")
        write_json(path, {**recorded, "stage1_epochs": epochs, "stage2_epochs": epochs})
    before = guard_settings(path, settings, "quickstart", blocked, [out / name for name in STAGES])
    if before != settings:
        write_json(path, settings)


def run_pipeline(args: QuickstartSettings, s: dict[str, Any]) -> dict[str, Path]:
    """Every stage, in order; the folder of each."""
    from bootstrap import train as bootstrap_train
    from bootstrap import train_teacher
    from llava_adapter import evaluate, train
    from llava_adapter.build_vlm import BuildVlmSettings
    from llava_adapter.build_vlm import run as build_vlm
    from mllm_sparse.synth import generate as synth
    from mllm_sparse.training import latest_checkpoint

    from . import scene_llm

    out = args.out
    paths = {name: out / name for name in STAGES}
    if args.llm is not None:
        paths["llm"] = args.llm
    world, teacher, encoder, llm, vlm = (paths[k] for k in ("world", "teacher", "encoder", "llm", "vlm"))
    stages = Stages(out, "quickstart")
    # fmt: off
    stages.run("world", world, lambda: synth.run(
        synth.SynthSettings(out=world, num_images=s["num_images"], seed=args.seed)))
    stages.run("teacher", teacher, lambda: train_teacher.run(train_teacher.TeacherSettings(
        data=world, out=teacher, steps=s["teacher_steps"], seed=args.seed, threads=args.threads)))
    stages.run("encoder", encoder, lambda: bootstrap_train.run(defaults.bootstrap_settings(
        defaults.teacher_spec(teacher), world, encoder, s["num_latent_tokens"], s["bootstrap_steps"],
        cache_teacher=True, save_every=max(1, s["bootstrap_steps"] // 4), seed=args.seed,
        resume=latest_checkpoint(encoder) is not None,
    )), resumable=True)
    if args.llm is None:
        stages.run("llm", llm, lambda: scene_llm.run(scene_llm.ScenePretrainSettings(
            data=world, out=llm, question_steps=s["llm_question_steps"], record_steps=s["llm_record_steps"],
            eval_every=min(500, s["llm_question_steps"] + s["llm_record_steps"]), seed=args.seed,
            threads=args.threads, resume=latest_checkpoint(llm) is not None)), resumable=True)
    stages.run("vlm", vlm, lambda: build_vlm(BuildVlmSettings(
        encoder=str(encoder), llm=str(llm), out=vlm, projector="mlp2x_gelu", seed=args.seed)))
    train_data = world / "llava_train.json"
    stages.run("stage1", paths["stage1"], lambda: train.run(*defaults.train_vlm_settings(
        vlm, paths["stage1"], train_data, world, s["stage1_epochs"], 0.0, defaults.STAGE1_PROJECTOR_LR,
        seed=args.seed)),
        resumable=True, inputs=("world", "vlm"))
    stages.run("stage2", paths["stage2"], lambda: train.run(*defaults.train_vlm_settings(
        paths["stage1"], paths["stage2"], train_data, world, s["stage2_epochs"], defaults.STAGE2_LR, defaults.STAGE2_LR,
        seed=args.seed)), resumable=True, inputs=("stage1",))
    stages.run("eval", paths["eval"], lambda: evaluate.run(
        defaults.eval_vlm_settings(paths["stage2"], world / "llava_test.json", world, paths["eval"],
                                   s["eval_records"])))
    stages.run("show", paths["show"], lambda: show(paths["stage2"], world, paths["show"]))
    # fmt: on
    return paths


def test_records(world: Path) -> list[dict]:
    return [r for r in read_json(world / "llava_test.json") if "image" in r]


def show(model_dir: Path, world: Path, out: Path) -> None:
    """`rois.png`: the final model's image-token regions on the first test images, side by side, as the demo draws
    them; `show.json`: a short chat with it about the first image (its answers next to the gold ones)."""
    from llava_adapter.chat import ChatEngine
    from llava_adapter.token_regions import PICTURE_SIDE, model_input, regions_picture

    engine = ChatEngine.from_pretrained(model_dir)
    records = test_records(world)[:SHOW_IMAGES]
    images = [load_image(world / r["image"]) for r in records]
    panels = [regions_picture(engine, i, shown=model_input(engine, i, PICTURE_SIDE)[1]) for i in images]
    gap = 8
    sheet = Image.new("RGB", (sum(p.width + gap for p in panels) - gap, max(p.height for p in panels)), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, (sum(p.width + gap for p in panels[:i]), 0))
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "rois.png") as tmp:
        sheet.save(tmp, format="PNG")

    record = records[0]
    turns = record["conversations"]
    chat = []
    for human, gpt in list(zip(turns[0::2], turns[1::2], strict=False))[:3]:
        question = human["value"].replace("<image>", "").strip()
        reply = engine.chat(question, world / record["image"] if not chat else None, max_new_tokens=8)
        chat.append({"question": question, "answer": reply.text.strip(), "gold": gpt["value"]})
    write_json(out / "show.json", {"image": str(world / record["image"]), "rois": [r["image"] for r in records],
                                   "chat": chat})  # fmt: skip


def summarise(args: QuickstartSettings, s: dict[str, Any], paths: dict[str, Path]) -> dict[str, Any]:
    """What each stage reached, read from the reports the stages wrote (accuracies as fractions)."""
    from llava_adapter import evaluate

    from . import scene_llm

    world = read_json(paths["world"] / "world.json")
    teacher = read_json(paths["teacher"] / "zero_shot.json")
    encoder = read_json(paths["encoder"] / "bootstrap_report.json")["final"]
    evaluation = read_json(paths["eval"] / evaluate.JSON_NAME)
    prior = evaluate.question_only_prior(paths["world"] / "llava_train.json", evaluation["predictions"])
    llm = None
    if args.llm is None:  # pretrain-llm reports in percent
        final = read_json(paths["llm"] / f"{scene_llm.REPORT_NAME}.json")["final"]
        llm = {"accuracy": final["accuracy"] / 100, "by_type": {k: v / 100 for k, v in final["by_type"].items()}}

    def accuracies(report: dict) -> dict[str, Any]:
        return {
            "accuracy": report["accuracy"],
            "by_type": {k: v["accuracy"] for k, v in report["by_type"].items()},
            "by_target_size": {k: v["accuracy"] for k, v in report["by_target_size"].items()},
        }

    throughput = evaluation["throughput"]
    seconds = Stages(args.out, "quickstart").seconds()
    return {
        "plan": args.plan,
        "settings": s,
        "folders": {k: str(v) for k, v in paths.items()},
        "seconds": {k: seconds[k] for k in STAGES if k in seconds},
        "world": {"splits": world["splits"]},
        "teacher": {
            "model": teacher["model"],
            "zero_shot_top1": teacher["top1"],
            "classes": teacher["num_classes"],
            "steps": teacher["steps"],
        },
        "encoder": {
            "latent_tokens": s["num_latent_tokens"],
            "zero_shot": encoder.get("zero_shot"),
            "held_out_cosine": encoder.get("held_out_cosine"),
            "gflops": encoder["student_gflops"],
            "teacher_gflops": encoder["teacher_gflops"],
            "teacher_tokens": encoder["teacher_tokens"],
        },
        "llm": llm,
        "vlm": {
            "image_tokens": throughput["num_image_tokens"],
            "answers": evaluation["num_answers"],
            **accuracies(evaluation),
            "prior": accuracies(prior),
            "throughput": {
                k: throughput[k] for k in ("device", "encode_ms_per_image", "mean_prefill_s", "answers_per_s")
            },
        },
        "show": read_json(paths["show"] / "show.json"),
    }


def summary_line(report: dict[str, Any], out: Path) -> str:
    """What the command line prints at the end: the VLM's score beside the prior, the time, and where the report is
    (its tables stay in the file)."""
    vlm, minutes = report["vlm"], sum(report["seconds"].values()) / 60
    accuracy, prior = 100 * vlm["accuracy"], 100 * vlm["prior"]["accuracy"]
    scores = f"{accuracy:.1f}% of the test questions (question-only prior {prior:.1f}%)"
    return (
        f"Quickstart ({report['plan']} plan) done in {minutes:.1f} min: the VLM answers {scores}. "
        f"{prior_verdict(report['plan'], vlm)}\nReport: {out / (REPORT_NAME + '.md')}. Chat with it: uv run "
        f"mllm-sparse demo --model {report['folders']['stage2']}"
    )


def prior_verdict(plan: str, vlm: dict) -> str:
    """What the VLM's score says against the question-only prior, in one sentence a newcomer can trust."""
    if plan == "smoke":
        return ("The smoke plan runs every stage for a few steps to check an install: it learns nothing, so its score "
                "says nothing about the method.")  # fmt: skip
    if vlm["accuracy"] > vlm["prior"]["accuracy"]:
        return "The VLM scores above it: it reads the image."
    return "The VLM does not score above it: it does not read the image yet (train longer, or check the data)."


def to_markdown(r: dict[str, Any]) -> str:
    t, enc, vlm, teacher, folders = r["seconds"], r["encoder"], r["vlm"], r["teacher"], r["folders"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    zero_shot = enc["zero_shot"] or {}
    cosine = "n/a" if enc["held_out_cosine"] is None else f"{enc['held_out_cosine']:.3f}"
    sizes = [k for k in ("small", "medium", "large") if k in vlm["by_target_size"]]
    llm = "given (`--llm`)" if r["llm"] is None else (
        f"scene-pretrained tiny Llama: {pct(r['llm']['accuracy'])} of the test questions given one ground-truth token "
        "per object"
    )  # fmt: skip
    splits = r["world"]["splits"]
    results = {
        "world": f"{sum(v['images'] for v in splits.values())} images, {splits['train']['records']} training "
        "conversations",
        "teacher": f"`{teacher['model']}`: zero-shot top-1 {pct(teacher['zero_shot_top1'])} over {teacher['classes']} "
        "classes",
        "encoder": f"SparseFormer with {enc['latent_tokens']} latent tokens (the teacher ViT has "
        f"{enc['teacher_tokens']}, CLS included): zero-shot {pct(zero_shot.get('student'))}, "
        f"retention {pct(zero_shot.get('retention'))}, held-out cosine {cosine}",
        "llm": llm,
        "vlm": f"stock LLaVA: {vlm['image_tokens']} image tokens, mlp2x_gelu projector",
        "stage1": "the projector trained, the LLM frozen",
        "stage2": "the LLM and the projector trained",
        "eval": f"**{pct(vlm['accuracy'])}** of {vlm['answers']} answers (question-only prior "
        f"{pct(vlm['prior']['accuracy'])})",
        "show": "`rois.png`: where the image tokens look; a chat (below)",
    }
    image, question = r["show"]["image"], r["show"]["chat"][0]["question"]
    lines = [
        f"# Quickstart (`--plan {r['plan']}`)",
        "",
        "| stage | folder | seconds | result |",
        "|---|---|---:|---|",
        *[f"| {k} | `{folders[k]}` | {t[k]:.0f} | {v} |" if k in t else f"| {k} | `{folders[k]}` | n/a | {v} |"
          for k, v in results.items()],
        "",
        f"Total: {sum(t.values()) / 60:.1f} min.",
        "",
        "## The VLM, by question",
        "",
        "| | all | " + " | ".join(vlm["by_type"]) + " | " + " | ".join(f"{k} objects" for k in sizes) + " |",
        "|---|---:|" + "---:|" * (len(vlm["by_type"]) + len(sizes)),
        *[f"| {name} | {pct(row['accuracy'])} | " + " | ".join(pct(row["by_type"].get(k)) for k in vlm["by_type"])
          + " | " + " | ".join(pct(row["by_target_size"].get(k)) for k in sizes) + " |"
          for name, row in (("VLM", vlm), ("question-only prior", vlm["prior"]))],
        "",
        "The prior answers each question with its most frequent training answer. " + prior_verdict(r["plan"], vlm),
        "",
        f"## A chat about `{image}`",
        "",
        *[f"- *{c['question']}* → **{c['answer'] or '(nothing)'}** (gold: {c['gold']})" for c in r["show"]["chat"]],
        "",
        "## From here",
        "",
        "```bash",
        f"uv run mllm-sparse demo --model {folders['stage2']}    # chat in the browser",
        f"uv run mllm-sparse eval-vlm --model {folders['stage2']} --data {folders['world']}/llava_test.json "
        f"--image-folder {folders['world']}",
        f"uv run mllm-sparse inspect {folders['encoder']} --image {image} --points --out roi.png",
        "```",
        "",
        "```python",
        "from llava_adapter.chat import ChatEngine",
        f"engine = ChatEngine.from_pretrained({json.dumps(folders['stage2'])})",
        f"print(engine.chat({json.dumps(question)}, image={json.dumps(image)}).text)",
        "```",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def run(args: QuickstartSettings) -> tuple[dict[str, Any], str]:
    """Run (or continue) the quickstart into `args.out`; its report and the report's Markdown, both also written to
    OUT/quickstart.{json,md}."""
    if args.plan not in PLANS:
        raise ValueError(f"unknown plan {args.plan!r}; the plans: {', '.join(sorted(PLANS))}")
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
    return report, markdown
