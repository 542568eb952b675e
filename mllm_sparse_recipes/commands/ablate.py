r"""`mllm-sparse ablate`: how many image tokens does the LLM need, and are a SparseFormer's better than pooling's?

    mllm-sparse ablate --world runs/quickstart/world --teacher runs/quickstart/teacher \
        --llm runs/quickstart/llm --budgets 4 16 49 --out runs/ablation
    mllm-sparse ablate --teacher open_clip:ViT-L-14-336@openai --llm lmsys/vicuna-7b-v1.5 --budgets 16 64 \
        --encoders 64=runs/btsp-L --bootstrap-data /data/imagenet/train --train-data llava_mix.json \
        --image-folder /data --test-data test.json --out runs/ablation-L

For each token budget N (latent tokens the LLM receives) it trains stock LLaVA models that differ only in the vision
tower, one per arm of --arms: sparseformer-N (a SparseFormer with N latent tokens bootstrapped from the teacher, or
given with --encoders N=DIR), pooled-N (the teacher ViT's patch tokens average-pooled to an n×n grid), vit (the
teacher's full patch tokens), visionzip-N (the ViT's most-attended patches plus merged contextual tokens), and two arms
of one model serving every budget, scored at each: m3-N (the ViT pooled to nested grids, M3-style) and elastic-N (one
elastic SparseFormer). Every arm starts from the same LLM and is trained with the same data, steps and schedule in
LLaVA's two stages, then scored after each stage. OUT/ablation.{json,md} hold the scores by question type and object
size beside the question-only prior, paired differences with 95% cluster-bootstrap intervals, the time to first token of
every arm side by side, and two plots. A rerun continues where a run stopped, and budgets can be added to a finished
ablation; a rerun that would train an arm differently is refused, naming the difference.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mllm_sparse_recipes import defaults
from mllm_sparse_recipes.ablation import ARMS, DEFAULT_ARMS

from . import parser as command_parser
from . import settings_from

SETTINGS = "mllm_sparse_recipes.ablation:AblationSettings"


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("ablate", __doc__)
    p.add_argument("--teacher", required=True, help="a `train-teacher` folder or a teacher spec (open_clip:…, hf:…)")
    p.add_argument("--budgets", type=int, nargs="+", required=True,
                   help="token budgets: image tokens the LLM reads, one set of arms each (squares)")  # fmt: skip
    p.add_argument("--llm", required=True, help="the LLM every arm starts from: a folder, a hub id or a tiny LLM")
    p.add_argument("--world", type=Path, help="a synthetic world: the default for the data options (default: none)")
    p.add_argument("--train-data", type=Path, help="LLaVA JSON for both stages (default: WORLD/llava_train.json)")
    p.add_argument("--image-folder", type=Path, help="root of the records' images (default: WORLD)")
    p.add_argument("--test-data", type=Path, help="LLaVA JSON to score (default: WORLD/llava_test.json)")
    p.add_argument("--encoders", nargs="*", default=[],
                   help="N=DIR: a bootstrapped SparseFormer for budget N; elastic=DIR: an elastic one serving every "
                   "budget, for the elastic arm (default: bootstrap each here)")  # fmt: skip
    p.add_argument("--bootstrap-data", type=Path, help="images to bootstrap missing encoders on (default: WORLD)")
    p.add_argument("--bootstrap-steps", type=int, default=2400, help="steps of 64 images per missing encoder")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(DEFAULT_ARMS), metavar="ARM",
                   help=f"the arms to train, from {', '.join(ARMS)}; m3 and elastic are one model each over all "
                   f"--budgets (default: {' '.join(DEFAULT_ARMS)})")  # fmt: skip
    p.add_argument("--budgets-per-step", type=int, metavar="K",
                   help="m3 and elastic: each training batch runs at K of the --budgets, the smallest always and "
                   "the others drawn, their losses averaged (up to K times the training time of one; default: all, "
                   "M3's recipe)")  # fmt: skip
    p.add_argument("--stage1-epochs", type=float, default=1.0, help="epochs of LLaVA's stage 1")
    p.add_argument("--stage2-epochs", type=float, default=1.0, help="epochs of LLaVA's stage 2 (0: stage 1 only)")
    p.add_argument("--batch-size", type=int, default=defaults.VLM_BATCH_SIZE, help="training batch, both stages")
    p.add_argument("--lr", type=float, default=0.0, help="stage 1's LLM learning rate (0: frozen, as LLaVA's)")
    p.add_argument("--projector-lr", type=float, default=defaults.STAGE1_PROJECTOR_LR, help="stage 1's projector lr")
    p.add_argument("--stage2-lr", type=float, default=defaults.STAGE2_LR, help="stage 2's lr, LLM and projector")
    p.add_argument("--model-max-length", type=int, default=2048, help="training sequences are truncated to this")
    p.add_argument("--train-args", default="", help='further `scripts/train_vlm.py` arguments for every stage, e.g. '
                   '"--bf16 True --gradient_checkpointing True" (default: none)')  # fmt: skip
    p.add_argument("--eval-limit", type=int, help="score only the first N test records (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="longest answer `eval-vlm` generates")
    p.add_argument("--timing-questions", type=int, default=32,
                   help="questions timed per arm, every arm loaded side by side (0: none)")  # fmt: skip
    p.add_argument("--tokenizer-corpus", type=Path, help="tiny LLMs: the tokenizer's text (default: WORLD)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    p.add_argument("--out", type=Path, default=Path("runs/ablation"), help="the ablation's folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mllm_sparse_recipes.ablation import AblationSettings
    from mllm_sparse_recipes.ablation.run import run

    _, markdown = run(settings_from(args, AblationSettings))
    print(markdown, end="")
    return 0
