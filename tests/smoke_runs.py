"""Whole-pipeline runs at smoke size, shared by the quickstart and ablation tests."""

from __future__ import annotations

from pathlib import Path

from mllm_sparse_recipes.cli import main as cli_main

# `mllm-sparse quickstart` at smoke size with a 9-token SparseFormer (a 3 × 3 RoI grid, comparable to pooled-9)
SMOKE_QUICKSTART = ["--plan", "smoke", "--num-latent-tokens", "9", "--threads", "2"]


def run_smoke_quickstart(out: Path) -> Path:
    assert cli_main(["quickstart", "--out", str(out), *SMOKE_QUICKSTART]) == 0
    return out
