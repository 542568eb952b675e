"""The tiny bootstrap run the bootstrap tests share (the world and teacher come from tests/bootstrap/conftest.py)."""

from __future__ import annotations

from pathlib import Path


def bootstrap_args(setup: tuple[Path, str], out: Path, *extra: str) -> list[str]:
    """`mllm-sparse bootstrap` arguments: 8 latent tokens, batches of 4 at 64 px, lr 3e-3, into `out`."""
    root, spec = setup
    return ["--teacher", spec, "--num-latent-tokens", "8", "--data", str(root / "world"), "--out", str(out),
            "--batch-size", "4", "--image-size", "64", "--lr", "3e-3", *extra]  # fmt: skip
