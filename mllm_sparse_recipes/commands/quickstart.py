"""`mllm-sparse quickstart`: the whole pipeline, end to end, on the built-in synthetic world.

    mllm-sparse quickstart                              # the laptop plan
    mllm-sparse quickstart --plan smoke --out runs/qs   # every stage for a few steps: checks an install, learns nothing

Stages, each the library call behind the command a user would run, each writing its own folder under --out:

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

Rerunning the same command continues an interrupted run: a stage counts as finished once it has returned
(OUT/.done/STAGE); the bootstrap, the LLM's pretraining and the two LLaVA stages resume from their last checkpoints,
any other unfinished stage starts again from a cleared folder. A rerun may change the settings of stages not
finished yet, and is refused, naming them, if it changes those of a finished one. OUT/quickstart.{json,md} summarise
every stage: its output, its time and what it reached, and end with the commands to go on from here.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from mllm_sparse_recipes.plans import PLANS, Plan

from . import parser as command_parser
from . import settings_from

SETTINGS = "mllm_sparse_recipes.quickstart:QuickstartSettings"


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("quickstart", __doc__)
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="where every stage's folder goes")
    p.add_argument("--plan", choices=sorted(PLANS), default="laptop", help="stage sizes (the flags below override)")
    p.add_argument("--num-latent-tokens", type=int, default=16,
                   help="the token budget: the image tokens the LLM reads (the CLS token is not one)")  # fmt: skip
    for field in dataclasses.fields(Plan):
        plans = ", ".join(f"{name} {getattr(plan, field.name):g}" for name, plan in sorted(PLANS.items()))
        p.add_argument("--" + field.name.replace("_", "-"), type=float if field.type == "float" else int,
                       help=f"{Plan.HELP[field.name]} (default: the plan's: {plans})")  # fmt: skip
    p.add_argument("--llm", type=Path, help="a causal LM folder to use (default: pretrain one in stage 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mllm_sparse_recipes.quickstart import QuickstartSettings, run, summary_line

    settings = settings_from(args, QuickstartSettings)
    report, _ = run(settings)
    print(summary_line(report, settings.out))  # the tables are in the report file
    return 0
