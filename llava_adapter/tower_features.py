"""A frozen vision tower's image features, computed once per image and served to every later training step.

Both LLaVA stages keep the tower frozen, so what it hands the projector for an image never changes. With
`--tower_features DIR`, training computes that (the tower's output at the layer the LLM reads, after the feature
selection: the projector's input) once for every image of the training set, at every budget the run draws, writes it
to `DIR/tower_features_<placeholders>.safetensors`, and then serves each batch's rows from memory: the steps decode no
image and run no tower. Point both stages at one DIR and the second reuses the first's files.

A file records what it was computed from in its safetensors metadata: the tower's weights (SHA-256) and config, the
image processor's settings, the layer and feature selection, the budget, the precision, and the images (their number
and a SHA-256 of their paths, sizes and modification times). A file that differs in any of these, or is damaged, is
rebuilt with a message naming why; one that matches is read with safetensors (no pickle).

The table lives in memory (images × tokens × width floats, e.g. 6,400 × 16 × 64 × 4 B = 26 MB; the size is logged).
It holds the tower's deterministic output (eval mode: a tower with dropout or stochastic depth, such as an official
SparseFormer preset, would otherwise apply them to frozen weights at every step). It is refused where the tower
trains (`--tune_vision_last_k`) and under ZeRO-3, which partitions the tower's weights. An image that cannot be read
is, as without the table, an error naming its record, or with `--skip_bad_records` a skipped record.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mllm_sparse.checkpoint import CheckpointError, load_safetensors
from mllm_sparse.digests import images_digest, weights_digest
from mllm_sparse.files import atomic_path
from mllm_sparse.images import ImageLoadError

from .budgets import llava_model, vlm_budget
from .data import LlavaJsonDataset

logger = logging.getLogger(__name__)

FORMAT = "1"
TABLE_KEY = "features"
BATCH_SIZE = 64  # images per tower pass while the table is built: fixed, so every build gives the same floats
UNRELATED_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash")  # where it was loaded from, by what


def file_name(placeholders: int) -> str:
    return f"tower_features_{placeholders}.safetensors"


def check_fixed_tower(tune_vision_last_k: int) -> None:
    """Raise `ValueError` where the tower's features would change from step to step (or cannot be computed up front)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if tune_vision_last_k > 0:
        raise ValueError("--tower_features: the tower trains (--tune_vision_last_k), so its features change every step")
    if is_deepspeed_zero3_enabled():
        raise ValueError("--tower_features: ZeRO-3 partitions the tower's weights; use ZeRO-2 or no DeepSpeed")


def sources(model: nn.Module, dataset: LlavaJsonDataset, bf16: bool) -> dict[str, str]:
    """What a table of `dataset`'s images is computed from, as metadata (the budget is added per table)."""
    llava = llava_model(model)
    config = llava.config
    paths = [dataset.image_folder / image for image in dataset.image_paths]
    return {
        "format": FORMAT,
        "tower_weights": weights_digest(llava.model.vision_tower),
        "tower_config": json.dumps(
            {k: v for k, v in llava.model.vision_tower.config.to_dict().items() if k not in UNRELATED_CONFIG_KEYS},
            sort_keys=True,
            default=str,
        ),
        "image_processor": json.dumps(dataset.image_processor.to_dict(), sort_keys=True, default=str),
        "feature_layer": json.dumps(config.vision_feature_layer),
        "feature_select": str(config.vision_feature_select_strategy),
        "precision": "bf16" if bf16 else "fp32",
        "images": str(len(paths)),
        "image_files": images_digest(paths),
    }


def differences(recorded: Mapping[str, str], wanted: Mapping[str, str]) -> list[str]:
    """What differs between a table's recorded sources and this run's, in words; empty if it serves this run."""
    if recorded.get("format") != FORMAT:
        return ["it records nothing about what it was computed from"]
    names = {
        "tower_weights": "the tower's weights",
        "tower_config": "the tower's config",
        "image_processor": "the image processor",
        "image_files": "the image files (paths, sizes or times)",
    }
    changes = []
    for key, value in wanted.items():
        if recorded.get(key) != value:
            changes.append(f"{names[key]} changed" if key in names else f"{key} {recorded.get(key)} -> {value}")
    return changes


class ImageRows(Dataset):
    """The dataset's images, one item per table row: (row, pixels [3, H, W]) or (row, the reason it failed)."""

    def __init__(self, dataset: LlavaJsonDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset.image_paths)

    def __getitem__(self, row: int) -> tuple[int, Tensor | str]:
        image = self.dataset.image_paths[row]
        try:
            return row, self.dataset.pixels(image)
        except (FileNotFoundError, ImageLoadError) as err:
            return row, str(err)


def collate_rows(items: list[tuple[int, Tensor | str]]) -> tuple[list[int], Tensor | None, dict[int, str]]:
    """(rows whose image loaded, their pixels [B, 3, H, W] or None, {row: why it failed})."""
    loaded = [(row, pixels) for row, pixels in items if isinstance(pixels, Tensor)]
    failed = {row: why for row, why in items if isinstance(why, str)}
    pixels = torch.stack([p for _, p in loaded]) if loaded else None
    return [row for row, _ in loaded], pixels, failed


@contextlib.contextmanager
def projector_bypassed(model: nn.Module) -> Iterator[None]:
    """Within the block `get_image_features` returns the projector's input: the selected tower features."""
    inner = llava_model(model).model
    projector = inner.multi_modal_projector
    inner.multi_modal_projector = nn.Identity()
    try:
        yield
    finally:
        inner.multi_modal_projector = projector


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode within the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@torch.no_grad()
def compute_table(
    model: nn.Module, dataset: LlavaJsonDataset, budget: int | None, device: torch.device, bf16: bool, workers: int
) -> tuple[Tensor, dict[int, str]]:
    """([images, placeholders, width] float32: every image's projector input at `budget`, {row: why unreadable})."""
    llava = llava_model(model)
    tower = llava.model.vision_tower.to(device)  # where training will run it; the Trainer moves the rest
    dtype = next(tower.parameters()).dtype
    loader = DataLoader(ImageRows(dataset), batch_size=BATCH_SIZE, num_workers=workers, collate_fn=collate_rows)
    table: Tensor | None = None
    failed: dict[int, str] = {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with evaluating(tower), vlm_budget(llava, budget), projector_bypassed(llava), autocast:
        for rows, pixels, bad in loader:
            failed.update(bad)
            if pixels is None:
                continue
            out = llava.model.get_image_features(pixel_values=pixels.to(device, dtype), return_dict=True)
            features = torch.stack(list(out.pooler_output)).float().cpu()
            if table is None:
                table = torch.zeros(len(dataset.image_paths), *features.shape[1:])
            table[rows] = features
    if table is None:
        raise ValueError(f"{dataset.data_path}: none of its images could be read")
    return table, failed


def read_table(path: Path, wanted: dict[str, str]) -> tuple[Tensor | None, str]:
    """(the table at `path`, "") if it was computed from `wanted`; else (None, why not)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            recorded = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - safe_open's errors are untyped; any of them means a damaged file
        return None, f"unreadable (truncated or corrupt?): {err}"
    if changes := differences(recorded, wanted):
        return None, "computed from other inputs: " + "; ".join(changes)
    try:
        table = load_safetensors(path)[TABLE_KEY]
    except (CheckpointError, KeyError) as err:
        return None, f"damaged ({err})"
    if table.shape[0] != int(wanted["images"]) or table.shape[1] != int(wanted["placeholders"]):
        return None, f"holds a {tuple(table.shape)} table for {wanted['images']} images"
    return table, ""


def prepare(
    model: nn.Module,
    dataset: LlavaJsonDataset,
    budgets: Mapping[int, int] | None,
    folder: Path,
    device: torch.device,
    bf16: bool = False,
    workers: int = 0,
    write: bool = True,
) -> dict[int, Tensor]:
    """{placeholders per image: its [images, placeholders, width] table} for each budget the run draws (`budgets`:
    {budget: placeholders}; None: the tower's default), read from `folder` where a file there was computed from the
    same inputs, else computed and written (`write`: the main process). Marks unreadable images on `dataset`."""
    llava = llava_model(model)
    wanted = dict(budgets) if budgets else {None: llava.config.image_seq_length}
    tables = {}
    common = sources(llava, dataset, bf16)
    for budget, placeholders in wanted.items():
        path = folder / file_name(placeholders)
        meta = {**common, "budget": str(budget), "placeholders": str(placeholders)}
        table, why = read_table(path, meta) if path.is_file() else (None, "")
        if table is not None:
            logger.info("tower features %s: reused (same tower, images and preprocessing)", path)
            failed = {}
        else:
            if why:
                logger.warning("tower features %s: %s; rebuilding it", path, why)
            start = time.perf_counter()
            table, failed = compute_table(llava, dataset, budget, device, bf16, workers)
            if write and not failed:
                with atomic_path(path) as tmp:
                    save_file({TABLE_KEY: table.contiguous()}, str(tmp), metadata=meta)
            logger.info(
                "tower features: %d images x %d tokens x %d at %s tokens, %.0f MB, computed in %.0f s%s",
                *table.shape, budget or "the default", table.numel() * 4 / 2**20, time.perf_counter() - start,
                f" (written to {path})" if write and not failed else "",
            )  # fmt: skip
        dataset.unreadable_images.update({dataset.image_paths[row]: why for row, why in failed.items()})
        tables[placeholders] = table
    return tables


@contextlib.contextmanager
def served(model: nn.Module, tables: Mapping[int, Tensor]) -> Iterator[None]:
    """Within the block the model's `get_image_features` reads rows of `tables` (keyed by placeholders per image, the
    batch's budget) instead of running the tower: its `pixel_values` are the rows, int64 [M, 1], as a
    `LlavaJsonDataset` with `serve_image_ids` gives them. The projector still runs (and trains)."""
    inner = llava_model(model).model
    config = llava_model(model).config

    def from_table(pixel_values: Tensor, *args, **kwargs) -> BaseModelOutputWithPooling:
        if pixel_values.is_floating_point():
            raise TypeError("tower features are served by image id: this batch holds pixels")
        table = tables[config.image_seq_length]
        projector = inner.multi_modal_projector
        weight = next(projector.parameters())
        selected = table[pixel_values.reshape(-1).cpu()].to(weight.device, weight.dtype)
        return BaseModelOutputWithPooling(last_hidden_state=selected, pooler_output=list(projector(selected)))

    inner.get_image_features = from_table  # an instance attribute: the weights and saved files are untouched
    try:
        yield
    finally:
        del inner.get_image_features
