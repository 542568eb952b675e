"""`mllm-sparse bootstrap`: align a SparseFormer student with its CLIP ViT teacher, without labels."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import parser as command_parser
from . import settings_from

SETTINGS = "bootstrap.train:BootstrapSettings"  # what `main` hands to the library

DESCRIPTION = r"""
Align a SparseFormer student with its CLIP ViT teacher, without labels.

    mllm-sparse bootstrap --teacher SPEC --num-latent-tokens N --data PATH --out DIR [--steps S | --epochs E] [...]

N is the token budget: the latent tokens, the image tokens an LLM reads; the student also has a CLS token where the
teacher has one, never counted in N. `--budgets 9 16 36 64` trains one elastic student for all of them instead
(`model(pixels, num_latent_tokens=16)` picks one per call), reported at each. `--init-from ENCODER` starts from an
existing SparseFormer instead of the teacher's blocks, e.g. to make the released CLIP-L one elastic with its teacher:

    mllm-sparse bootstrap --teacher open_clip:ViT-L-14@openai --init-from sparseformer_btsp_openai_clip_large \
        --init-pretrained official --budgets 9 16 36 63 --data PATH --out DIR

DIR becomes the encoder (`AutoModel.from_pretrained(DIR)` after `import mllm_sparse`) with `bootstrap_report.{json,md}`;
checkpoints go to DIR/checkpoints/step_*/ (every `--save-every` steps and at the end) and `--resume` continues from
the newest good one exactly (same data order, same optimizer and RNG state). A run without `--resume` into a DIR that
holds checkpoints is refused; so is a resumed run with a setting that changes the weights (all but --eval-every,
--save-every, --workers, --images-in-memory and --device); a non-finite loss or gradient stops the run before
anything is saved from it.

Data parallel: `torchrun --nproc_per_node G -m mllm_sparse_recipes.cli bootstrap ...` (add `--nnodes`/`--rdzv-endpoint`
for several nodes). `--batch-size` stays the global batch, split across ranks, so a run gives the same result on any
number of ranks.
"""


def build_parser(budget_required: bool = True) -> argparse.ArgumentParser:
    """The command's parser; `budget_required=False` lets the deprecated `--num-tokens` stand in for
    `--num-latent-tokens`."""
    p = command_parser("bootstrap", DESCRIPTION)
    p.add_argument("--teacher", required=True, metavar="SPEC", help="open_clip:NAME[@TAG|PATH] or hf:ID|DIR")
    p.add_argument("--num-latent-tokens", type=int, required=budget_required, metavar="N",
                   help="the token budget: latent tokens, the image tokens an LLM reads (a CLS token, where the "
                   "teacher has one, is not counted)")  # fmt: skip
    p.add_argument("--num-tokens", type=int, help=argparse.SUPPRESS)  # deprecated: counted the CLS token
    p.add_argument("--budgets", type=int, nargs="+", metavar="N",
                   help="train one elastic student that serves all these budgets, each step the smallest and the "
                        "largest, every other step one drawn between them (then --num-latent-tokens is the default "
                        "one; omitted, the largest)")  # fmt: skip
    p.add_argument("--init-from", metavar="ENCODER",
                   help="start from this SparseFormer instead of inheriting from the teacher: a save_pretrained "
                   "folder, or a preset with --init-pretrained; its config sets the architecture (and, without "
                   "--num-latent-tokens, the budget; default: inherit the teacher's blocks)")  # fmt: skip
    p.add_argument("--init-pretrained", metavar="WEIGHTS",
                   help="weights of an --init-from preset: an official *_converted.pth, a .safetensors file or "
                   "'official' (default: none, required with a preset)")  # fmt: skip
    p.add_argument("--data", type=Path, required=True, help="image folder, synthetic world or LLaVA .json")
    p.add_argument(
        "--image-folder", type=Path, help="root of a LLaVA .json's image paths (default: the .json's folder)"
    )
    p.add_argument("--out", type=Path, required=True, help="the encoder's folder")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="optimizer steps (default: 1000, unless --epochs is given)")
    budget.add_argument(
        "--epochs", type=float, help="passes over the training images, instead of --steps (default: none)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="global batch (all ranks, all accumulation steps)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, after warm-up (cosine decay)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default: 0)")
    p.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for student and teacher")
    p.add_argument("--cache-teacher", action="store_true", help="compute teacher embeddings once, reuse them")
    p.add_argument("--token-loss-weight", type=float, default=0.0,
                   help="weight of the token-level term (latent tokens vs RoI-pooled teacher patches; default: 0, "
                   "off)")  # fmt: skip
    p.add_argument("--region-distill-weight", type=float, default=0.0,
                   help="weight of the region term (random boxes, down to one teacher patch: RoI-weighted student "
                   "tokens vs the teacher's patches under the box; default: 0, off)")  # fmt: skip
    p.add_argument("--region-boxes", type=int, default=16, help="random boxes per image for the region term")
    p.add_argument("--token-loss-layer", type=int, default=-1, help="student unit whose tokens the token terms align")
    p.add_argument("--trainable-cortex", type=int, help="cortex blocks to fine-tune (default: half, as the paper)")
    p.add_argument("--image-size", type=int, help="student input size (default: the teacher's)")
    p.add_argument("--num-sampling-points", type=int, default=16,
                   help="sampling points per latent token (the paper's)")  # fmt: skip
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of an image folder")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (default: 0, only at the end)")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (default: 0, only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in DIR/checkpoints")
    p.add_argument("--workers", type=int, default=0, help="data-loader workers (default: 0, in the main process)")
    p.add_argument(
        "--images-in-memory", action="store_true",
        help="decode each training image once and keep it in memory (uint8) for the later epochs: for a dataset "
        "that fits, read over many epochs (with --workers 0; each worker keeps its own)",
    )  # fmt: skip
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the initialisation, the data order and the boxes (default: 0)"
    )
    p.add_argument("--device", help="cuda or cpu (default: cuda when available, else cpu)")
    return p


def deprecated_budget(argv: list[str]) -> bool:
    """Whether `argv` gives the budget in its deprecated spelling, `--num-tokens`."""
    return any(arg == "--num-tokens" or arg.startswith("--num-tokens=") for arg in argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    elastic, started = (any(a == f or a.startswith(f"{f}=") for a in argv) for f in ("--budgets", "--init-from"))
    args = build_parser(budget_required=not (deprecated_budget(argv) or elastic or started)).parse_args(argv)
    if args.budgets and args.num_latent_tokens is None and args.num_tokens is None and args.init_from is None:
        args.num_latent_tokens = max(args.budgets)
    from bootstrap.train import BootstrapSettings, report_markdown, run

    if args.num_tokens is not None:
        if args.num_latent_tokens is not None:
            raise ValueError("give --num-latent-tokens only (--num-tokens is its deprecated spelling)")
        from bootstrap.teachers import load_teacher

        # --num-tokens counted the CLS token where the teacher has one: only the teacher knows
        has_cls = load_teacher(args.teacher).arch.has_cls
        args.num_latent_tokens = args.num_tokens - int(has_cls)
        if os.environ.get("RANK", "0") == "0":  # once under torchrun
            print(f"warning: --num-tokens is deprecated; it counted the CLS token"
                  f"{'' if has_cls else ' (this teacher has none)'}: use --num-latent-tokens "
                  f"{args.num_latent_tokens}", file=sys.stderr)  # fmt: skip
    result = run(settings_from(args, BootstrapSettings))
    if result is not None:  # the main rank's report
        print(report_markdown(result))
    return 0
