"""The LLaVA pipeline on the synthetic world: full ViT tokens vs SparseFormer vs pooled ViT tokens, same LLM.

    uv run python benchmarks/vlm_synthetic.py --eval-limit 800  # after synthetic_world.py, bootstrap_synthetic.py
                                                                # and mllm-sparse pretrain-llm
    uv run python benchmarks/vlm_synthetic.py --epochs 0.05 --stage2-epochs 0.05 --eval-limit 40 \
        --work runs/vlm_smoke                                   # a smoke run

Arms, each a stock `LlavaForConditionalGeneration` built by `mllm-sparse build-vlm` with the same LLM (by default
the scene-pretrained tiny Llama of `mllm-sparse pretrain-llm`, the world's stand-in for Vicuna) and an `mlp2x_gelu`
projector, trained by `scripts/train_vlm.py` on the world's `llava_train.json` with the same data, steps and
schedule in LLaVA's two stages (stage 1: the projector only, the LLM frozen; stage 2, from the stage-1 model: LLM
and projector; the tower frozen throughout), then scored by `mllm-sparse eval-vlm` on `llava_test.json` after each
stage:

  (a) `vit`:             the teacher ViT's full patch tokens (LLaVA-style, CLS dropped);
  (b) `sparseformer-N`:  the SparseFormer bootstrapped from that teacher with N latent tokens (N = 1/4 and 1/9,
                         rounded down to a square so that every latent starts on the RoI grid: 49 and 16 for 196
                         patches), its CLS token dropped as (a)'s is;
  (c) `pooled-N`:        the teacher's patch tokens average-pooled to an n×n grid, the same N.

The table opens with the question-only prior: each test question answered with the training split's most frequent
answer to the same question text, i.e. the best an LLM that ignores the image can do; an arm has learned to read
the image only where it beats that row.

Each SparseFormer arm is compared with the pooled arm of its N and with (a), and each pooled arm with (a), on the
same answers: the accuracy difference, overall and by the size of the object asked about, with a 95% interval of a
cluster bootstrap over test records (`llava_adapter.compare`).

Afterwards every trained arm is loaded side by side and timed on the same test questions, round-robin in one
process: vision encode, LLM prefill, and time to first token (encode + prefill), batch 1, KV cache on.
Writes benchmarks/results/vlm_synthetic.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from results_io import RESULTS, machine, write_results

from llava_adapter.llms import TINY_LLMS
from llava_adapter.recipe import (
    STAGE1_PROJECTOR_LR,
    STAGE2_LR,
    TEMPLATE,
    VLM_BATCH_SIZE,
    eval_vlm_arguments,
    teacher_spec,
    train_vlm_arguments,
)
from mllm_sparse.files import read_json

ROOT = Path(__file__).resolve().parent.parent


def add_arm_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that define the arms and where their VLMs live (shared with token_probe.py)."""
    parser.add_argument("--teacher", type=Path, default=Path("runs/sw/teacher"))
    parser.add_argument("--world", type=Path, default=Path("runs/sw/train_default"))
    parser.add_argument(
        "--students",
        nargs="+",
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


def arms(args) -> dict[str, list[str]]:
    """Arm name → the `build-vlm` tower arguments."""
    teacher = teacher_spec(args.teacher)
    out = {"vit": ["--encoder", teacher]}
    for spec in args.students:
        tokens, _, folder = spec.partition("=")
        out[f"sparseformer-{tokens}"] = ["--encoder", folder]
        out[f"pooled-{tokens}"] = ["--encoder", teacher, "--pool-tokens", tokens]
    return out


def run(command: list[str], log: Path) -> float:
    """Run a pipeline command as a user would (its own process); seconds taken. Output goes to `log`."""
    start = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ})
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({done.returncode}); see {log}")
    return time.perf_counter() - start


def build_arm(args, tower_args: list[str], base: Path) -> None:
    """`build-vlm` an arm's untrained VLM (tower, `mlp2x_gelu` projector, `args.llm`) into `base` unless there."""
    if not (base / "config.json").is_file():
        base.parent.mkdir(parents=True, exist_ok=True)
        run(
            [sys.executable, "-m", "mllm_sparse.cli", "build-vlm", *tower_args, "--llm", args.llm, "--tokenizer-corpus",
             str(args.world), "--projector", "mlp2x_gelu", "--out", str(base), "--seed", "0"],
            base.parent / "build.log",
        )  # fmt: skip


def train_stage(args, start: Path, out: Path, log: Path, epochs: float, lr: float, projector_lr: float) -> None:
    """`scripts/train_vlm.py` from the model in `start` into `out` (unless there): `lr` for the LLM, `projector_lr`
    for the projector, the tower frozen."""
    if not (out / "config.json").is_file():
        command = train_vlm_arguments(start, out, args.world, epochs, lr, projector_lr, batch_size=args.batch_size)
        run([sys.executable, "scripts/train_vlm.py", *command], log)


def evaluate_stage(args, model: Path, evaluation: Path, log: Path, train_log: Path) -> dict:
    """`mllm-sparse eval-vlm` of `model` on the test split (unless done), summarised with its training run."""
    if not (evaluation / "eval_vlm.json").is_file():
        command = eval_vlm_arguments(model, args.world, evaluation, args.eval_limit, progress=False)
        run([sys.executable, "-m", "mllm_sparse.cli", "eval-vlm", *command], log)
    report = json.loads((evaluation / "eval_vlm.json").read_text())
    config = json.loads((model / "config.json").read_text())
    # The Trainer's closing summary line, e.g. {'train_runtime': '20.61', ..., 'train_loss': '3.513', ...}: read from
    # the log so that an arm trained by an earlier run still reports its time
    text = train_log.read_text()
    runtime = re.findall(r"'train_runtime': '?([0-9.]+)", text)
    loss = re.findall(r"'train_loss': '?([0-9.]+)", text)
    return {
        "image_tokens": config["image_seq_length"],
        "train_seconds": float(runtime[-1]) if runtime else None,
        "accuracy": report["accuracy"],
        "by_type": {k: v["accuracy"] for k, v in report["by_type"].items()},
        "by_target_size": {k: v["accuracy"] for k, v in report["by_target_size"].items()},
        "questions": report["num_answers"],
        "mean_train_loss": float(loss[-1]) if loss else None,
    }


def final_stage(args) -> tuple[str, str]:
    """(model folder, evaluation folder) of an arm's last stage, inside its work folder."""
    return ("model_stage2", "eval_stage2") if args.stage2_epochs else ("model", "eval")


def train_arm(args, name: str, tower_args: list[str]) -> dict:
    """Build, train and score one arm: stage 1 (LLM at `--lr`, by default frozen), then, unless `--stage2-epochs 0`,
    stage 2 from the stage-1 model (LLM and projector at `--stage2-lr`). The result is the last stage's score, with
    stage 1's under "stage1" when there is a stage 2."""
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    base, model = work / "base", work / "model"
    build_arm(args, tower_args, base)
    train_stage(args, base, model, work / "train.log", args.epochs, args.lr, args.projector_lr)
    stage1 = evaluate_stage(args, model, work / "eval", work / "eval.log", work / "train.log")
    if not args.stage2_epochs:
        return stage1
    (stage2_model, stage2_eval), stage2_log = final_stage(args), work / "train_stage2.log"
    train_stage(args, model, work / stage2_model, stage2_log, args.stage2_epochs, args.stage2_lr, args.stage2_lr)
    stage2 = evaluate_stage(args, work / stage2_model, work / stage2_eval, work / "eval_stage2.log", stage2_log)
    return stage2 | {"train_seconds": (stage1["train_seconds"] or 0) + (stage2["train_seconds"] or 0), "stage1": stage1}


SIZES = ("small", "medium", "large")


def paired_comparisons(args, names: list[str], evaluation: str) -> list[dict]:
    """Each SparseFormer arm against the pooled arm of the same N and against (a), and each pooled arm against (a):
    accuracy differences on the same answers, overall and by the size of the object asked about, each with a 95%
    cluster-bootstrap interval over test records."""
    from llava_adapter.compare import paired_difference

    def predictions(name: str) -> list[dict]:
        return json.loads((args.work / name / evaluation / "eval_vlm.json").read_text())["predictions"]

    pairs = []
    for name in names:
        if name.startswith("sparseformer-"):
            pooled = name.replace("sparseformer-", "pooled-")
            pairs += [(name, pooled)] if pooled in names else []
            pairs.append((name, "vit"))
        elif name.startswith("pooled-"):
            pairs.append((name, "vit"))

    def compare(a: list[dict], b: list[dict]) -> dict | None:
        return paired_difference(a, b) if a else None  # None: no question of that kind among the scored ones

    out = []
    for a, b in pairs:
        pa, pb = predictions(a), predictions(b)
        by_size = {
            size: compare([p for p in pa if p["target_size"] == size], [p for p in pb if p["target_size"] == size])
            for size in SIZES
        }
        out.append({"a": a, "b": b, "all": paired_difference(pa, pb), **by_size})
    return out


def blind_baseline(train_data: Path, scored: list[dict]) -> dict:
    """The question-only prior (`llava_adapter.evaluate.question_only_prior`) in the shape of an arm's summary."""
    from llava_adapter.evaluate import question_only_prior

    prior = question_only_prior(train_data, scored)
    return {
        "image_tokens": 0,
        "train_seconds": None,
        "accuracy": prior["accuracy"],
        "by_type": {k: v["accuracy"] for k, v in prior["by_type"].items()},
        "by_target_size": {k: v["accuracy"] for k, v in prior["by_target_size"].items()},
        "questions": prior["num_answers"],
        "mean_train_loss": None,
    }


@torch.no_grad()
def time_side_by_side(args, names: list[str]) -> dict:
    """Median encode / prefill / time-to-first-token per arm, the arms interleaved question by question."""
    from llava_adapter.chat import ChatEngine

    torch.set_num_threads(args.threads)
    final = final_stage(args)[0]
    engines = {n: ChatEngine.from_pretrained(args.work / n / final, template=TEMPLATE) for n in names}
    records = [r for r in read_json(args.world / "llava_test.json") if "image" in r][: args.timing_questions]
    samples: dict[str, dict[str, list[float]]] = {n: {"encode": [], "prefill": [], "ttft": []} for n in names}
    for warm in (True, False):
        for record in records[:2] if warm else records:
            question = record["conversations"][0]["value"]
            for name, engine in engines.items():
                engine.reset()
                reply = engine.chat(question, args.world / record["image"], max_new_tokens=1)
                if not warm:
                    t = reply.timings
                    samples[name]["encode"].append(t.encode_s)
                    samples[name]["prefill"].append(t.prefill_s)
                    samples[name]["ttft"].append(t.encode_s + t.prefill_s)
    return {
        n: {f"{k}_ms": statistics.median(v) * 1000 for k, v in s.items()} | {"questions": len(records)}
        for n, s in samples.items()
    }


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


def score_table(prior: dict, arms: dict[str, dict]) -> list[str]:
    """Markdown rows scoring the arms (first the question-only prior), with (a) `vit` as the reference."""
    types = sorted({t for r in arms.values() for t in r["by_type"]})
    base = arms["vit"]["accuracy"]

    def percent(x: float | None) -> str:
        return "n/a" if x is None else f"{x * 100:.1f}%"

    def gain(accuracy: float) -> str:
        """The arm's gain over the question-only prior as a share of (a)'s gain (n/a if (a) gains nothing)."""
        return (
            f"{(accuracy - prior['accuracy']) / (base - prior['accuracy']) * 100:.0f}%"
            if base > prior["accuracy"]
            else "n/a"
        )

    lines = [
        "| arm | image tokens | accuracy | vs (a) | gain vs (a) | "
        + " | ".join(types + [f"{s} objects" for s in SIZES])
        + " | train s |",
        "|---|---:|---:|---:|---:|" + "---:|" * (len(types) + len(SIZES)) + "---:|",
    ]
    for name, r in {"question-only prior": prior, **arms}.items():
        lines.append(
            f"| {name} | {r['image_tokens']} | **{percent(r['accuracy'])}** | "
            + (f"{r['accuracy'] / base * 100:.0f}%" if base else "n/a")
            + f" | {gain(r['accuracy'])} | "
            + " | ".join(percent(r["by_type"].get(t)) for t in types)
            + " | "
            + " | ".join(percent(r["by_target_size"].get(s)) for s in SIZES)
            + " | "
            + ("n/a" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}")
            + " |"
        )
    return lines


def paired_table(pairs: list[dict]) -> list[str]:
    """Markdown rows of `paired_comparisons`: a − b in points [95% interval], bold where the interval excludes 0."""

    def cell(d: dict | None) -> str:
        if d is None:
            return "n/a"
        text = f"{d['difference'] * 100:+.1f} [{d['low'] * 100:+.1f}, {d['high'] * 100:+.1f}]"
        return f"**{text}**" if d["low"] > 0 or d["high"] < 0 else text

    lines = [
        "| a | b | all questions | " + " | ".join(f"{s} objects" for s in SIZES) + " |",
        "|---|---|---:|" + "---:|" * len(SIZES),
    ]
    for p in pairs:
        lines.append(f"| {p['a']} | {p['b']} | " + " | ".join(cell(p[k]) for k in ("all", *SIZES)) + " |")
    return lines


def to_markdown(report: dict) -> str:
    results, timing = report["arms"], report["timing"]
    staged = report.get("stage2_epochs")
    lines = [
        "# LLaVA pipeline on the synthetic world",
        "",
        f"Machine: {report['machine']}. LLM `{report['llm']}` ({report['llm_origin']}). Stage 1: {report['epochs']} "
        f"epoch(s) of `llava_train.json`, batch {report['batch_size']}, LLM lr {report['lr']} (0: frozen), projector "
        f"lr {report['projector_lr']}"
        + (
            f"; stage 2: {staged} epoch(s) from each stage-1 model, LLM and projector at lr {report['stage2_lr']}"
            if staged
            else ""
        )
        + f"; the tower frozen. Test questions: {results['vit']['questions']}. *vs (a)*: accuracy as a share of "
        "(a)'s; *gain vs (a)*: the gain over the question-only prior as a share of (a)'s gain. Last columns: accuracy "
        "by the size of the object a question asks about.",
        "",
    ]
    if staged:
        lines += ["## After stage 2 (train s: both stages)", "", *score_table(report["blind"], results), ""]
        lines += ["## After stage 1", "", *score_table(report["blind"], {n: r["stage1"] for n, r in results.items()})]
    else:
        lines += score_table(report["blind"], results)
    lines += [
        "",
        f"## Paired differences{' after stage 2' if staged else ''}",
        "",
        "a − b in accuracy points on the same answers, [95% interval] of a cluster bootstrap over test records "
        "(`llava_adapter.compare`); bold: the interval excludes 0.",
        "",
        *paired_table(report["paired"]),
    ]
    if staged:
        lines += ["", "## Paired differences after stage 1", "", *paired_table(report["paired_stage1"])]
    vit = timing["vit"]
    lines += [
        "",
        f"## Time to first token (batch 1, median of {vit['questions']} questions, arms interleaved in one process)",
        "",
        "| arm | image tokens | encode ms | LLM prefill ms | TTFT ms | TTFT vs (a) | prefill vs (a) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in timing.items():
        lines.append(
            f"| {name} | {results[name]['image_tokens']} | {t['encode_ms']:.1f} | {t['prefill_ms']:.1f} | "
            f"{t['ttft_ms']:.1f} | {t['ttft_ms'] / vit['ttft_ms']:.2f}× | {t['prefill_ms'] / vit['prefill_ms']:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arm_arguments(parser)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=VLM_BATCH_SIZE)
    parser.add_argument(
        "--lr",
        type=float,
        default=0.0,
        help="the LLM's learning rate; 0 (default) keeps the scene-pretrained LLM frozen, as LLaVA's stage 1 does; "
        "use 2e-3 with --llm tiny-llama",
    )
    parser.add_argument("--projector-lr", type=float, default=STAGE1_PROJECTOR_LR)
    parser.add_argument(
        "--stage2-epochs",
        type=float,
        default=1.0,
        help="epochs of stage 2 from each stage-1 model, LLM and projector trained (LLaVA's fine-tuning); 0: none",
    )
    parser.add_argument("--stage2-lr", type=float, default=STAGE2_LR, help="stage 2's learning rate, LLM and projector")
    parser.add_argument("--eval-limit", type=int, help="score only the first N test records")
    parser.add_argument("--timing-questions", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.llm not in TINY_LLMS and not (Path(args.llm) / "config.json").is_file():
        parser.error(
            f"--llm {args.llm}: no LLM there; run `mllm-sparse pretrain-llm --data {args.world} --out {args.llm}` "
            "first, or pass --llm tiny-llama for an LLM trained from scratch"
        )
    results = {}
    for name, tower_args in arms(args).items():
        results[name] = train_arm(args, name, tower_args)
        print(name, json.dumps(results[name]), flush=True)
    report = {
        "machine": machine(),
        "llm": args.llm,
        "llm_origin": llm_origin(args.llm),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "projector_lr": args.projector_lr,
        "stage2_epochs": args.stage2_epochs,
        "stage2_lr": args.stage2_lr,
        "teacher": str(args.teacher),
        "arms": results,
        "blind": blind_baseline(
            args.world / "llava_train.json",
            json.loads((args.work / "vit" / "eval" / "eval_vlm.json").read_text())["predictions"],
        ),
        "paired": paired_comparisons(args, list(results), final_stage(args)[1]),
        "paired_stage1": paired_comparisons(args, list(results), "eval") if args.stage2_epochs else None,
        "timing": time_side_by_side(args, list(results)),
    }
    write_results(args.out_dir, "vlm_synthetic", report, to_markdown(report))
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
