"""Unlabelled images for bootstrapping: an image folder, a LLaVA JSON file, or a synthetic world.

Each item is one image preprocessed twice, for the student and for the teacher, with deterministic centre crops
(no augmentation), so teacher outputs can be cached once and reused every epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mllm_sparse.files import read_json
from mllm_sparse.images import load_image, normalize, square_pixels

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(data: str | Path, split: str = "train", image_folder: str | Path | None = None) -> list[Path]:
    """The image files of a data source.

    Args:
        data: a folder of images (searched recursively), a synthetic world folder (has `world.json`; its `split`
            images are used), or a LLaVA JSON file (records with an "image" key, relative to `image_folder`).
    """
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"Bootstrap data not found: {data}")
    if data.is_dir() and (data / "world.json").is_file():
        labels = read_json(data / "labels.json")
        paths = [data / r["image"] for r in labels["images"] if r["split"] == split]
    elif data.is_dir():
        paths = sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    elif data.suffix == ".json":
        records = read_json(data)
        if not isinstance(records, list):
            raise ValueError(f"{data} must hold a JSON list of LLaVA records")
        root = Path(image_folder) if image_folder else data.parent
        paths = []
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise ValueError(f"{data}: record {i} is not an object")
            if "image" in record:
                paths.append(root / record["image"])
        paths = sorted(set(paths))
    else:
        raise ValueError(f"{data} is neither an image folder, a synthetic world, nor a LLaVA .json file")
    if not paths:
        raise ValueError(f"No images found in {data}")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {data} are missing, e.g. {missing[0]}")
    return paths


class TwoViewImages(Dataset):
    """(index, student pixels [3, S, S], teacher pixels [3, T, T]) for each image.

    Both views are the teacher's preprocessing (resize the shorter side, centre crop, the teacher's mean/std), at
    the student's and the teacher's input sizes: the student is aligned with what the teacher saw, not with a
    tighter crop of it. At equal sizes the image is preprocessed once and both views are the same tensor.

    `in_memory=True` decodes each image once and keeps its views as uint8 (3·S² + 3·T² bytes per image, or 3·S²
    at equal sizes) in the process that loads it: for a small dataset read over many epochs, where decoding every
    image again each epoch was ~40% of a laptop-size bootstrap step. The items are the same either way.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        student_size: int,
        teacher_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        in_memory: bool = False,
    ):
        self.paths = list(paths)
        self.student_size, self.teacher_size = student_size, teacher_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.decoded: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if in_memory else None

    def __len__(self) -> int:
        return len(self.paths)

    def views(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's and the teacher's [3, S, S] / [3, T, T] uint8 views of image `index`."""
        if self.decoded is not None and index in self.decoded:
            return self.decoded[index]
        image = load_image(self.paths[index], draft_size=max(self.student_size, self.teacher_size))
        teacher = square_pixels(image, self.teacher_size, crop_pct=1.0)
        same = self.student_size == self.teacher_size
        found = (teacher if same else square_pixels(image, self.student_size, crop_pct=1.0), teacher)
        if self.decoded is not None:
            self.decoded[index] = found
        return found

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        student, teacher = self.views(index)
        teacher_pixels = normalize(teacher, self.mean, self.std)
        if student is teacher:
            return index, teacher_pixels, teacher_pixels
        return index, normalize(student, self.mean, self.std), teacher_pixels
