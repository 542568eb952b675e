"""`mllm-sparse lmms-task`: a LLaVA JSON test set as a local lmms-eval task pack, scored as `eval-vlm` scores it."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import parser as command_parser
from . import settings_from
from ._vlm_options import hidden_alias

SETTINGS = "llava_adapter.lmms_task:LmmsTaskSettings"  # what `main` hands to the library

DESCRIPTION = """Write a local lmms-eval task pack for a LLaVA JSON test set (e.g. a synthetic world's).

    mllm-sparse lmms-task --data runs/world/llava_test.json --out runs/lmms_tasks
    lmms-eval --model mllm_sparse_llava --model_args pretrained=runs/vlm \\
        --include_path runs/lmms_tasks --tasks mllm_sparse_synth --batch_size 8 --output_path runs/lmms_results

Two tasks: TASK asks every question with the gold answers of the earlier turns as context, exactly as
`mllm-sparse eval-vlm` does, and reports the same accuracy overall and per question type; TASK_chat asks each
record's questions in one conversation with the model's own answers as context (lmms-eval's multi-round
generation). The pack holds the documents (with absolute image paths), the task YAMLs and their utils.py. The
details: `llava_adapter.lmms_task`."""


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("lmms-task", DESCRIPTION)
    p.add_argument("--data", type=Path, required=True, help="LLaVA JSON test set (e.g. a world's llava_test.json)")
    p.add_argument("--out", type=Path, required=True, help="the pack folder, lmms-eval's --include_path")
    p.add_argument("--image-folder", type=Path, help="where the records' images are (default: --data's folder)")
    hidden_alias(p, "--image_folder", "image_folder", type=Path)  # LLaVA's spelling
    p.add_argument("--task", default="mllm_sparse_synth", help="the question task's name; the other is TASK_chat")
    p.add_argument("--limit", type=int, help="only the first N records (default: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from llava_adapter.lmms_task import LmmsTaskSettings, run

    pack = run(settings_from(args, LmmsTaskSettings))
    print(
        f"Wrote tasks {' and '.join(pack['tasks'])} ({pack['questions']} questions, {pack['records']} records) to "
        f"{pack['out']}. Run:\n  lmms-eval --model mllm_sparse_llava --model_args pretrained=MODEL_DIR "
        f"--include_path {pack['out']} --tasks {pack['tasks'][0]} --batch_size 8 --output_path RESULTS_DIR"
    )
    return 0
