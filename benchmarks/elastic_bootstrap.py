"""One elastic SparseFormer against one dedicated SparseFormer per budget, bootstrapped on the synthetic world.

    uv run python benchmarks/elastic_bootstrap.py --teacher runs/quickstart/teacher --world runs/quickstart/world

Arms, all with the same steps, batch, data order, teacher cache and region term (the quickstart's bootstrap
settings): a dedicated student at each budget, and one elastic student for all budgets (`bootstrap --budgets`: each
step the smallest and the largest budget, every other step one between). Reported per budget: zero-shot top-1 and
held-out cosine of both, the elastic student's differences from the dedicated one (the targets: within 1 point of
top-1 and 0.005 of cosine), and its training time against one dedicated bootstrap (target: at most 1.5×). Writes
benchmarks/results/elastic_bootstrap.{json,md}; the history is in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from results_io import RESULTS, machine, write_results

from bootstrap import train as bootstrap_train
from mllm_sparse_recipes.cli import configure_logging
from mllm_sparse_recipes.defaults import bootstrap_settings, teacher_spec


def bootstrap(args, out: Path, num_latent: int, cache: Path | None, **settings) -> dict:
    """One bootstrap into `out` (the teacher cache copied in when there is one); its report."""
    shutil.rmtree(out, ignore_errors=True)
    if cache is not None and cache.is_file():  # the targets depend on the teacher and the images only
        out.mkdir(parents=True)
        shutil.copy(cache, out / cache.name)
    spec = teacher_spec(args.teacher)
    settings = bootstrap_settings(
        spec, args.world, out, num_latent, args.steps, cache_teacher=True, seed=args.seed, **settings
    )
    bootstrap_train.run(settings)
    return json.loads((out / "bootstrap_report.json").read_text())


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=Path("runs/quickstart/teacher"))
    parser.add_argument("--world", type=Path, default=Path("runs/quickstart/world"))
    parser.add_argument("--work", type=Path, default=Path("runs/elastic_bootstrap"))
    parser.add_argument("--budgets", type=int, nargs="+", default=[9, 16, 36, 64])
    parser.add_argument("--steps", type=int, default=600, help="per arm (the quickstart's laptop plan: 1200)")
    parser.add_argument("--seed", type=int, default=0, help="every arm's seed (initialisation, data order, budgets)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    budgets = sorted(set(args.budgets))
    cache = args.work / "teacher_cache.safetensors"

    dedicated = {}
    for n in budgets:
        report = bootstrap(args, args.work / f"dedicated_{n}", n, cache)
        if not cache.is_file():
            shutil.copy(args.work / f"dedicated_{n}" / cache.name, cache)
        dedicated[n] = {"seconds": report["train_seconds_this_run"], **report["final"]}
    report = bootstrap(args, args.work / "elastic", budgets[-1], cache, budgets=budgets)
    elastic_seconds = report["train_seconds_this_run"]
    elastic = {int(n): e for n, e in report["budgets"].items()}

    def top1(evaluation: dict) -> float:
        return evaluation["zero_shot"]["student"]

    rows = []
    for n in budgets:
        row = {"num_latent_tokens": n, "dedicated_top1": top1(dedicated[n]),
               "dedicated_cosine": dedicated[n]["held_out_cosine"]}  # fmt: skip
        e = elastic[n]
        row |= {"elastic_top1": top1(e), "elastic_cosine": e["held_out_cosine"],
                "elastic_top1_minus_dedicated_points": (top1(e) - top1(dedicated[n])) * 100,
                "elastic_cosine_minus_dedicated": e["held_out_cosine"] - dedicated[n]["held_out_cosine"]}  # fmt: skip
        rows.append(row)
    cost = {
        "seconds": elastic_seconds,
        "over_dedicated_at_largest": elastic_seconds / dedicated[budgets[-1]]["seconds"],
        "over_mean_dedicated": elastic_seconds / (sum(d["seconds"] for d in dedicated.values()) / len(budgets)),
    }
    result = {
        "machine": machine(),
        "teacher": str(args.teacher),
        "world": str(args.world),
        "steps": args.steps,
        "seed": args.seed,
        "budgets": budgets,
        "rows": rows,
        "cost": cost,
        "dedicated_seconds": {n: d["seconds"] for n, d in dedicated.items()},
    }
    lines = [
        "# One elastic SparseFormer against one per budget",
        "",
        f"Machine: {result['machine']}. Teacher `{args.teacher}`, world `{args.world}`, {args.steps} steps per arm "
        "(the quickstart's bootstrap settings, teacher cache).",
        "",
        "| latent tokens | dedicated top-1 | elastic top-1 (Δ points) | dedicated cosine | elastic cosine (Δ) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [
            f"{row['num_latent_tokens']}",
            f"{row['dedicated_top1'] * 100:.2f}%",
            f"{row['elastic_top1'] * 100:.2f}% ({row['elastic_top1_minus_dedicated_points']:+.2f})",
            f"{row['dedicated_cosine']:.4f}",
            f"{row['elastic_cosine']:.4f} ({row['elastic_cosine_minus_dedicated']:+.4f})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Training time (same machine, one arm after the other):", ""]
    lines += [f"- dedicated, {n} tokens: {s:.0f} s" for n, s in result["dedicated_seconds"].items()]
    lines.append(
        f"- elastic: {cost['seconds']:.0f} s, {cost['over_dedicated_at_largest']:.2f}× the dedicated run at "
        f"{budgets[-1]} tokens, {cost['over_mean_dedicated']:.2f}× the mean dedicated run"
    )
    write_results(args.out_dir, "elastic_bootstrap", result, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
