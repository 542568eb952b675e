"""Reading a world written by `mllm-sparse synth`, with errors that name the file and the record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from ..configuration import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ..files import read_json, read_jsonl
from ..images import load_image


@dataclass
class CaptionedImages:
    """Decoded images held as uint8 (cheap to keep in memory) with their captions and labels."""

    images: Tensor  # [N, 3, S, S] uint8
    captions: list[list[str]]  # one or more captions per image, the full one first
    labels: Tensor  # [N] int64
    paths: list[str]
    scenes: list[dict | None]  # scenes.jsonl rows (every object's shape, colour, size, centre, radius); None if absent
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD

    def __len__(self) -> int:
        return len(self.captions)

    def pixels(self, index: Tensor | slice) -> Tensor:
        """Normalised float32 pixels [B, 3, S, S] for the selected images."""
        x = self.images[index].float().div_(255)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


class SyntheticWorld:
    """A world folder: `world.json`, `labels.json`, `captions.jsonl`, `scenes.jsonl`, `images/`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"World folder not found: {self.root}")
        self.info = read_json(self.root / "world.json")
        self.labels = read_json(self.root / "labels.json")
        for key in ("classes", "templates", "images"):
            if key not in self.labels:
                raise ValueError(f"{self.root / 'labels.json'} has no {key!r} entry")
        self.class_names: list[str] = self.labels["classes"]
        self.templates: list[str] = self.labels["templates"]

    def records(self, split: str) -> list[dict]:
        """labels.json entries of a split, each joined with its caption and scene."""
        captions = {r["image"]: r.get("captions") or [r["caption"]] for r in read_jsonl(self.root / "captions.jsonl")}
        scenes = {r["image"]: r for r in read_jsonl(self.root / "scenes.jsonl")}
        rows = [r for r in self.labels["images"] if r["split"] == split]
        if not rows:
            raise ValueError(f"{self.root / 'labels.json'} has no images in split {split!r}")
        for row in rows:
            if row["image"] not in captions:
                raise ValueError(f"{self.root / 'captions.jsonl'} has no caption for {row['image']}")
            row["captions"] = captions[row["image"]]
            row["scene"] = scenes.get(row["image"])
        return rows

    def captioned_images(self, split: str, image_size: int, progress: bool = True) -> CaptionedImages:
        """Decode a split's images (resized to `image_size` if the world differs) into memory."""
        rows = self.records(split)
        images = torch.empty(len(rows), 3, image_size, image_size, dtype=torch.uint8)
        for i, row in enumerate(tqdm(rows, desc=f"load {split}", unit="img", disable=not progress)):
            image = load_image(self.root / row["image"])
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
            images[i] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        return CaptionedImages(
            images=images,
            captions=[r["captions"] for r in rows],
            labels=torch.tensor([r["label"] for r in rows]),
            paths=[r["image"] for r in rows],
            scenes=[r["scene"] for r in rows],
        )
