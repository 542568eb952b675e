"""Everything that needs a GPU, in one command: encoder speed, VLM latency at both LLM shapes, bootstrap throughput.

    uv run python benchmarks/gpu_suite.py            # one CUDA GPU, bf16; about 8 minutes on an H200
    uv run python benchmarks/gpu_suite.py --quick    # CPU, tiny sizes: every part's code path, in about a minute

Parts (each writes its own results; this script adds gpu_suite.{json,md} with what ran, how long, and on what):

1. `encoder_speed.py --device cuda --batch-sizes 1 8 32 128 --dtypes bf16`: SparseFormer vs ViT-L-14-336;
2. `vlm_latency.py --device cuda --dtype bf16 --llm-layers` (nothing sliced): both LLM shapes whole, absolute ms;
3. `bootstrap_speed.py --device cuda --bf16 --budgets 9 16 25 36 49 63`: SparseFormer-L from ViT-L-14-336, teacher
   per batch and cached, with the projected time of one ImageNet-1k epoch, and one elastic student's step against it.

Without `--quick` it refuses to start when CUDA is not available, so a run is never a silent CPU run. Results go to
benchmarks/results/ with a `_gpu` suffix (`--out-dir` elsewhere); `--quick` writes `_quick` files into --out-dir.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import bootstrap_speed
import encoder_speed
import torch
import vlm_latency
from results_io import RESULTS, machine, write_results


def parts(quick: bool, out_dir: Path) -> dict[str, tuple]:
    """name -> (module's main, its arguments)."""
    suffix = "_quick" if quick else "_gpu"
    common = ["--out-dir", str(out_dir)]
    if quick:
        return {
            "encoder_speed": (encoder_speed.main, ["--quick", "--name", f"encoder_speed{suffix}", *common]),
            "vlm_latency": (vlm_latency.main, ["--quick", "--name", f"vlm_latency{suffix}", *common]),
            "bootstrap_speed": (
                bootstrap_speed.main,
                ["--quick", "--budgets", "4", "9", "16", "--name", f"bootstrap_speed{suffix}", *common],
            ),
        }
    return {
        "encoder_speed": (
            encoder_speed.main,
            [
                "--device",
                "cuda",
                "--batch-sizes",
                "1",
                "8",
                "32",
                "128",
                "--dtypes",
                "bf16",
                "--repeats",
                "10",
                "--warmup",
                "3",
                "--name",
                f"encoder_speed{suffix}",
                *common,
            ],
        ),  # fmt: skip
        "vlm_latency": (
            vlm_latency.main,
            [
                "--device",
                "cuda",
                "--dtype",
                "bf16",
                "--llm-layers",
                "--repeats",
                "5",
                "--warmup",
                "2",
                "--decode-tokens",
                "32",
                "--name",
                f"vlm_latency{suffix}",
                *common,
            ],
        ),  # fmt: skip
        "bootstrap_speed": (
            bootstrap_speed.main,
            ["--device", "cuda", "--bf16", "--batch-size", "128", "--budgets", "9", "16", "25", "36", "49", "63"]
            + ["--name", f"bootstrap_speed{suffix}", *common],
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, tiny sizes: checks every part's code path")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="(default: benchmarks/results)")
    args = parser.parse_args(argv)
    if not args.quick and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device is available here; `--quick` checks the suite on the CPU")
    ran = {}
    for name, (run, part_args) in parts(args.quick, args.out_dir).items():
        print(f"== {name}: {' '.join(part_args)}", flush=True)
        start = time.perf_counter()
        status = run(part_args)
        ran[name] = {"arguments": part_args, "seconds": round(time.perf_counter() - start, 1), "status": status}
    report = {"machine": machine(), "quick": args.quick, "parts": ran}
    lines = ["# GPU suite", "", f"- Machine: {report['machine']}{' (--quick)' if args.quick else ''}", ""]
    lines += ["| part | seconds | arguments |", "|---|---:|---|"]
    lines += [f"| {n} | {p['seconds']} | `{' '.join(p['arguments'])}` |" for n, p in ran.items()]
    write_results(args.out_dir, "gpu_suite_quick" if args.quick else "gpu_suite", report, "\n".join(lines) + "\n")
    return max(p["status"] for p in ran.values())


if __name__ == "__main__":
    raise SystemExit(main())
