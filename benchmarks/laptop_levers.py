"""The laptop plan's speed levers, each timed both ways on the same inputs, in alternation.

    uv run python benchmarks/laptop_levers.py --world W/world --teacher W/teacher --llm W/llm --encoder W/encoder

W is a laptop-plan run (`mllm-sparse quickstart --out W`), or any world, teacher, scene LLM and 16-token encoder made
with its settings. Each arm runs in a fresh process, so no arm inherits another's caches:

- `vlm_stage1`, `vlm_stage2`: `--steps` LLaVA steps of the quickstart's stage 1 (projector, LLM frozen) and stage 2
  (LLM and projector) from a VLM built of `--encoder` and `--llm`, with random batches against batches of one
  modality and similar length (`--group_by_modality_length`, the recipes' setting).
- `bootstrap`: `--bootstrap-steps` steps of the quickstart's bootstrap (teacher cached), each image decoded every
  epoch against once (`--images-in-memory`).
- `scene_records`: `--scene-steps` steps of scene pretraining's second phase (whole records, batches of 16) from
  `--llm`, in random batches against length-grouped ones (the recipe's; the random order is patched in).
- `teacher`: `--teacher-steps` steps of `train-teacher` on the world with AdamW's per-operation kernels against its
  fused one (the recipe's; the former patched in).

The seconds are those of the training loop where the command reports it (bootstrap, scene pretraining, teacher) and
of the whole call for a VLM arm (its model loading, ~2 s, counts in both ways). Times depend on the machine and its
load, which the report states: quote the ratios. Writes `benchmarks/results/laptop_levers.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import RESULTS, machine, write_results

ARMS = {
    "vlm_stage1": ("random batches", "grouped batches"),
    "vlm_stage2": ("random batches", "grouped batches"),
    "bootstrap": ("decoded every epoch", "decoded once"),
    "scene_records": ("random batches", "grouped batches"),
    "teacher": ("AdamW per operation", "AdamW fused"),
}


def vlm(work: Path, args: dict, stage: int, lever: bool) -> float:
    from llava_adapter import train
    from mllm_sparse_recipes import defaults

    world = Path(args["world"])
    lr, projector_lr = (0.0, defaults.STAGE1_PROJECTOR_LR) if stage == 1 else (defaults.STAGE2_LR, defaults.STAGE2_LR)
    overrides = {"max_steps": args["steps"], "save_strategy": "no", "group_by_modality_length": lever}
    settings = defaults.train_vlm_settings(
        work / "vlm", work / f"stage{stage}", world / "llava_train.json", world, 2.0, lr, projector_lr,
        overrides=overrides,
    )  # fmt: skip
    start = time.perf_counter()
    train.run(*settings)
    return time.perf_counter() - start


def bootstrap(work: Path, args: dict, lever: bool) -> float:
    from bootstrap import train as bootstrap_train
    from mllm_sparse_recipes import defaults

    settings = defaults.bootstrap_settings(
        defaults.teacher_spec(Path(args["teacher"])), Path(args["world"]), work / "encoder", 16,
        args["bootstrap_steps"], cache_teacher=True, images_in_memory=lever,
    )  # fmt: skip
    return bootstrap_train.run(settings)["train_seconds_this_run"]


def scene_records(work: Path, args: dict, lever: bool) -> float:
    from mllm_sparse.training import epoch_order
    from mllm_sparse_recipes import scene_llm

    if not lever:  # the order before grouping: a seeded permutation per epoch
        scene_llm.SceneRecords.length_grouped_order = lambda self, size, seed, epoch: epoch_order(
            len(self), seed, epoch
        ).tolist()
    settings = scene_llm.ScenePretrainSettings(
        data=Path(args["world"]), out=work / "llm", llm=args["llm"], question_steps=0,
        record_steps=args["scene_steps"], eval_every=0, eval_records=1,
    )  # fmt: skip
    return scene_llm.run(settings)["train_seconds"]


def teacher(work: Path, args: dict, lever: bool) -> float:
    import torch

    from bootstrap import train_teacher

    if not lever:
        train_teacher.adamw = torch.optim.AdamW  # per-operation kernels, torch's default on a CPU
    settings = train_teacher.TeacherSettings(
        data=Path(args["world"]), out=work / "teacher", steps=args["teacher_steps"]
    )
    return train_teacher.run(settings)["train_seconds"]


def run_arm(arm: str, lever: bool, args: dict) -> float:
    """Seconds of one arm, in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if arm.startswith("vlm"):
            from llava_adapter.build_vlm import BuildVlmSettings
            from llava_adapter.build_vlm import run as build_vlm

            build_vlm(BuildVlmSettings(encoder=args["encoder"], llm=args["llm"], out=work / "vlm"))
            return vlm(work, args, int(arm[-1]), lever)
        return {"bootstrap": bootstrap, "scene_records": scene_records, "teacher": teacher}[arm](work, args, lever)


def timed(arm: str, lever: bool, args: argparse.Namespace) -> float:
    """Seconds of one arm in a fresh process."""
    settings = json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import laptop_levers as m; "
        f"print('SECONDS', m.run_arm({arm!r}, {lever}, json.loads(sys.argv[1])))"
    )
    done = subprocess.run([sys.executable, "-c", code, settings], capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{arm} ({ARMS[arm][int(lever)]}) failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.split("SECONDS")[-1])


def to_markdown(report: dict) -> str:
    lines = [
        "# The laptop plan's speed levers",
        "",
        f"Machine: {report['machine']}; {report['load']}. {report['rounds']} rounds, the two ways alternating; "
        f"{report['steps']} steps per VLM arm, {report['bootstrap_steps']} per bootstrap arm, "
        f"{report['scene_steps']} per scene-pretraining arm, {report['teacher_steps']} per teacher arm; "
        "median seconds (the training loop where the command reports it, else the whole call).",
        "",
        "| arm | without | s | with | s | speed-up |",
        "|---|---|---:|---|---:|---:|",
    ]
    for arm, row in report["arms"].items():
        lines.append(
            f"| `{arm}` | {row['without']} | {row['seconds_without']:.1f} | {row['with']} | "
            f"{row['seconds_with']:.1f} | {row['speedup']:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, required=True, help="a synthetic world (`mllm-sparse synth`)")
    parser.add_argument("--teacher", type=Path, required=True, help="a `mllm-sparse train-teacher` folder")
    parser.add_argument("--llm", type=Path, required=True, help="a `mllm-sparse pretrain-llm` folder")
    parser.add_argument("--encoder", type=Path, required=True, help="a bootstrapped 16-token SparseFormer folder")
    parser.add_argument("--steps", type=int, default=60, help="steps per VLM arm (default: 60)")
    parser.add_argument("--bootstrap-steps", type=int, default=300, help="steps per bootstrap arm (default: 300)")
    parser.add_argument("--scene-steps", type=int, default=60, help="steps per scene-pretraining arm (default: 60)")
    parser.add_argument("--teacher-steps", type=int, default=100, help="steps per teacher arm (default: 100)")
    parser.add_argument("--rounds", type=int, default=2, help="times each arm runs both ways (default: 2)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="default: all")
    parser.add_argument("--name", default="laptop_levers", help="results file name (default: laptop_levers)")
    args = parser.parse_args()
    seconds: dict[str, dict[bool, list[float]]] = {arm: {False: [], True: []} for arm in args.arms}
    for round_ in range(args.rounds):
        for arm in args.arms:
            for lever in (round_ % 2 == 1, round_ % 2 == 0):  # alternate which way goes first
                seconds[arm][lever].append(timed(arm, lever, args))
                print(f"round {round_ + 1} {arm} {ARMS[arm][int(lever)]}: {seconds[arm][lever][-1]:.1f} s", flush=True)
    report = {
        "machine": machine(),
        "load": f"load average {os.getloadavg()[0]:.2f} at the end",
        "rounds": args.rounds,
        "steps": args.steps,
        "bootstrap_steps": args.bootstrap_steps,
        "scene_steps": args.scene_steps,
        "teacher_steps": args.teacher_steps,
        "arms": {
            arm: {
                "without": ARMS[arm][0],
                "with": ARMS[arm][1],
                "seconds_without": statistics.median(times[False]),
                "seconds_with": statistics.median(times[True]),
                "speedup": statistics.median(times[False]) / statistics.median(times[True]),
                "all_seconds": {"without": times[False], "with": times[True]},
            }
            for arm, times in seconds.items()
        },  # fmt: skip
    }
    write_results(RESULTS, args.name, report, to_markdown(report))
    print(to_markdown(report))


if __name__ == "__main__":
    main()
