"""The LLaVA pipeline on the synthetic world: full ViT tokens vs SparseFormer vs pooled ViT tokens, same LLM.

    uv run python benchmarks/vlm_synthetic.py --eval-limit 800  # after synthetic_world.py, bootstrap_synthetic.py
                                                                # and mllm-sparse pretrain-llm
    uv run python benchmarks/vlm_synthetic.py --epochs 0.05 --stage2-epochs 0.05 --eval-limit 40 \
        --work runs/vlm_smoke --out-dir /tmp/vlm_smoke          # a smoke run
    uv run python benchmarks/vlm_synthetic.py --eval-limit 800 --budgets 9 16 36 --students \
        --arms vit sparseformer pooled visionzip m3 elastic --work runs/sw/vlm_peers --name vlm_peers  # the peers

This is `mllm-sparse ablate` (mllm_sparse_recipes/ablation/) on the synthetic world's benchmark setting: the
teacher of `synthetic_world.py`, the SparseFormers of `bootstrap_synthetic.py` at N = 1/4 and 1/9 of its 196 patch
tokens (rounded down to a square so that every latent starts on the RoI grid: 49 and 16), and the scene-pretrained
tiny Llama of `mllm-sparse pretrain-llm`, the world's stand-in for Vicuna. Arms, each a stock
`LlavaForConditionalGeneration` with the same LLM and an `mlp2x_gelu` projector, trained in LLaVA's two stages with
the same data, steps and schedule and scored after each:

  (a) `vit`:             the teacher ViT's full patch tokens (LLaVA-style, CLS dropped);
  (b) `sparseformer-N`:  the SparseFormer bootstrapped from that teacher with N latent tokens, its CLS token dropped;
  (c) `pooled-N`:        the teacher's patch tokens average-pooled to an n×n grid, the same N.

`--arms` adds the peers (`mllm-sparse ablate --help`): visionzip-N (the ViT's most-attended patches plus merged
contextual tokens), m3-N (one model over nested pooled grids) and elastic-N (one elastic SparseFormer and one model
over every budget). `--budgets` picks the budgets (default: the students'); a budget without a student gets its
SparseFormer bootstrapped by the ablation from the world (`--bootstrap-steps`), so with `--students` given empty every
dedicated encoder and the elastic one come from the same recipe.

Reported (see `mllm-sparse ablate`): accuracy by question type and object size next to the question-only prior,
paired differences with cluster-bootstrap intervals, encode / prefill / time to first token side by side, plots.
Writes benchmarks/results/vlm_synthetic.{json,md} and vlm_synthetic_{accuracy,speed}.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from results_io import RESULTS, machine, write_results

from llava_adapter.llms import TINY_LLMS
from mllm_sparse_recipes.ablation import ARMS, DEFAULT_ARMS, AblationSettings
from mllm_sparse_recipes.ablation.plots import plot
from mllm_sparse_recipes.ablation.report import to_markdown
from mllm_sparse_recipes.ablation.run import arm_towers, run
from mllm_sparse_recipes.cli import configure_logging
from mllm_sparse_recipes.defaults import STAGE1_PROJECTOR_LR, STAGE2_LR, VLM_BATCH_SIZE, teacher_spec

ROOT = Path(__file__).resolve().parent.parent
NAME = "vlm_synthetic"


def add_arm_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that define the arms and where their VLMs live (shared with token_probe.py)."""
    parser.add_argument("--teacher", type=Path, default=Path("runs/sw/teacher"))
    parser.add_argument("--world", type=Path, default=Path("runs/sw/train_default"))
    parser.add_argument(
        "--students",
        nargs="*",
        default=["49=runs/sw/bootstrap/n49", "16=runs/sw/bootstrap/n16"],
        help="TOKENS=ENCODER_DIR for each bootstrapped SparseFormer (the pooled arm uses the same TOKENS)",
    )
    parser.add_argument("--work", type=Path, default=Path("runs/sw/vlm"))
    parser.add_argument(
        "--llm",
        default="runs/sw/scene_llm",
        help="the LLM every arm starts from: a folder (default: the scene-pretrained tiny Llama of `mllm-sparse "
        "pretrain-llm`) or a tiny LLM name for one trained from scratch",
    )


def arms(args) -> dict[str, dict[str, Any]]:
    """Arm name → its tower (`BuildVlmSettings` fields): the default arms at the students' budgets."""
    budgets = [int(spec.partition("=")[0]) for spec in args.students]
    encoders = {int(n): folder for n, _, folder in (spec.partition("=") for spec in args.students)}
    settings = {"teacher": teacher_spec(args.teacher), "budgets": budgets, "arms": list(DEFAULT_ARMS)}
    return arm_towers(settings, encoders)


def build_arm(args, tower: dict[str, Any], base: Path) -> None:
    """`build-vlm` an arm's untrained VLM (tower, `mlp2x_gelu` projector, `args.llm`) into `base` unless there."""
    from llava_adapter.build_vlm import BuildVlmSettings
    from llava_adapter.build_vlm import run as build_vlm

    if not (base / "config.json").is_file():
        build_vlm(BuildVlmSettings(**tower, llm=str(args.llm), tokenizer_corpus=args.world, projector="mlp2x_gelu",
                                   out=base, seed=0))  # fmt: skip


def llm_origin(llm: str) -> str:
    """How the arms' LLM came about, in words, for the report."""
    if llm in TINY_LLMS:
        return "tiny, random init"
    pretrain = Path(llm) / "scene_pretrain.json"
    if pretrain.is_file():
        report = json.loads(pretrain.read_text())
        by_type = ", ".join(f"{t} {v:.0f}%" for t, v in report["final"]["by_type"].items())
        return f"scene-pretrained, {report['steps']} steps; on scene tokens: {by_type}"
    return "pretrained"


def main(argv: list[str] | None = None) -> int:
    configure_logging()  # the libraries' progress lines, as the command line shows them
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arm_arguments(parser)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(DEFAULT_ARMS), help="the arms to train")
    parser.add_argument("--budgets", type=int, nargs="+", help="token budgets (default: the students')")
    parser.add_argument(
        "--budgets-per-step", type=int, help="m3 and elastic: budgets per training batch (default: all)"
    )
    parser.add_argument("--bootstrap-steps", type=int, default=2400, help="steps per SparseFormer bootstrapped here")
    parser.add_argument("--epochs", type=float, default=1.0, help="stage 1's epochs")
    parser.add_argument("--batch-size", type=int, default=VLM_BATCH_SIZE)
    parser.add_argument(
        "--lr",
        type=float,
        default=0.0,
        help="the LLM's learning rate in stage 1; 0 (default) keeps the scene-pretrained LLM frozen, as LLaVA's "
        "stage 1 does; use 2e-3 with --llm tiny-llama",
    )
    parser.add_argument("--projector-lr", type=float, default=STAGE1_PROJECTOR_LR)
    parser.add_argument(
        "--stage2-epochs", type=float, default=1.0, help="stage 2's epochs (LLM and projector); 0: none"
    )
    parser.add_argument("--stage2-lr", type=float, default=STAGE2_LR, help="stage 2's learning rate, LLM and projector")
    parser.add_argument("--eval-limit", type=int, help="score only the first N test records")
    parser.add_argument("--timing-questions", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default=NAME, help=f"the results' file name (default: {NAME})")
    args = parser.parse_args(argv)
    if args.llm not in TINY_LLMS and not (Path(args.llm) / "config.json").is_file():
        parser.error(
            f"--llm {args.llm}: no LLM there; run `mllm-sparse pretrain-llm --data {args.world} --out {args.llm}` "
            "first, or pass --llm tiny-llama for an LLM trained from scratch"
        )
    budgets = args.budgets or [int(spec.partition("=")[0]) for spec in args.students]
    given = [s for s in args.students if s.partition("=")[0] == "elastic" or int(s.partition("=")[0]) in budgets]
    settings = AblationSettings(
        teacher=str(args.teacher), budgets=budgets, llm=str(args.llm), arms=args.arms, world=args.world,
        encoders=given, bootstrap_steps=args.bootstrap_steps, stage1_epochs=args.epochs,
        stage2_epochs=args.stage2_epochs,
        batch_size=args.batch_size, lr=args.lr, projector_lr=args.projector_lr, stage2_lr=args.stage2_lr,
        timing_questions=args.timing_questions, threads=args.threads, out=args.work,
        eval_limit=args.eval_limit or None, budgets_per_step=args.budgets_per_step,
    )  # fmt: skip  # the ablation's model_max_length: the vit arm's conversations reach ~650 tokens, none is cut
    report, _ = run(settings, write=False)
    report |= {"machine": machine(), "llm_origin": llm_origin(str(args.llm))}
    report = json.loads(json.dumps(report).replace(f"{ROOT}/", ""))  # paths in the repository, as committed
    intro = f"Machine: {report['machine']}. The arms' LLM: {report['llm_origin']}."
    markdown = to_markdown(report, "LLaVA pipeline on the synthetic world", intro, name=args.name)
    write_results(args.out_dir, args.name, report, markdown)
    plot(report, args.out_dir, name=args.name)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
