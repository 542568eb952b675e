"""How long the command line takes to answer `--help` and `--version`, each command's `--help` included.

    uv run python benchmarks/cli_startup.py              # 5 runs of each, median and worst
    uv run python benchmarks/cli_startup.py --repeats 9

Each call is a fresh `mllm-sparse` process (the installed console script), as a user types it; the times are wall
clock, so they depend on the machine and its load, which the report states. For scale, the same run times a bare
`python -c pass` and `python -c "import torch"` in the same round-robin: the ratio to those is robust on a noisy
machine, an absolute time is not. Writes `benchmarks/results/cli_startup.{json,md}`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_io import RESULTS, machine, write_results

from mllm_sparse_recipes.cli import COMMANDS

TARGET_S = 1.5


def calls() -> dict[str, list[str]]:
    """name -> argv of every timed call, the two references first."""
    script = shutil.which("mllm-sparse")
    if script is None:
        raise SystemExit("mllm-sparse is not on PATH: run this through `uv run`")
    timed = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "mllm-sparse --help": [script, "--help"],
        "mllm-sparse --version": [script, "--version"],
    }
    timed |= {f"mllm-sparse {name} --help": [script, name, "--help"] for name in COMMANDS}
    return timed


def load() -> str:
    """The 1-minute load average against the cores, where the OS tells it."""
    try:
        return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    except OSError:
        return "load unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each call, round-robin (default: 5)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the results go (default: %(default)s)")
    args = parser.parse_args(argv)
    timed = calls()
    seconds: dict[str, list[float]] = {name: [] for name in timed}
    before = load()
    for _ in range(args.repeats):
        for name, command in timed.items():  # round-robin: a burst of load hits every call alike
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            seconds[name].append(time.perf_counter() - start)
    rows = {name: {"median_s": statistics.median(s), "max_s": max(s)} for name, s in seconds.items()}
    torch_s = rows["python -c 'import torch'"]["median_s"]
    report = {
        "machine": machine(),
        "load": f"{before} before, {load()} after",
        "repeats": args.repeats,
        "target_s": TARGET_S,
        "calls": {name: {**row, "vs_import_torch": row["median_s"] / torch_s} for name, row in rows.items()},
    }
    lines = [
        "# `mllm-sparse` start-up: `--help` and `--version`",
        "",
        f"Machine: {report['machine']}; {report['load']}. {args.repeats} runs of each, round-robin, wall clock.",
        f"Target: every call under {TARGET_S} s on 2 cores.",
        "",
        "| call | median s | worst s | vs `import torch` |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| `{name}` | {row['median_s']:.2f} | {row['max_s']:.2f} | {row['median_s'] / torch_s:.2f}× |"
              for name, row in rows.items()]  # fmt: skip
    write_results(args.out_dir, "cli_startup", report, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
