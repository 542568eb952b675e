"""What every benchmark shares: a description of the machine it ran on, and writing its JSON + Markdown results."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one (Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown"


def machine() -> str:
    """e.g. "AMD EPYC 7B13, 2 cores, torch 2.x (CPU)"; with a GPU, its name instead of "CPU"."""
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({where})"


def write_results(out_dir: Path, name: str, report: dict, markdown: str) -> None:
    """`out_dir/name.json` and `out_dir/name.md`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown)
