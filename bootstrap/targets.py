"""What the student is aligned with: teacher embeddings (and patch tokens), computed per batch or cached.

A teacher cache (`teacher_cache.safetensors`, `bootstrap --cache-teacher`) records what it was computed from in its
safetensors metadata, so that it travels with the file (a hard link or copy shares it between runs, as
`mllm-sparse ablate` does): the teacher (its spec and a SHA-256 of its weights), the images (their number and a
SHA-256 of their paths, sizes and modification times; the paths taken both absolute and relative to the cache's
folder, either matching, so a run copied together with its images keeps its cache), the teacher's input size, mean
and std, the precision, and whether patch tokens are included. A cache is reused only when all of that matches this
run (one with patch tokens also serves a run that needs none); otherwise, or when the file is unreadable (truncated,
corrupt) or records nothing, it is rebuilt, with a message naming what changed. Rebuilding rather than refusing: the
cache is derived data, and recomputing it is always correct.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from mllm_sparse.checkpoint import CheckpointError, load_safetensors
from mllm_sparse.files import atomic_path

from .data import TwoViewImages
from .teachers import Teacher

logger = logging.getLogger(__name__)

CACHE_NAME = "teacher_cache.safetensors"
CACHE_FORMAT = "1"


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


def cache_sources(
    teacher: Teacher, data: TwoViewImages, with_patches: bool, bf16: bool, folder: Path
) -> dict[str, str]:
    """What a teacher cache of `data` in `folder` is computed from, as safetensors metadata (strings)."""
    return {
        "format": CACHE_FORMAT,
        "teacher": teacher.spec,
        "teacher_weights": weights_digest(teacher.model),
        "images": str(len(data.paths)),
        "image_files": images_digest(data.paths),
        "image_files_relative": images_digest(data.paths, folder),
        "image_size": str(data.teacher_size),
        "mean": json.dumps(list(data.mean)),
        "std": json.dumps(list(data.std)),
        "precision": "bf16" if bf16 else "fp32",
        "patches": "yes" if with_patches else "no",
    }


def cache_differences(recorded: dict[str, str], wanted: dict[str, str]) -> list[str]:
    """What differs between a cache's recorded sources and this run's, in words; empty if the cache serves it."""
    if recorded.get("format") != CACHE_FORMAT:
        return ["it records nothing about what it was computed from (made by an older version)"]
    changes = []
    if recorded.get("teacher_weights") != wanted["teacher_weights"]:
        if recorded.get("teacher") != wanted["teacher"]:
            changes.append(f"teacher {recorded.get('teacher')!r} -> {wanted['teacher']!r}")
        else:
            changes.append(f"the weights of teacher {wanted['teacher']!r} changed")
    if recorded.get("images") != wanted["images"]:
        changes.append(f"images {recorded.get('images')} -> {wanted['images']}")
    elif not any(recorded.get(key) == wanted[key] for key in ("image_files", "image_files_relative")):
        changes.append("the image files changed (paths, sizes or modification times)")
    for key in ("image_size", "mean", "std", "precision"):
        if recorded.get(key) != wanted[key]:
            changes.append(f"{key.replace('_', ' ')} {recorded.get(key)} -> {wanted[key]}")
    if wanted["patches"] == "yes" and recorded.get("patches") != "yes":
        changes.append("it holds no patch tokens, which the token or region term needs")
    return changes


class TeacherTargets:
    """Teacher embeddings (and patch tokens for the token term) per dataset index, cached or computed per batch."""

    def __init__(self, teacher: Teacher, need_patches: bool, autocast):
        self.teacher, self.need_patches, self.autocast = teacher, need_patches, autocast
        self.cache: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def compute(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.autocast():
            out = {"embeds": self.teacher.encode_image(pixels).float()}
            if self.need_patches:
                out["patches"] = self.teacher.patch_tokens(pixels, -1).float()
        return out

    def keep(self, cache: dict[str, torch.Tensor]) -> None:
        self.cache = {key: value for key, value in cache.items() if key == "embeds" or self.need_patches}

    def load_cache(self, path: Path) -> None:
        """Use the targets a `build_cache` call wrote to `path` (a damaged file raises `CheckpointError`)."""
        cache = load_safetensors(path)
        if self.need_patches and "patches" not in cache:
            raise ValueError(f"teacher cache {path} holds no patch tokens, which the token or region term needs")
        self.keep(cache)

    def build_cache(self, loader: DataLoader, path: Path, device, bf16: bool = False) -> None:
        """Compute every image's targets once, or reuse the cache at `path` if it was computed from the same teacher,
        images and preprocessing (see the module docstring).

        Args:
            loader: over a `TwoViewImages`, in dataset order.
        """
        sources = cache_sources(self.teacher, loader.dataset, self.need_patches, bf16, path.parent)
        if path.is_file():
            reason = self._stale(path, sources)
            if reason is None:
                logger.info("teacher cache %s: reused (same teacher, images and preprocessing)", path)
                return
            logger.warning("teacher cache %s: %s; rebuilding it", path, reason)
        parts: dict[str, list[torch.Tensor]] = {}
        for _, _, teacher_pixels in tqdm(loader, desc="teacher cache", unit="batch"):
            for key, value in self.compute(teacher_pixels.to(device)).items():
                parts.setdefault(key, []).append(value.cpu())
        self.cache = {key: torch.cat(values) for key, values in parts.items()}
        with atomic_path(path) as tmp:
            save_file(self.cache, tmp, metadata=sources)

    def _stale(self, path: Path, sources: dict[str, str]) -> str | None:
        """Why the cache at `path` cannot serve this run, or None (it is then loaded)."""
        try:
            with safe_open(str(path), framework="pt") as f:
                recorded = f.metadata() or {}
        except Exception as err:  # noqa: BLE001 - safe_open's errors are untyped; any of them means a damaged file
            return f"unreadable (truncated or corrupt?): {err}"
        changes = cache_differences(recorded, sources)
        if changes:
            return "computed from other inputs: " + "; ".join(changes)
        try:
            cache = load_safetensors(path)
        except CheckpointError as err:
            return f"damaged ({err})"
        if "embeds" not in cache or cache["embeds"].shape[0] != int(sources["images"]):
            return f"holds {cache.get('embeds', torch.empty(0)).shape[0]} rows for {sources['images']} images"
        self.keep(cache)
        return None

    def get(self, index: torch.Tensor, teacher_pixels: torch.Tensor, device) -> dict[str, torch.Tensor]:
        if self.cache is not None:
            return {key: value[index].to(device) for key, value in self.cache.items()}
        return self.compute(teacher_pixels.to(device))
