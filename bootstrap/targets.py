"""What the student is aligned with: teacher embeddings (and patch tokens), computed per batch or cached."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from mllm_sparse.files import atomic_path

from .teachers import Teacher


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

    def load_cache(self, path: Path) -> None:
        """Use the targets a `build_cache` call wrote to `path`."""
        self.cache = load_file(path)
        if self.need_patches and "patches" not in self.cache:
            raise ValueError(
                f"teacher cache {path} holds no patch tokens (it was built without a token or region term); "
                "delete it to rebuild it with them"
            )

    def build_cache(self, loader: DataLoader, path: Path, device) -> None:
        """Compute every training image's targets once (or load them from `path` if it exists)."""
        if path.is_file():
            self.load_cache(path)
            return
        parts: dict[str, list[torch.Tensor]] = {}
        for _, _, teacher_pixels in tqdm(loader, desc="teacher cache", unit="batch"):
            for key, value in self.compute(teacher_pixels.to(device)).items():
                parts.setdefault(key, []).append(value.cpu())
        self.cache = {key: torch.cat(values) for key, values in parts.items()}
        with atomic_path(path) as tmp:
            save_file(self.cache, tmp)

    def get(self, index: torch.Tensor, teacher_pixels: torch.Tensor, device) -> dict[str, torch.Tensor]:
        if self.cache is not None:
            return {key: value[index].to(device) for key, value in self.cache.items()}
        return self.compute(teacher_pixels.to(device))
