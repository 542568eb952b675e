"""`mllm-sparse eval-vlm`: exact-match accuracy and throughput of a LLaVA model on a LLaVA-format test set."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import parser as command_parser
from . import settings_from
from ._vlm_options import TEMPLATES, hidden_alias

SETTINGS = "llava_adapter.evaluate:EvalVlmSettings"  # what `main` hands to the library

DESCRIPTION = """Score a LLaVA model on a LLaVA JSON test set: accuracy, throughput.

    mllm-sparse eval-vlm --model runs/vlm --data runs/world/llava_test.json --image-folder runs/world
    mllm-sparse eval-vlm --model runs/vlm --data test.json --image-folder images --batch-size 16 --limit 200 --out rep

Every human turn of every record is one question, asked with the gold answers of the earlier turns as context; a
prediction is right when it equals the gold answer after normalising (case, punctuation, whitespace, number words:
"Three." == "3"). The report breaks accuracy down by question type, object size, turn and modality, and gives the
throughput. A bad record or a missing image fails the run before the model loads, unless --skip-bad-records.
Written atomically into --out: eval_vlm.json (everything, every prediction) and eval_vlm.md (the tables, also
printed). The details: `llava_adapter.evaluate`."""


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("eval-vlm", DESCRIPTION)
    p.add_argument("--model", type=Path, required=True, help="a saved LLaVA folder (model + processor)")
    p.add_argument("--data", type=Path, required=True, help="LLaVA JSON test set (e.g. a world's llava_test.json)")
    p.add_argument("--image-folder", type=Path, help="where the records' images are (default: --data's folder)")
    hidden_alias(p, "--image_folder", "image_folder", type=Path)  # LLaVA's spelling
    p.add_argument(
        "--template",
        choices=TEMPLATES,
        help="the conversation template (default: the one the model folder records, vicuna_v1 where it records none)",
    )
    p.add_argument(
        "--num-latent-tokens",
        type=int,
        help="the token budget to encode images at, one the model's tower serves (an elastic tower serves several; "
        "default: the model's own)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call")
    hidden_alias(p, "--batch_size", "batch_size", type=int)
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit")
    hidden_alias(p, "--max_new_tokens", "max_new_tokens", type=int)
    p.add_argument("--limit", type=int, help="evaluate only the first N records (default: all)")
    p.add_argument("--out", type=Path, help="where eval_vlm.json and eval_vlm.md go (default: --model)")
    p.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", help="cast the model, e.g. bfloat16 (default: as saved)")
    p.add_argument("--skip-bad-records", action="store_true",
                   help="skip (and count) bad records and unreadable images instead of failing")  # fmt: skip
    hidden_alias(p, "--skip_bad_records", "skip_bad_records", action="store_true")
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (default: a progress bar on stderr)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from llava_adapter.evaluate import EvalVlmSettings, run, to_markdown

    report = run(settings_from(args, EvalVlmSettings))
    print(to_markdown(report), end="")
    return 0
