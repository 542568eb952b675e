"""Writing a synthetic world to disk: images, scenes, captions, labels and LLaVA question/answer files."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..files import write_json, write_jsonl
from .png import write_png
from .text import (
    QUESTION_TYPES,
    caption_record,
    captions,
    scene_conversations,
    text_only_record,
    zero_shot_templates,
)
from .world import COLORS, SHAPES, WorldSettings, class_names, make_scene

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
# Fraction of extra text-only records added to each LLaVA split.
TEXT_ONLY_FRACTION = 0.05
FORMAT_VERSION = 1


def split_of(index: int, num_images: int) -> str:
    """Contiguous splits: the first 80% of indices train, the next 10% val, the rest test."""
    train_end = int(num_images * SPLIT_FRACTIONS[0])
    val_end = train_end + int(num_images * SPLIT_FRACTIONS[1])
    return "train" if index < train_end else "val" if index < val_end else "test"


def image_path(index: int) -> str:
    return f"images/{index:07d}.png"


def _render_chunk(args: tuple[str, WorldSettings, int, int, list[int], int]) -> list[dict]:
    """Render and save a chunk of images; return their records (runs in worker processes)."""
    out, settings, seed, image_size, indices, num_images = args
    records = []
    for index in indices:
        scene, image = make_scene(settings, seed, index, image_size)
        write_png(Path(out) / image_path(index), np.asarray(image))
        text_rng = np.random.default_rng([seed, index, 1])
        records.append(
            {
                "index": index,
                "split": split_of(index, num_images),
                "scene": scene.to_dict(),
                "label": class_names().index(scene.principal.name),
                "captions": captions(scene, text_rng),
                "conversation": scene_conversations(
                    scene, f"synth-{index:07d}", image_path(index), text_rng, settings.max_turns
                ),
            }
        )
    return records


def generate_world(
    out: str | Path,
    num_images: int = 2000,
    image_size: int = 224,
    seed: int = 0,
    difficulty: str = "default",
    workers: int | None = None,
    progress: bool = True,
    max_turns: int | None = None,
) -> dict:
    """Generate a world into `out` and return its `world.json` content.

    Writes `images/*.png`, `scenes.jsonl` (ground truth), `captions.jsonl`, `labels.json`,
    `llava_{train,val,test}.json`, `llava_pretrain.json` (stage-1 caption records of the train split) and
    `world.json`. The same arguments give the same bytes, whatever `workers`.
    """
    settings = WorldSettings.for_difficulty(difficulty)
    if max_turns is not None:
        settings = replace(settings, max_turns=max_turns)
    if num_images < 10:
        raise ValueError(f"num_images must be >= 10 so that every split gets images, got {num_images}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    workers = workers or min(os.cpu_count() or 1, 8)
    chunk = 64
    jobs = [
        (str(out), settings, seed, image_size, list(range(start, min(start + chunk, num_images))), num_images)
        for start in range(0, num_images, chunk)
    ]
    start_time = time.perf_counter()
    records: list[dict] = []
    bar = tqdm(total=num_images, unit="img", desc="synth", disable=not progress)
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            records += _render_chunk(job)
            bar.update(len(job[4]))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for chunk_records in pool.map(_render_chunk, jobs):
                records += chunk_records
                bar.update(len(chunk_records))
    bar.close()
    seconds = time.perf_counter() - start_time

    write_jsonl(
        out / "scenes.jsonl", [{"image": image_path(r["index"]), "split": r["split"], **r["scene"]} for r in records]
    )
    write_jsonl(
        out / "captions.jsonl",
        [
            {
                "image": image_path(r["index"]),
                "caption": r["captions"][0],
                "captions": r["captions"],
                "split": r["split"],
            }
            for r in records
        ],
    )
    write_json(
        out / "labels.json",
        {
            "classes": class_names(),
            "templates": list(zero_shot_templates(settings.principal_sizes)),
            "images": [{"image": image_path(r["index"]), "label": r["label"], "split": r["split"]} for r in records],
        },
    )
    write_json(
        out / "llava_pretrain.json",
        [
            caption_record(f"caption-{r['index']:07d}", image_path(r["index"]), r["captions"][0], r["index"])
            for r in records
            if r["split"] == "train"
        ],
    )
    split_sizes = {}
    for split in SPLITS:
        conversations = [r["conversation"] for r in records if r["split"] == split]
        text_rng = np.random.default_rng([seed, num_images, SPLITS.index(split)])
        num_text = max(1, int(len(conversations) * TEXT_ONLY_FRACTION))
        conversations += [text_only_record(f"text-{split}-{i:06d}", text_rng) for i in range(num_text)]
        write_json(out / f"llava_{split}.json", conversations)
        split_sizes[split] = {"images": sum(r["split"] == split for r in records), "records": len(conversations)}
    world = {
        "format_version": FORMAT_VERSION,
        "generator": "mllm-sparse synth",
        "seed": seed,
        "num_images": num_images,
        "image_size": image_size,
        "settings": asdict(settings),
        "shapes": list(SHAPES),
        "colors": list(COLORS),
        "question_types": list(QUESTION_TYPES),
        "splits": split_sizes,
        "generation_seconds": round(seconds, 3),
    }
    write_json(out / "world.json", world)
    return world


@dataclass
class SynthSettings:
    """What `mllm-sparse synth` does: one field per option of the command.

    Attributes:
        out: the world's folder (new, or empty unless `overwrite`).
        num_images: images in all (80% train, 10% val, 10% test).
        image_size: side of the square images in pixels.
        seed: the same seed gives the same bytes.
        difficulty: one of `world.DIFFICULTIES`.
        max_turns: questions per image record, 1 or 2..this many; None: the difficulty's (12).
        workers: processes; None: all cores, at most 8.
        overwrite: allow writing into a non-empty folder.
    """

    out: Path
    num_images: int = 2000
    image_size: int = 224
    seed: int = 0
    difficulty: str = "default"
    max_turns: int | None = None
    workers: int | None = None
    overwrite: bool = False


def run(settings: SynthSettings, progress: bool = True) -> dict:
    """Write the world of `settings` (see `generate_world`); returns its `world.json` content with the
    `images_per_second` it was generated at."""
    out = Path(settings.out)
    if out.exists() and any(out.iterdir()) and not settings.overwrite:
        raise ValueError(f"{out} is not empty; pass --overwrite to write into it anyway")
    world = generate_world(
        out,
        settings.num_images,
        settings.image_size,
        settings.seed,
        settings.difficulty,
        settings.workers,
        progress=progress,
        max_turns=settings.max_turns,
    )
    rate = world["num_images"] / max(world["generation_seconds"], 1e-9)
    logger.info("wrote %d images to %s (%.1f images/s)", world["num_images"], out, rate)
    return {**world, "images_per_second": round(rate, 1)}
