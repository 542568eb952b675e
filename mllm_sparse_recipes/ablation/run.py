"""The ablation's orchestration: resolve the settings, bootstrap the missing encoders, build, train and score every
arm in LLaVA's two stages, compare and time them (`run`)."""

from __future__ import annotations

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
from mllm_sparse.training import latest_checkpoint

from .. import defaults
from ..stages import Stages, guard_settings
from . import ARMS, ELASTIC, ONE_MODEL_ARMS, SETTINGS_FILE, TRAINING_SETTINGS, VLM_STAGES, AblationSettings
from .report import to_markdown, write_report
from .statistics import paired_comparisons, predictions, scores


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


def resolve(args: AblationSettings) -> dict[str, Any]:
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
    arms = [arm for arm in ARMS if arm in args.arms]  # report order
    if unknown := [arm for arm in args.arms if arm not in ARMS]:
        raise ValueError(f"--arms: unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if not arms:
        raise ValueError(f"--arms: name at least one of {list(ARMS)}")
    for n in budgets:
        if n < 1:
            raise ValueError(f"--budgets: {n} is not a positive number of tokens")
        if gridded := [arm for arm in ("pooled", "m3") if arm in arms and math.isqrt(n) ** 2 != n]:
            raise ValueError(f"--budgets: {n} is not a square number (the {gridded[0]} arm pools to an n×n grid)")
    encoders, elastic_encoder = {}, None
    for spec in args.encoders:
        tokens, sep, folder = spec.partition("=")
        if sep and tokens == ELASTIC:
            elastic_encoder = checked_elastic_encoder(spec, Path(folder), budgets, ELASTIC in arms)
            continue
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
    per_step = len(budgets) if args.budgets_per_step is None else args.budgets_per_step
    if not 1 <= per_step <= len(budgets):
        raise ValueError(f"--budgets-per-step {per_step}: choose 1 to {len(budgets)} (the --budgets)")
    missing = [n for n in budgets if n not in encoders and "sparseformer" in arms]
    missing += [ELASTIC] if ELASTIC in arms and not elastic_encoder else []
    llm = check_llm(args.llm)
    if args.llm in TINY_LLMS and world is None and args.tokenizer_corpus is None:
        raise ValueError(f"--llm {args.llm} is trained from scratch: give --tokenizer-corpus (or --world)")
    return {
        "teacher": teacher,
        "budgets": budgets,
        "encoders": encoders,
        "arms": arms,
        "elastic_encoder": elastic_encoder,
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
        "train_args": checked_train_args(args.train_args),
        "budgets_per_step": per_step,
        "eval_limit": args.eval_limit or None,
        "max_new_tokens": args.max_new_tokens,
        "timing_questions": args.timing_questions,
        "seed": args.seed,
    }  # fmt: skip


def checked_elastic_encoder(spec: str, folder: Path, budgets: list[int], elastic: bool) -> str:
    """The folder of `--encoders elastic=DIR`, resolved, once it is known to serve every budget."""
    if not elastic:
        raise ValueError(f"--encoders {spec!r}: an elastic encoder is for the elastic arm (--arms ... elastic)")
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"--encoders {spec!r}: no config.json in {folder}")
    served = read_json(config).get("budgets") or []
    if unserved := [n for n in budgets if n not in served]:
        raise ValueError(f"--encoders {spec!r}: that encoder serves {served} latent tokens, not {unserved}")
    return str(folder.resolve())


def checked_train_args(train_args: str) -> str:
    """`--train-args` as given, once LLaVA's parser has read it: a typo fails now, not after hours of bootstrapping."""
    from llava_adapter import train

    given = train.parse_overrides(shlex.split(train_args))
    for name, own in (("budgets", "--budgets"), ("budgets_per_step", "--budgets-per-step")):
        if name in given:
            raise ValueError(f"--train-args: --{name} is the ablation's own; use ablate's {own}")
    return train_args


def check_settings(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Refuse to continue an ablation whose training settings differ (budgets may grow) or one of whose arms was made
    otherwise (`OUT/arms/ARM/arm.json`), before any work; then save the settings, keeping what an earlier run knew
    where this one has nothing to say (e.g. how it bootstrapped). Returns the saved settings."""
    path = out / SETTINGS_FILE
    before = read_json(path) if path.is_file() else {}
    # the bootstrap settings are None where every encoder was given: only two runs that both bootstrapped differ
    optional = ("bootstrap_data", "bootstrap_steps")
    wanted = {k: settings[k] for k in TRAINING_SETTINGS if not (k in optional and None in (before.get(k), settings[k]))}
    guard_settings(path, wanted, "ablation", lambda key: "")
    known = {k: v for k, v in before.items() if k in settings and settings[k] is None and v is not None}
    settings = {**settings, **known}
    for name, tower in arm_towers(settings, encoder_folders(settings, out)).items():
        recorded = out / "arms" / name / "arm.json"
        if recorded.is_file() and isinstance(read_json(recorded).get("tower"), list):
            write_json(recorded, {**read_json(recorded), "tower": tower_of_arguments(read_json(recorded)["tower"])})
        if recorded.is_file() and name in ONE_MODEL_ARMS and "budgets_per_step" not in read_json(recorded):
            write_json(recorded, {**read_json(recorded), "budgets_per_step": 1})  # recorded before there was a choice
        guard_settings(recorded, arm_recipe(settings, tower, name), f"arm {name}")
    write_json(path, settings)
    return settings


def tower_of_arguments(arguments: list[str]) -> dict[str, Any]:
    """An arm's tower as ablations recorded it before settings were typed (`build-vlm` arguments such as
    ["--encoder", X, "--pool-tokens", "16"]) in today's form ({"encoder": X, "num_latent_tokens": 16})."""
    fields = {"--encoder": ("encoder", str), "--pool-tokens": ("num_latent_tokens", int)}
    tower = {}
    for flag, value in zip(arguments[::2], arguments[1::2], strict=True):
        if flag not in fields:
            raise ValueError(f"an arm.json records the tower argument {flag}, which this version does not know")
        name, kind = fields[flag]
        tower[name] = kind(value)
    return tower


def arm_recipe(settings: dict[str, Any], tower: dict[str, Any], name: str) -> dict[str, Any]:
    """What an arm is built and trained from (its `arm.json`); a one-model arm (m3, elastic) also records the budgets
    it draws and how many per batch."""
    skip = ("bootstrap_data", "bootstrap_steps")  # the encoder's business: its folder is in `tower`
    drawn = {}
    if name in ONE_MODEL_ARMS:
        drawn = {"budgets": settings["budgets"], "budgets_per_step": settings["budgets_per_step"]}
    return {"tower": tower, "tokenizer_corpus": settings["tokenizer_corpus"], **drawn,
            **{k: settings[k] for k in TRAINING_SETTINGS if k not in skip}}  # fmt: skip


def encoder_folders(settings: dict[str, Any], out: Path) -> dict[int | str, str]:
    """The encoder of every budget: the given one, or where this ablation bootstraps it (OUT/encoders/nN); with
    the elastic arm, under "elastic" the elastic one (given, or OUT/encoders/elastic)."""
    folders: dict[int | str, str] = {
        n: settings["encoders"].get(n) or str((out / "encoders" / f"n{n}").resolve()) for n in settings["budgets"]
    }
    if ELASTIC in settings["arms"]:
        folders[ELASTIC] = settings.get("elastic_encoder") or str((out / "encoders" / ELASTIC).resolve())
    return folders


def arm_towers(settings: dict[str, Any], encoders: dict[int | str, str]) -> dict[str, dict[str, Any]]:
    """Arm name → its tower (`BuildVlmSettings` fields), in report order: vit, then per budget sparseformer-N,
    pooled-N, visionzip-N, then the one-model arms m3 and elastic."""
    teacher, arms = settings["teacher"], settings["arms"]
    towers = {"vit": {"encoder": teacher}} if "vit" in arms else {}
    for n in settings["budgets"]:
        if "sparseformer" in arms:
            towers[f"sparseformer-{n}"] = {"encoder": encoders[n]}
        if "pooled" in arms:
            towers[f"pooled-{n}"] = {"encoder": teacher, "num_latent_tokens": n}
        if "visionzip" in arms:
            towers[f"visionzip-{n}"] = {"encoder": teacher, "num_latent_tokens": n, "reduction": "visionzip"}
    if "m3" in arms:
        towers["m3"] = {"encoder": teacher, "budgets": sorted(settings["budgets"])}
    if ELASTIC in arms:
        towers[ELASTIC] = {"encoder": encoders[ELASTIC]}
    return towers


def arm_views(settings: dict[str, Any], name: str) -> dict[str, int | None]:
    """The rows a trained arm gives the report, each with the budget it is scored at (None: its own): a one-model arm
    one per budget (e.g. elastic-N, scored into OUT/arms/elastic-N), every other arm itself."""
    return {f"{name}-{n}": n for n in settings["budgets"]} if name in ONE_MODEL_ARMS else {name: None}


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
    missing = [n for n in settings["budgets"] if n not in settings["encoders"] and "sparseformer" in settings["arms"]]
    if ELASTIC in settings["arms"] and not settings.get("elastic_encoder"):
        missing.append(ELASTIC)  # one student for every budget, the largest its default
    for n in missing:
        folder = Path(encoders[n])
        if cache is not None and not (folder / cache.name).exists():
            share_file(cache, folder / cache.name)
        elastic = n == ELASTIC
        encoder = defaults.bootstrap_settings(
            settings["teacher"], Path(settings["bootstrap_data"]), folder, max(settings["budgets"]) if elastic else n,
            settings["bootstrap_steps"], cache_teacher=True, save_every=max(1, settings["bootstrap_steps"] // 4),
            seed=settings["seed"], resume=latest_checkpoint(folder) is not None,
            budgets=settings["budgets"] if elastic else None,
        )  # fmt: skip
        stages.run(ELASTIC if elastic else f"n{n}", folder, lambda e=encoder: bootstrap_train.run(e), resumable=True)
        cache = next(folder.glob("teacher_cache*.safetensors"), None)
    return encoders


def train_arm(settings: dict[str, Any], name: str, tower: dict[str, Any], out: Path) -> None:
    """Build one arm, train its stages and score it after each (OUT/arms/NAME/{base,stage1,stage2,eval_*})."""
    from dataclasses import replace

    from llava_adapter import evaluate, train
    from llava_adapter.build_vlm import BuildVlmSettings
    from llava_adapter.build_vlm import run as build_vlm

    folder = out / "arms" / name
    if not (folder / "arm.json").is_file():  # a recorded one was checked by `check_settings`
        write_json(folder / "arm.json", arm_recipe(settings, tower, name))
    stages = Stages(folder, f"ablate {name}")
    seed = settings["seed"]
    stages.run("base", folder / "base", lambda: build_vlm(BuildVlmSettings(
        **tower, llm=settings["llm"], tokenizer_corpus=settings["tokenizer_corpus"], projector="mlp2x_gelu",
        out=folder / "base", seed=seed)))  # fmt: skip
    plan = [("stage1", folder / "base", settings["stage1_epochs"], settings["lr"], settings["projector_lr"])]
    if settings["stage2_epochs"]:
        plan.append(
            ("stage2", folder / "stage1", settings["stage2_epochs"], settings["stage2_lr"], settings["stage2_lr"])
        )
    data, images = Path(settings["train_data"]), Path(settings["image_folder"])
    for (stage, start, epochs, lr, projector_lr), before in zip(plan, ("base", "stage1"), strict=False):

        def train_stage(start=start, out=folder / stage, epochs=epochs, lr=lr, projector_lr=projector_lr) -> None:
            extra = train.parse_overrides(shlex.split(settings["train_args"]))
            if name in ONE_MODEL_ARMS:
                extra.update(budgets=settings["budgets"], budgets_per_step=settings["budgets_per_step"])
            train.run(*defaults.train_vlm_settings(
                start, out, data, images, epochs, lr, projector_lr, batch_size=settings["batch_size"], seed=seed,
                model_max_length=settings["model_max_length"], overrides=extra))  # fmt: skip

        stages.run(stage, folder / stage, train_stage, resumable=True, inputs=(before,))
        for view, budget in arm_views(settings, name).items():
            view_stages = stages if view == name else Stages(out / "arms" / view, f"ablate {view}")
            evaluation = out / "arms" / view / f"eval_{stage}"
            scored = evaluation / evaluate.JSON_NAME
            if view_stages.is_done(evaluation.name) and read_json(scored).get("limit") != settings["eval_limit"]:
                view_stages.marker(evaluation.name).unlink()  # scored on other records: score again
            scoring = replace(defaults.eval_vlm_settings(folder / stage, Path(settings["test_data"]), images,
                                                         evaluation, settings["eval_limit"], progress=False),
                              max_new_tokens=settings["max_new_tokens"], num_latent_tokens=budget)  # fmt: skip
            view_stages.run(evaluation.name, evaluation, lambda scoring=scoring: evaluate.run(scoring))


def stage_names(settings: dict[str, Any]) -> list[str]:
    return list(VLM_STAGES if settings["stage2_epochs"] else VLM_STAGES[:1])


def arm_summary(out: Path, view: str, arm: str, stage: str) -> dict[str, Any]:
    """A report row's scores after `stage` (OUT/arms/VIEW), and the seconds its arm's training took up to there."""
    from llava_adapter.evaluate import JSON_NAME

    report = read_json(out / "arms" / view / f"eval_{stage}" / JSON_NAME)
    seconds = Stages(out / "arms" / arm, "").seconds()
    trained = VLM_STAGES[: VLM_STAGES.index(stage) + 1]
    return {
        "image_tokens": report["throughput"]["num_image_tokens"],
        **scores(report),
        "train_seconds": sum(seconds.get(s, 0.0) for s in trained),
    }


@torch.no_grad()
def time_side_by_side(
    out: Path, views: dict[str, tuple[str, int | None]], stage: str, test_data: Path, image_folder: Path, questions: int
):
    """Median encode / prefill / time to first token per report row (`views`: row → (arm, budget); batch 1, KV
    cache), the rows interleaved question by question in one process so that they see the same machine load; a
    one-model arm is loaded once and run at each row's budget."""
    from llava_adapter.chat import ChatEngine

    engines = {arm: ChatEngine.from_pretrained(out / "arms" / arm / stage) for arm, _ in views.values()}
    records = [r for r in read_json(test_data) if "image" in r][:questions]
    samples: dict[str, dict[str, list[float]]] = {n: {"encode": [], "prefill": [], "ttft": []} for n in views}
    for warm in (True, False):
        for record in records[:2] if warm else records:
            question = record["conversations"][0]["value"]
            for name, (arm, budget) in views.items():
                engine = engines[arm]
                engine.num_latent_tokens = budget
                engine.reset()
                t = engine.chat(question, image_folder / record["image"], max_new_tokens=1).timings
                if not warm:
                    for key, value in (("encode", t.encode_s), ("prefill", t.prefill_s),
                                       ("ttft", t.encode_s + t.prefill_s)):  # fmt: skip
                        samples[name][key].append(value)
    return {n: {f"{k}_ms": 1000 * statistics.median(v) for k, v in s.items()} | {"questions": len(records)}
            for n, s in samples.items()}  # fmt: skip


def train_score_and_compare(settings: dict[str, Any], out: Path) -> dict[str, Any]:
    """Bootstrap what is missing, train and score every arm, compare and time them; the report."""
    from llava_adapter.evaluate import question_only_prior

    encoders = bootstrap_encoders(settings, out)
    towers = arm_towers(settings, encoders)
    for name, tower in towers.items():
        train_arm(settings, name, tower, out)
    views = {view: (arm, budget) for arm in towers for view, budget in arm_views(settings, arm).items()}
    names, stages = list(views), stage_names(settings)
    final = stages[-1]
    first_predictions = predictions(out, names[0], "stage1")
    prior = question_only_prior(settings["train_data"], first_predictions)
    report = {
        "settings": settings,
        "encoders": {str(n): d for n, d in encoders.items()},
        "prior": {"image_tokens": 0, **scores(prior)},
        "arms": {n: {s: arm_summary(out, n, views[n][0], s) for s in stages} for n in names},
        "paired": {s: paired_comparisons(out, names, s) for s in stages},
        "timing": time_side_by_side(
            out, views, final, Path(settings["test_data"]), Path(settings["image_folder"]), settings["timing_questions"]
        )
        if settings["timing_questions"]
        else {},  # fmt: skip
    }
    return report


def run(args: AblationSettings, write: bool = True) -> tuple[dict[str, Any], str]:
    """Check the settings and those of an earlier run into `args.out`, then train, score, compare and time every arm;
    the report and its Markdown, written with the plots to OUT/ablation.{json,md} (`write`)."""
    settings = resolve(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    report = train_score_and_compare(check_settings(args.out, settings), args.out)
    markdown = to_markdown(report)
    if write:
        write_report(report, args.out, markdown)
    return report, markdown
