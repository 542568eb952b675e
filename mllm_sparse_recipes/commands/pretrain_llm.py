"""`mllm-sparse pretrain-llm`: scene pretraining, the synthetic world's stand-in for a pretrained LLM such as Vicuna.

    mllm-sparse pretrain-llm --data WORLD --out DIR [--llm tiny-llama] [--question-steps 2000 --record-steps 1000]

A tiny LLM is taught the world's LLaVA records with each image replaced by its scene tokens (one per object, from the
world's ground truth) through a small projector: first single questions (--question-steps), then whole multi-turn
records (--record-steps), each phase with its own warm-up and cosine. LLaVA's two stages then only have to teach the
projector (and the LLM) to present an image in a form this LLM already reads (`mllm_sparse_recipes.scene_llm`).

DIR becomes a plain HF causal LM folder with its tokenizer, for `mllm-sparse build-vlm --llm DIR`, with
`scene_pretrain.{json,md}` (test accuracy by question type) and checkpoints/step_*/ (every --eval-every steps and at
the end), which --resume continues exactly from the newest good one. A run without --resume into a DIR that holds
checkpoints is refused, and so is a resumed run with a setting that changes the weights (all but --eval-every,
--eval-records and --threads).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import parser as command_parser
from . import settings_from
from ._vlm_options import TEMPLATES

SETTINGS = "mllm_sparse_recipes.scene_llm:ScenePretrainSettings"  # what `main` hands to the library


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("pretrain-llm", __doc__)
    p.add_argument("--data", type=Path, required=True, help="a world written by `mllm-sparse synth`")
    p.add_argument("--out", type=Path, required=True, help="the LLM's folder (DIR above)")
    p.add_argument("--llm", default="tiny-llama", help="a tiny LLM name, or a causal LM folder to continue")
    p.add_argument("--vocab-size", type=int, default=1024, help="tiny LLMs: BPE vocabulary size")
    p.add_argument("--template", choices=TEMPLATES, default="chat_template", help="the one VLM training will use")
    p.add_argument("--question-steps", type=int, default=2000, help="phase 1: steps on single questions")
    p.add_argument("--question-batch-size", type=int, default=64, help="phase 1: questions per step")
    p.add_argument("--record-steps", type=int, default=1000, help="phase 2: steps on whole (multi-turn) records")
    p.add_argument("--record-batch-size", type=int, default=16, help="phase 2: records per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of each phase")
    p.add_argument("--warmup-steps", type=int, default=100, help="per phase; each phase then decays to 0 (cosine)")
    p.add_argument("--eval-every", type=int, default=500, help="test accuracy and a checkpoint every this many steps "
                   "(0: only at the end)")  # fmt: skip
    p.add_argument("--eval-records", type=int, default=500, help="test records scored (phase 1: their single "
                   "questions)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="the same seed and settings give the same weights (default: 0)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mllm_sparse_recipes.scene_llm import ScenePretrainSettings, run

    report = run(settings_from(args, ScenePretrainSettings))
    final = report["final"]
    print(f"test accuracy {final['accuracy']}% {final['by_type']}; LLM saved to {args.out}")
    return 0
