"""Damaging files the way disks, kills and diverged runs do, and reading the CLI's one-line error."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mllm_sparse_recipes.cli import main as cli_main


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file short, as a full disk or a killed copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def poison(path: Path, key: str) -> None:
    """Write NaN into one tensor of a safetensors file (what a diverged run saves)."""
    state = load_file(str(path))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(path), metadata={"format": "pt"})


def run(capsys, *argv: str) -> int:
    """`mllm-sparse ARGV` in-process, after dropping what the test's setup printed (HF progress bars)."""
    capsys.readouterr()
    return cli_main(list(argv))


def one_line(capsys, *needles: str) -> str:
    """The CLI's error: one line, no traceback (HF's progress bars may precede it), naming each needle."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines and lines[-1].startswith("mllm-sparse "), err
    assert sum(line.startswith("mllm-sparse ") for line in lines) == 1, err
    for needle in needles:
        assert needle in lines[-1], (needle, err)
    return lines[-1]
