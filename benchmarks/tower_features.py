"""LLaVA training steps with the frozen tower run every step, against its features computed once (`--tower_features`).

    uv run python benchmarks/tower_features.py --vlm runs/quickstart/vlm --world runs/quickstart/world

The same stage-1 and stage-2 steps (the quickstart's recipe: batch 16, the stage's learning rates) on the same
records, each stage run four times alternating the two ways (tower per step, features from the table), so that both
see the same machine load; each run trains `--steps` steps from the same model and reports its steady steps per
second (the first 3 steps left out). The table's one-off cost (every training image through the tower once) is
timed on its own. From these it projects a stage's time at the quickstart's laptop plan (2 epochs of 400 and 420
steps). Writes `benchmarks/results/tower_features.{json,md}`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from results_io import RESULTS, machine, write_results
from transformers import TrainerCallback

from llava_adapter import train
from mllm_sparse_recipes import defaults

NAME = "tower_features"
WARMUP_STEPS = 3


class StepTimes(TrainerCallback):
    """Wall-clock seconds of every optimizer step."""

    def __init__(self):
        self.times: list[float] = []
        self.start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def timed_run(vlm: Path, world: Path, out: Path, stage: str, steps: int, features: Path | None) -> dict[str, float]:
    """Train `steps` steps of `stage` from `vlm`; {steady steps per second, seconds before the first step}."""
    lr = 0.0 if stage == "stage1" else defaults.STAGE2_LR
    projector_lr = defaults.STAGE1_PROJECTOR_LR if stage == "stage1" else defaults.STAGE2_LR
    args = defaults.train_vlm_settings(
        vlm, out, world / "llava_train.json", world, 1.0, lr, projector_lr, tower_features=features,
        overrides={"max_steps": steps, "save_strategy": "no", "disable_tqdm": True},
    )  # fmt: skip
    times = StepTimes()
    original = train.VlmTrainer.__init__

    def with_timer(self, *a, **k):
        original(self, *a, **k)
        self.add_callback(times)

    train.VlmTrainer.__init__ = with_timer
    start = time.perf_counter()
    try:
        train.run(*args)
    finally:
        train.VlmTrainer.__init__ = original
        shutil.rmtree(out, ignore_errors=True)
    steady = times.times[WARMUP_STEPS:]
    return {"steps_per_s": len(steady) / sum(steady), "total_s": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vlm", type=Path, required=True, help="a LLaVA folder (the quickstart's OUT/vlm)")
    parser.add_argument("--world", type=Path, required=True, help="its synthetic world (OUT/world)")
    parser.add_argument("--steps", type=int, default=40, help="steps per timed run")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two ways per stage")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="tower_features_"))
    features = work / "features"
    start = time.perf_counter()
    timed_run(args.vlm, args.world, work / "build", "stage1", 1, features)  # builds the table, one step
    table_s = time.perf_counter() - start
    runs: dict[str, dict[str, list[float]]] = {}
    for stage in ("stage1", "stage2"):
        for _ in range(args.rounds):
            for way, folder in (("tower every step", None), ("features once", features)):
                result = timed_run(args.vlm, args.world, work / "run", stage, args.steps, folder)
                runs.setdefault(stage, {}).setdefault(way, []).append(result["steps_per_s"])
    shutil.rmtree(work, ignore_errors=True)
    laptop_steps = {"stage1": 2 * 400, "stage2": 2 * 420}  # 2 epochs of 6,400 image records (stage 2: +320 text)
    rows = {}
    for stage, ways in runs.items():
        every, once = (statistics.median(ways[w]) for w in ("tower every step", "features once"))
        rows[stage] = {
            "steps_per_s": {"tower every step": every, "features once": once},
            "speedup": once / every,
            "laptop_stage_s": {"tower every step": laptop_steps[stage] / every,
                               "features once": laptop_steps[stage] / once},
        }  # fmt: skip
    report = {"machine": machine(), "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
              "table_build_s": table_s, "stages": rows, "runs": runs}  # fmt: skip
    lines = [
        "# Tower features: computed once, against the tower every step",
        "",
        f"Machine: {report['machine']}, {args.threads} threads. {args.rounds} alternations of {args.steps} steps per "
        f"stage and way; steps/s is the median of the steady rates. The table (every training image through the tower "
        f"once, in stage 1) took {table_s:.0f} s, with one training step and loading.",
        "",
        "| stage | tower every step (steps/s) | features once (steps/s) | speed-up | laptop plan stage (s): every step → once |",
        "|---|---:|---:|---:|---:|",
    ]
    for stage, row in rows.items():
        rate, laptop = row["steps_per_s"], row["laptop_stage_s"]
        lines.append(
            f"| {stage} | {rate['tower every step']:.2f} | {rate['features once']:.2f} | {row['speedup']:.2f}× | "
            f"{laptop['tower every step']:.0f} → {laptop['features once']:.0f} |"
        )
    markdown = "\n".join(lines) + "\n"
    write_results(args.out_dir, NAME, report, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
