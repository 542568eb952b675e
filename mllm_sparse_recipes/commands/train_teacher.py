"""`mllm-sparse train-teacher`: train a small open_clip CLIP contrastively on a synthetic world's captions."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from . import parser as command_parser
from . import settings_from

SETTINGS = "bootstrap.train_teacher:TeacherSettings"  # what `main` hands to the library

DESCRIPTION = """\
Train a small open_clip CLIP contrastively on a synthetic world's captions.

The teacher is what every later stage is measured against, so it is trained to a real zero-shot accuracy and
saved in open_clip's own formats:

    DIR/open_clip_model.safetensors   weights (open_clip.create_model(NAME, pretrained=this file))
    DIR/NAME.json                     the architecture (open_clip.add_model_config(this file))
    DIR/open_clip_config.json         architecture + preprocessing (open_clip.create_model("local-dir:DIR"))
    DIR/zero_shot.{json,md}           zero-shot top-1 on the world's test labels

With `--save-every N` the run also writes DIR/checkpoints/step_*/ every N steps and at the end, and `--resume`
continues from the newest good one: exactly with `--steps`; with `--minutes` the clock continues from the training
time the checkpoint records. A run without `--resume` into a DIR that holds checkpoints is refused, and so is a
resumed run with a setting that changes the weights (all but --threads, --device and --save-every); a non-finite loss
or gradient stops the run before anything is saved from it.
"""


def teacher_models() -> list[str]:
    """`bootstrap.TEACHER_MODELS`, read from its config folder: importing `bootstrap` would load torch."""
    spec = importlib.util.find_spec("bootstrap")
    folder = Path(spec.origin).parent / "model_configs" if spec and spec.origin else None
    return sorted(p.stem for p in folder.glob("*.json")) if folder else []


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("train-teacher", DESCRIPTION)
    p.add_argument("--data", type=Path, required=True, help="a world written by `mllm-sparse synth`")
    p.add_argument("--out", type=Path, required=True, help="output folder for the teacher")
    p.add_argument("--model", default="synth-vit-t-8",
                   help=f"open_clip architecture ({', '.join(teacher_models())})")  # fmt: skip
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="train for this long, the schedule following the clock "
                        "(default: 10, unless --steps is given)")  # fmt: skip
    budget.add_argument("--steps", type=int, help="train for this many steps, instead of --minutes (default: none)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate, after warm-up (cosine decay)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the budget")
    p.add_argument("--caption-weights", type=float, nargs="+", default=[0.0, 0.0, 1.0],
                   help="sampling weight of each caption of an image (full, principal + two, principal "
                   "alone)")  # fmt: skip
    p.add_argument("--region-weight", type=float, default=1.0,
                   help="weight of the region-caption term: each object's caption at its box, from scenes.jsonl; 0 "
                   "trains on whole-image captions alone")  # fmt: skip
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the initialisation, data order and caption choice (default: 0)"
    )
    p.add_argument("--save-every", type=int, default=0,
                   help="steps between checkpoints, also written at the end (default: 0, none)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in DIR/checkpoints")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available, else cpu)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from bootstrap.train_teacher import TeacherSettings, run, zero_shot_markdown

    print(zero_shot_markdown(run(settings_from(args, TeacherSettings))))
    return 0
