"""`mllm-sparse ablate`: how many image tokens does the LLM need, and are a SparseFormer's better than pooling's?

    mllm-sparse ablate --world runs/quickstart/world --teacher runs/quickstart/teacher \
        --llm runs/quickstart/llm --budgets 4 16 49 --out runs/ablation
    mllm-sparse ablate --teacher open_clip:ViT-L-14-336@openai --llm lmsys/vicuna-7b-v1.5 --budgets 16 64 \
        --encoders 64=runs/btsp-L --bootstrap-data /data/imagenet/train --train-data llava_mix.json \
        --image-folder /data --test-data test.json --out runs/ablation-L

For each token budget N (`--budgets`, latent tokens the LLM receives) it trains two stock LLaVA models that differ
only in the vision tower, and one more with the teacher's full patch tokens:

  sparseformer-N   a SparseFormer with N latent tokens bootstrapped from the teacher (`--encoders N=DIR`, or
                   bootstrapped here: `--bootstrap-data`, `--bootstrap-steps`), its CLS token dropped as LLaVA drops a
                   ViT's;
  pooled-N         the teacher ViT's patch tokens average-pooled to an n×n grid (N must be square);
  vit              the teacher ViT's full patch tokens, LLaVA-style (`--baselines` drops it or the pooled arms).

Every arm starts from the same LLM (`--llm`) and is trained with the same data, steps and schedule in LLaVA's two
stages (stage 1: the projector, the LLM frozen; stage 2 from it: the LLM and the projector; the tower frozen), then
scored by `eval-vlm` on `--test-data` after each stage. The report (`OUT/ablation.{json,md}`):

- accuracy of every arm after each stage, by question type and by the size of the object asked about, next to the
  question-only prior (each question answered with its most frequent training answer);
- paired differences on the same answers, with 95% cluster-bootstrap intervals over test records
  (`mllm_sparse_recipes.compare`): each SparseFormer against the pooled arm of its N and against the ViT, each
  pooled arm against the ViT;
- vision encode, LLM prefill and time to first token, every trained arm loaded side by side and timed round-robin on
  the same questions (batch 1);
- plots: `ablation_accuracy.png` (accuracy against image tokens, overall and by object size) and
  `ablation_speed.png` (encode, prefill and time to first token against image tokens).

Like the quickstart, a rerun continues where a run stopped (each arm's stages are marked done in
`OUT/arms/ARM/.done/`). The report covers the budgets and baselines of the command that wrote it: to add a budget to
a finished ablation, rerun it with the budget added, and the arms trained before are reused. The training settings are
saved with the run, and each arm records what it was built from (`OUT/arms/ARM/arm.json`); a rerun that would train
an arm differently (other data, LLM, schedule, or another encoder for a budget) is refused, naming the difference. A
rerun with another `--eval-limit` only scores the arms again. `train s` in the tables is the wall time of the
training stages (loading, training, saving).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import statistics
from pathlib import Path
from typing import Any

import torch

from llava_adapter.llms import TINY_LLMS
from mllm_sparse.files import atomic_path, read_json, write_json

from . import defaults
from .stages import Stages, resume_flag

SIZES = ("small", "medium", "large")
SETTINGS_FILE = "ablation_settings.json"
REPORT_NAME = "ablation"
BASELINES = ("vit", "pooled")
VLM_STAGES = ("stage1", "stage2")  # LLaVA's two training stages, in order
# Settings that decide what an arm learns: a rerun into the same --out must keep them (budgets may be added).
TRAINING_SETTINGS = (
    "teacher", "train_data", "image_folder", "test_data", "llm", "bootstrap_data", "bootstrap_steps",
    "stage1_epochs", "stage2_epochs", "batch_size", "lr", "projector_lr", "stage2_lr", "model_max_length",
    "train_args", "seed",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mllm-sparse ablate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--teacher", required=True, help="a `train-teacher` folder or a teacher spec (open_clip:…, hf:…)")
    p.add_argument("--budgets", type=int, nargs="+", required=True, help="latent tokens per arm (square numbers)")
    p.add_argument("--llm", required=True, help="the LLM every arm starts from: a folder, a hub id or a tiny LLM")
    p.add_argument("--world", type=Path, help="a synthetic world: the default for the data arguments below")
    p.add_argument("--train-data", type=Path, help="LLaVA JSON for both stages (default: WORLD/llava_train.json)")
    p.add_argument("--image-folder", type=Path, help="root of the records' images (default: WORLD)")
    p.add_argument("--test-data", type=Path, help="LLaVA JSON to score (default: WORLD/llava_test.json)")
    p.add_argument("--encoders", nargs="*", default=[], help="N=DIR: a bootstrapped SparseFormer for budget N")
    p.add_argument("--bootstrap-data", type=Path, help="images to bootstrap missing encoders on (default: WORLD)")
    p.add_argument("--bootstrap-steps", type=int, default=2400, help="steps of 64 images per missing encoder")
    p.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES))
    p.add_argument("--stage1-epochs", type=float, default=1.0)
    p.add_argument("--stage2-epochs", type=float, default=1.0, help="0: stage 1 only")
    p.add_argument("--batch-size", type=int, default=defaults.VLM_BATCH_SIZE)
    p.add_argument("--lr", type=float, default=0.0, help="stage 1's LLM learning rate (0: frozen, as LLaVA's)")
    p.add_argument("--projector-lr", type=float, default=defaults.STAGE1_PROJECTOR_LR, help="stage 1's projector lr")
    p.add_argument("--stage2-lr", type=float, default=defaults.STAGE2_LR, help="stage 2's lr, LLM and projector")
    p.add_argument("--model-max-length", type=int, default=2048, help="training sequences are truncated to this")
    p.add_argument(
        "--train-args",
        default="",
        help='further `scripts/train_vlm.py` arguments for every stage, e.g. "--bf16 True --gradient_checkpointing '
        'True"',
    )
    p.add_argument("--eval-limit", type=int, help="score only the first N test records (0 or none: all)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="longest answer `eval-vlm` generates")
    p.add_argument(
        "--timing-questions",
        type=int,
        default=32,
        help="questions timed per arm, every arm loaded side by side (0: none)",
    )
    p.add_argument("--tokenizer-corpus", type=Path, help="tiny LLMs: the tokenizer's text (default: WORLD)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    return p


def check_llm(llm: str) -> str:
    """A tiny LLM name as is, a local folder resolved, a hub id checked to be reachable (its config loads)."""
    if llm in TINY_LLMS:
        return llm
    if Path(llm).exists():
        if not (Path(llm) / "config.json").is_file():
            raise FileNotFoundError(f"--llm {llm}: no config.json in that folder")
        return str(Path(llm).resolve())
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(llm)
    except OSError as err:
        raise FileNotFoundError(f"--llm {llm}: neither a folder nor a reachable hub model ({err})") from err
    return llm


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings with every default filled in; bad arguments fail here, before any work."""
    world = args.world
    if world is not None and not (world / "world.json").is_file():
        raise FileNotFoundError(
            f"--world {world}: not a synthetic world (no world.json); make one with `mllm-sparse synth`"
        )

    def from_world(value: Path | None, name: str, flag: str) -> str:
        if value is None and world is None:
            raise ValueError(f"{flag} is required without --world")
        path = value if value is not None else world / name
        if not path.exists():
            raise FileNotFoundError(f"{flag} {path}: not found")
        return str(path.resolve())

    budgets = list(dict.fromkeys(args.budgets))
    for n in budgets:
        if n < 1:
            raise ValueError(f"--budgets: {n} is not a positive number of tokens")
        if "pooled" in args.baselines and math.isqrt(n) ** 2 != n:
            raise ValueError(f"--budgets: {n} is not a square number (a pooled arm is an n×n grid)")
    encoders = {}
    for spec in args.encoders:
        tokens, sep, folder = spec.partition("=")
        if not sep or not tokens.isdigit():
            raise ValueError(f"--encoders {spec!r}: expected N=DIR, e.g. 16=runs/encoder")
        if int(tokens) not in budgets:
            raise ValueError(f"--encoders {spec!r}: {tokens} is not one of --budgets {budgets}")
        config = Path(folder) / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"--encoders {spec!r}: no config.json in {folder}")
        latent = read_json(config).get("num_latent_tokens")
        if latent != int(tokens):
            raise ValueError(f"--encoders {spec!r}: that encoder has {latent} latent tokens, not {tokens}")
        encoders[int(tokens)] = str(Path(folder).resolve())
    teacher = args.teacher
    if Path(teacher).is_dir():
        teacher = defaults.teacher_spec(Path(teacher).resolve())
    for flag, value in (("--threads", args.threads), ("--max-new-tokens", args.max_new_tokens),
                        ("--model-max-length", args.model_max_length)):  # fmt: skip
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be positive, got {value}")
    if args.timing_questions < 0:
        raise ValueError(f"--timing-questions must be 0 or more, got {args.timing_questions}")
    missing = [n for n in budgets if n not in encoders]
    llm = check_llm(args.llm)
    if args.llm in TINY_LLMS and world is None and args.tokenizer_corpus is None:
        raise ValueError(f"--llm {args.llm} is trained from scratch: give --tokenizer-corpus (or --world)")
    return {
        "teacher": teacher,
        "budgets": budgets,
        "encoders": encoders,
        "baselines": list(args.baselines),
        "llm": llm,
        "train_data": from_world(args.train_data, "llava_train.json", "--train-data"),
        "image_folder": from_world(args.image_folder, ".", "--image-folder"),
        "test_data": from_world(args.test_data, "llava_test.json", "--test-data"),
        "tokenizer_corpus": None if world is None and args.tokenizer_corpus is None
        else from_world(args.tokenizer_corpus, ".", "--tokenizer-corpus"),
        "bootstrap_data": from_world(args.bootstrap_data, ".", "--bootstrap-data") if missing else None,
        "bootstrap_steps": args.bootstrap_steps if missing else None,
        "stage1_epochs": args.stage1_epochs,
        "stage2_epochs": args.stage2_epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "projector_lr": args.projector_lr,
        "stage2_lr": args.stage2_lr,
        "model_max_length": args.model_max_length,
        "train_args": args.train_args,
        "eval_limit": args.eval_limit or None,
        "max_new_tokens": args.max_new_tokens,
        "timing_questions": args.timing_questions,
        "seed": args.seed,
    }  # fmt: skip


def check_settings(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Refuse to continue an ablation whose training settings differ (budgets may grow) or one of whose arms was made
    otherwise (`OUT/arms/ARM/arm.json`), before any work; then save the settings, keeping what an earlier run knew
    where this one has nothing to say (e.g. how it bootstrapped). Returns the saved settings."""
    path = out / SETTINGS_FILE
    if path.is_file():
        before = read_json(path)
        # the bootstrap settings are None where every encoder was given: only two runs that both bootstrapped differ
        optional = ("bootstrap_data", "bootstrap_steps")
        wanted = {
            k: settings[k] for k in TRAINING_SETTINGS if not (k in optional and None in (before.get(k), settings[k]))
        }
        if listed := changes(before, wanted):
            raise ValueError(f"{out} holds an ablation trained with other settings ({listed}); use another --out")
        settings = {**settings, **{k: v for k, v in before.items() if settings.get(k) is None and v is not None}}
    for name, tower in arm_towers(settings, encoder_folders(settings, out)).items():
        recorded = out / "arms" / name / "arm.json"
        if recorded.is_file():
            if listed := changes(read_json(recorded), arm_recipe(settings, tower)):
                raise ValueError(f"arm {name} in {out} was made otherwise ({listed}); use another --out")
    write_json(path, settings)
    return settings


def changes(before: dict[str, Any], wanted: dict[str, Any]) -> str:
    """The keys of `wanted` whose value differs from `before`'s, as "key old -> new; ..." ("" where none does)."""
    return "; ".join(f"{k} {before.get(k)!r} -> {v!r}" for k, v in wanted.items() if before.get(k) != v)


def arm_recipe(settings: dict[str, Any], tower: list[str]) -> dict[str, Any]:
    """What an arm is built and trained from (its `arm.json`)."""
    skip = ("bootstrap_data", "bootstrap_steps")  # the encoder's business: its folder is in `tower`
    return {"tower": tower, "tokenizer_corpus": settings["tokenizer_corpus"],
            **{k: settings[k] for k in TRAINING_SETTINGS if k not in skip}}  # fmt: skip


def encoder_folders(settings: dict[str, Any], out: Path) -> dict[int, str]:
    """The encoder of every budget: the given one, or where this ablation bootstraps it (OUT/encoders/nN)."""
    return {n: settings["encoders"].get(n) or str((out / "encoders" / f"n{n}").resolve()) for n in settings["budgets"]}


def arm_towers(settings: dict[str, Any], encoders: dict[int, str]) -> dict[str, list[str]]:
    """Arm name → its `build-vlm` tower arguments, in report order: vit, then per budget sparseformer-N, pooled-N."""
    teacher = settings["teacher"]
    towers = {"vit": ["--encoder", teacher]} if "vit" in settings["baselines"] else {}
    for n in settings["budgets"]:
        towers[f"sparseformer-{n}"] = ["--encoder", encoders[n]]
        if "pooled" in settings["baselines"]:
            towers[f"pooled-{n}"] = ["--encoder", teacher, "--pool-tokens", str(n)]
    return towers


def share_file(source: Path, target: Path) -> None:
    """`target` with `source`'s content: a hard link where the file system allows, else an atomic copy (an interrupted
    copy never leaves a truncated file behind)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)


def bootstrap_encoders(settings: dict[str, Any], out: Path) -> dict[int, str]:
    """The encoder of every budget: the given ones, and the rest bootstrapped into OUT/encoders/nN (one teacher cache,
    computed once and shared: it depends on the teacher and the images only)."""
    from bootstrap import train as bootstrap_train

    encoders = encoder_folders(settings, out)
    stages = Stages(out / "encoders", "ablate")
    cache = None
    for n in settings["budgets"]:
        if n in settings["encoders"]:
            continue
        folder = Path(encoders[n])
        if cache is not None and not (folder / cache.name).exists():
            share_file(cache, folder / cache.name)
        command = defaults.bootstrap_arguments(
            settings["teacher"], Path(settings["bootstrap_data"]), folder, n, settings["bootstrap_steps"],
            "--cache-teacher", "--save-every", str(max(1, settings["bootstrap_steps"] // 4)),
            "--seed", str(settings["seed"]), *resume_flag(folder),
        )  # fmt: skip
        stages.run(f"n{n}", folder, lambda command=command: bootstrap_train.main(command), resumable=True)
        cache = next(folder.glob("teacher_cache*.safetensors"), None)
    return encoders


def train_arm(settings: dict[str, Any], name: str, tower: list[str], out: Path) -> None:
    """Build one arm, train its stages and score it after each (OUT/arms/NAME/{base,stage1,stage2,eval_*})."""
    from llava_adapter import evaluate, train
    from llava_adapter.build_vlm import main as build_vlm_main

    folder = out / "arms" / name
    if not (folder / "arm.json").is_file():  # a recorded one was checked by `check_settings`
        write_json(folder / "arm.json", arm_recipe(settings, tower))
    stages = Stages(folder, f"ablate {name}")
    seed = settings["seed"]
    corpus = [] if settings["tokenizer_corpus"] is None else ["--tokenizer-corpus", settings["tokenizer_corpus"]]
    stages.run("base", folder / "base", lambda: build_vlm_main(
        [*tower, "--llm", settings["llm"], *corpus, "--projector", "mlp2x_gelu", "--out", str(folder / "base"),
         "--seed", str(seed)]))  # fmt: skip
    plan = [("stage1", folder / "base", settings["stage1_epochs"], settings["lr"], settings["projector_lr"])]
    if settings["stage2_epochs"]:
        plan.append(
            ("stage2", folder / "stage1", settings["stage2_epochs"], settings["stage2_lr"], settings["stage2_lr"])
        )
    data, images = Path(settings["train_data"]), Path(settings["image_folder"])
    for (stage, start, epochs, lr, projector_lr), before in zip(plan, ("base", "stage1"), strict=False):

        def train_stage(start=start, out=folder / stage, epochs=epochs, lr=lr, projector_lr=projector_lr) -> None:
            extra = train.parse_overrides(shlex.split(settings["train_args"]))
            train.run(*defaults.train_vlm_settings(
                start, out, data, images, epochs, lr, projector_lr, batch_size=settings["batch_size"], seed=seed,
                model_max_length=settings["model_max_length"], overrides=extra))  # fmt: skip

        stages.run(stage, folder / stage, train_stage, resumable=True, inputs=(before,))
        evaluation = folder / f"eval_{stage}"
        scored = evaluation / evaluate.JSON_NAME
        if stages.is_done(evaluation.name) and read_json(scored).get("limit") != settings["eval_limit"]:
            stages.marker(evaluation.name).unlink()  # scored on other records: score again
        command = [*defaults.eval_vlm_arguments(folder / stage, Path(settings["test_data"]), images, evaluation,
                                              settings["eval_limit"], progress=False),
                   "--max-new-tokens", str(settings["max_new_tokens"])]  # fmt: skip
        stages.run(evaluation.name, evaluation, lambda command=command: evaluate.main(command))


def stage_names(settings: dict[str, Any]) -> list[str]:
    return list(VLM_STAGES if settings["stage2_epochs"] else VLM_STAGES[:1])


def scores(report: dict[str, Any]) -> dict[str, Any]:
    """Accuracy overall, by question type and by object size, and the answers counted, of an `eval-vlm` report (or
    of `question_only_prior`'s, which has the same keys)."""
    return {
        "accuracy": report["accuracy"],
        "by_type": {k: v["accuracy"] for k, v in report["by_type"].items()},
        "by_target_size": {k: v["accuracy"] for k, v in report["by_target_size"].items()},
        "answers": report["num_answers"],
    }


def arm_summary(folder: Path, stage: str) -> dict[str, Any]:
    """An arm's scores after `stage`, and the seconds its training took up to there."""
    from llava_adapter.evaluate import JSON_NAME

    report = read_json(folder / f"eval_{stage}" / JSON_NAME)
    seconds = Stages(folder, "").seconds()
    trained = VLM_STAGES[: VLM_STAGES.index(stage) + 1]
    return {
        "image_tokens": report["throughput"]["num_image_tokens"],
        **scores(report),
        "train_seconds": sum(seconds.get(s, 0.0) for s in trained),
    }


def predictions(out: Path, name: str, stage: str) -> list[dict]:
    from llava_adapter.evaluate import JSON_NAME

    return read_json(out / "arms" / name / f"eval_{stage}" / JSON_NAME)["predictions"]


def paired_comparisons(out: Path, names: list[str], stage: str) -> list[dict[str, Any]]:
    """Each SparseFormer arm against the pooled arm of its N and against the ViT, each pooled arm against the ViT:
    accuracy differences on the same answers, overall and by object size, with 95% cluster-bootstrap intervals."""
    from .compare import paired_difference

    pairs = []
    for name in names:
        if name.startswith("sparseformer-"):
            pooled = name.replace("sparseformer-", "pooled-")
            pairs += [(name, pooled)] if pooled in names else []
        if name != "vit" and "vit" in names:
            pairs.append((name, "vit"))
    out_rows = []
    for a, b in pairs:
        pa, pb = predictions(out, a, stage), predictions(out, b, stage)
        row = {"a": a, "b": b, "all": paired_difference(pa, pb)}
        for size in SIZES:
            sa = [p for p in pa if p["target_size"] == size]
            row[size] = paired_difference(sa, [p for p in pb if p["target_size"] == size]) if sa else None
        out_rows.append(row)
    return out_rows


@torch.no_grad()
def time_side_by_side(out: Path, names: list[str], stage: str, test_data: Path, image_folder: Path, questions: int):
    """Median encode / prefill / time to first token per arm (batch 1, KV cache), the arms interleaved question by
    question in one process so that they see the same machine load."""
    from llava_adapter.chat import ChatEngine

    engines = {n: ChatEngine.from_pretrained(out / "arms" / n / stage, template=defaults.TEMPLATE) for n in names}
    records = [r for r in read_json(test_data) if "image" in r][:questions]
    samples: dict[str, dict[str, list[float]]] = {n: {"encode": [], "prefill": [], "ttft": []} for n in names}
    for warm in (True, False):
        for record in records[:2] if warm else records:
            question = record["conversations"][0]["value"]
            for name, engine in engines.items():
                engine.reset()
                t = engine.chat(question, image_folder / record["image"], max_new_tokens=1).timings
                if not warm:
                    for key, value in (("encode", t.encode_s), ("prefill", t.prefill_s),
                                       ("ttft", t.encode_s + t.prefill_s)):  # fmt: skip
                        samples[name][key].append(value)
    return {n: {f"{k}_ms": 1000 * statistics.median(v) for k, v in s.items()} | {"questions": len(records)}
            for n, s in samples.items()}  # fmt: skip


def run(settings: dict[str, Any], out: Path) -> dict[str, Any]:
    """Bootstrap what is missing, train and score every arm, compare and time them; the report."""
    from llava_adapter.evaluate import question_only_prior

    encoders = bootstrap_encoders(settings, out)
    towers = arm_towers(settings, encoders)
    for name, tower in towers.items():
        train_arm(settings, name, tower, out)
    names, stages = list(towers), stage_names(settings)
    final = stages[-1]
    first_predictions = predictions(out, names[0], "stage1")
    prior = question_only_prior(settings["train_data"], first_predictions)
    report = {
        "settings": settings,
        "encoders": {str(n): d for n, d in encoders.items()},
        "prior": {"image_tokens": 0, **scores(prior)},
        "arms": {n: {s: arm_summary(out / "arms" / n, s) for s in stages} for n in names},
        "paired": {s: paired_comparisons(out, names, s) for s in stages},
        "timing": time_side_by_side(
            out, names, final, Path(settings["test_data"]), Path(settings["image_folder"]), settings["timing_questions"]
        ),  # fmt: skip
    }
    return report


def stage_title(stage: str) -> str:
    return stage.replace("stage", "stage ")


def method_of(name: str) -> str:
    return name.split("-")[0]


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure to `path` as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def plot(report: dict[str, Any], out: Path, name: str = REPORT_NAME) -> list[Path]:
    """`NAME_accuracy.png` and `NAME_speed.png`: each method's curve against image tokens (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stage = list(next(iter(report["arms"].values())))[-1]
    arms = {n: r[stage] for n, r in report["arms"].items()}
    ticks = sorted({r["image_tokens"] for r in arms.values()})
    methods = {"sparseformer": ("SparseFormer", "tab:red", "o"), "pooled": ("pooled ViT", "tab:blue", "s"),
               "vit": ("ViT, all patches", "black", "*")}  # fmt: skip
    written = []

    def curves(ax, value) -> None:
        for method, (label, color, marker) in methods.items():
            points = sorted((r["image_tokens"], value(n, r)) for n, r in arms.items() if method_of(n) == method)
            points = [(x, y) for x, y in points if y is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker=marker, color=color, label=label, markersize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("image tokens given to the LLM")
        ax.grid(alpha=0.3)

    panels = [("all questions", None), *[(f"{s} objects", s) for s in SIZES]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), sharey=True)
    for ax, (title, size) in zip(axes, panels, strict=True):

        def accuracy(name, r, size=size):
            value = r["accuracy"] if size is None else r["by_target_size"].get(size)
            return None if value is None else 100 * value

        curves(ax, accuracy)
        prior = report["prior"]["accuracy"] if size is None else report["prior"]["by_target_size"].get(size)
        if prior is not None:
            ax.axhline(100 * prior, color="gray", linestyle="--", label="question-only prior")
        ax.set_title(title)
    axes[0].set_ylabel(f"accuracy after {stage_title(stage)} (%)")
    axes[0].legend(fontsize=8)
    written.append(save_figure(fig, out / f"{name}_accuracy.png"))

    timing = report["timing"]
    fig, axes = plt.subplots(1, 3, figsize=(12.6, 3.8))
    for ax, (key, title) in zip(axes, (("encode_ms", "vision encode"), ("prefill_ms", "LLM prefill"),
                                       ("ttft_ms", "time to first token")), strict=True):  # fmt: skip
        curves(ax, lambda name, r, key=key: timing[name][key])
        ax.set_title(f"{title} (ms, batch 1)")
    axes[0].legend(fontsize=8)
    written.append(save_figure(fig, out / f"{name}_speed.png"))
    return written


def score_table(prior: dict[str, Any], arms: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows: the question-only prior, then every arm; `vs vit` where the ViT arm is there."""
    types = sorted({t for r in arms.values() for t in r["by_type"]})
    base = arms.get("vit", {}).get("accuracy")

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def gain(accuracy: float) -> str:
        """The gain over the question-only prior as a share of the ViT arm's gain."""
        if base is None or base <= prior["accuracy"]:
            return "n/a"
        return f"{100 * (accuracy - prior['accuracy']) / (base - prior['accuracy']):.0f}%"

    lines = [
        "| arm | image tokens | accuracy | vs vit | gain vs vit | "
        + " | ".join(types + [f"{s} objects" for s in SIZES]) + " | train s |",
        "|---|---:|---:|---:|---:|" + "---:|" * (len(types) + len(SIZES)) + "---:|",
    ]  # fmt: skip
    for name, r in {"question-only prior": prior, **arms}.items():
        ratio = f"{100 * r['accuracy'] / base:.0f}%" if base else "n/a"
        seconds = r.get("train_seconds")
        lines.append(
            f"| {name} | {r['image_tokens']} | **{pct(r['accuracy'])}** | {ratio} | {gain(r['accuracy'])} | "
            + " | ".join(pct(r["by_type"].get(t)) for t in types)
            + " | "
            + " | ".join(pct(r["by_target_size"].get(s)) for s in SIZES)
            + f" | {'n/a' if seconds is None else f'{seconds:.0f}'} |"
        )
    return lines


def paired_table(pairs: list[dict[str, Any]]) -> list[str]:
    """Markdown rows of `paired_comparisons`: a − b in points [95% interval], bold where the interval excludes 0."""

    def cell(d: dict | None) -> str:
        if d is None:
            return "n/a"
        text = f"{d['difference'] * 100:+.1f} [{d['low'] * 100:+.1f}, {d['high'] * 100:+.1f}]"
        return f"**{text}**" if d["low"] > 0 or d["high"] < 0 else text

    lines = ["| a | b | all questions | " + " | ".join(f"{s} objects" for s in SIZES) + " |",
             "|---|---|---:|" + "---:|" * len(SIZES)]  # fmt: skip
    lines += [f"| {p['a']} | {p['b']} | " + " | ".join(cell(p[k]) for k in ("all", *SIZES)) + " |" for p in pairs]
    return lines


def to_markdown(
    report: dict[str, Any], title: str = "Token-budget ablation", intro: str = "", name: str = REPORT_NAME
) -> str:
    """The report as Markdown: scores after each stage, paired differences, timing, and the plots."""
    s = report["settings"]
    stages = list(next(iter(report["arms"].values())))
    lines = [f"# {title}", ""]
    if intro:
        lines += [intro, ""]
    lines += [
        f"Teacher `{s['teacher']}`, LLM `{s['llm']}`. Stage 1: {s['stage1_epochs']} epoch(s), batch {s['batch_size']}, "
        f"LLM lr {s['lr']} (0: frozen), projector lr {s['projector_lr']}"
        + (f"; stage 2: {s['stage2_epochs']} epoch(s), LLM and projector at lr {s['stage2_lr']}" if s["stage2_epochs"]
           else "")
        + f"; the tower frozen. {report['prior']['answers']} test answers. *vs vit*: accuracy as a share of the ViT "
        "arm's; *gain vs vit*: the gain over the question-only prior as a share of the ViT arm's gain. Last columns: "
        "accuracy by the size of the object a question asks about; train s: seconds of training up to that stage.",
        "",
    ]  # fmt: skip
    for stage in reversed(stages):
        lines += [f"## After {stage_title(stage)}", "",
                  *score_table(report["prior"], {n: r[stage] for n, r in report["arms"].items()}), ""]  # fmt: skip
    for stage in reversed(stages):
        if report["paired"][stage]:
            lines += [f"## Paired differences after {stage_title(stage)}", "",
                      "a − b in accuracy points on the same answers, [95% interval] of a cluster bootstrap over test "
                      "records (`mllm_sparse_recipes.compare`); bold: the interval excludes 0.", "",
                      *paired_table(report["paired"][stage]), ""]  # fmt: skip
    timing = report["timing"]
    name_ref = "vit" if "vit" in timing else next(iter(timing))
    reference = timing[name_ref]
    final = stages[-1]
    lines += [
        f"## Time to first token (batch 1, median of {reference['questions']} questions, arms interleaved)",
        "",
        f"| arm | image tokens | encode ms | LLM prefill ms | TTFT ms | TTFT vs {name_ref} | prefill vs {name_ref} |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {n} | {report['arms'][n][final]['image_tokens']} | {t['encode_ms']:.1f} | {t['prefill_ms']:.1f} | "
          f"{t['ttft_ms']:.1f} | {t['ttft_ms'] / reference['ttft_ms']:.2f}× | "
          f"{t['prefill_ms'] / reference['prefill_ms']:.2f}× |" for n, t in timing.items()],
        "",
        f"![accuracy against image tokens]({name}_accuracy.png)",
        "",
        f"![time against image tokens]({name}_speed.png)",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path, markdown: str) -> None:
    """OUT/ablation.{json,md} and the plots."""
    write_json(out / f"{REPORT_NAME}.json", report)
    with atomic_path(out / f"{REPORT_NAME}.md") as tmp:
        tmp.write_text(markdown)
    plot(report, out)


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Check the arguments and the settings of an earlier run into `args.out`, then `run`; the report."""
    settings = resolve(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    return run(check_settings(args.out, settings), args.out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = run_from_args(args)
    markdown = to_markdown(report)
    write_report(report, args.out, markdown)
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
