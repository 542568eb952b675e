"""Digests of what a derived file (a cache) was computed from: a module's weights, a list of image files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a module's state_dict: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def images_digest(paths: list[Path], relative_to: Path | None = None) -> str:
    """SHA-256 of the image list: each file's resolved path (or its path relative to `relative_to`), size and
    modification time, in order."""
    digest = hashlib.sha256()
    for path in paths:
        stat, name = path.stat(), path.resolve()
        if relative_to is not None:
            name = os.path.relpath(name, relative_to.resolve())
        digest.update(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
