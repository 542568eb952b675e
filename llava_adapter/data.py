"""LLaVA JSON data for training: a torch Dataset, a modality- and length-grouped sampler, and the batch collator.

The data is haotian-liu/LLaVA's JSON list (see `llava_adapter.conversation` for the record rules and templates).
Everything that depends on the number of visual tokens N takes it as an argument (from the vision tower's config).

Bad records: the dataset checks every record when it is built (keys, roles, `<image>` count, image file present) and
raises on the first bad one, naming it; with `skip_bad_records=True` it drops them, counts them (`num_skipped`) and
warns once. Problems found only when an item is loaded (a corrupt image, an image block beyond `max_length`, or
truncation that leaves no answer token, which would give a NaN loss) raise naming the record; with
`skip_bad_records=True` the item is replaced by the next loadable record and a warning names the skipped one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler
from transformers import PreTrainedTokenizerBase
from transformers.trainer_pt_utils import get_length_grouped_indices

from mllm_sparse.files import read_json
from mllm_sparse.images import ImageLoadError, check_image_file, load_image

from .budgets import batch_budgets, expand_placeholders
from .conversation import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    TEMPLATES,
    RecordError,
    encode_conversation,
    has_image,
    record_name,
    resolve_image_token_id,
    validate_record,
)


def estimated_length(record: Mapping, num_image_tokens: int) -> int:
    """A cheap token-count estimate: the whitespace-separated words of all turns, `<image>` not counted (at least 1),
    plus N for an image record. It under-counts subword tokens and template text; it only has to rank records for
    length grouping."""
    words = sum(len(turn["value"].replace(IMAGE_PLACEHOLDER, " ").split()) for turn in record["conversations"])
    return max(1, words) + (num_image_tokens if has_image(record) else 0)


class LlavaJsonDataset(Dataset):
    """A haotian-liu/LLaVA JSON file as a torch Dataset.

    Args:
        data_path: the JSON list of records.
        image_folder: where the records' `image` paths are relative to (None: the JSON file's folder).
        tokenizer: the LLM's tokenizer, knowing `<image>` (or pass `image_token_id`).
        image_processor: an HF image processor; may be None only when no record has an image.
        template: one of `TEMPLATES`.
        num_image_tokens: N, visual tokens per image (from the vision tower's config).
        max_length: longest token sequence; longer ones are cut from the end, never through the image placeholders.
        skip_bad_records: drop bad records instead of raising (see the module docstring).
        image_token_id: the placeholder id; defaults to the tokenizer's `<image>` id.
        images_only: leave out the records without an image (counted in `num_text_only`): a stage that trains only
            the projector learns nothing from them, and a batch of them alone would have no gradient at all.

    Items are dicts: `input_ids` [L] and `labels` [L] int64, `pixel_values` [3, H, W] float (image records only) and
    `id`.
    """

    def __init__(
        self,
        data_path: str | Path,
        image_folder: str | Path | None,
        tokenizer: PreTrainedTokenizerBase,
        image_processor,
        template: str,
        num_image_tokens: int,
        max_length: int,
        skip_bad_records: bool = False,
        image_token_id: int | None = None,
        images_only: bool = False,
    ):
        if template not in TEMPLATES:
            raise ValueError(f"Unknown template {template!r}; valid templates: {list(TEMPLATES)}")
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be positive, got {num_image_tokens}")
        self.data_path = Path(data_path)
        self.image_folder = Path(image_folder) if image_folder is not None else self.data_path.parent
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.skip_bad_records = skip_bad_records
        self.image_token_id = resolve_image_token_id(tokenizer, image_token_id)

        records = read_json(self.data_path)  # malformed JSON: ValueError naming the file, line and column
        if not isinstance(records, list):
            raise ValueError(
                f"{self.data_path}: expected a JSON list of LLaVA records, got a JSON {type(records).__name__}"
            )
        self.records: list[Mapping] = []
        self.skipped: list[str] = []  # error messages of the records dropped at construction
        self.num_text_only = 0  # records without an image left out (`images_only`)
        for index, record in enumerate(records):
            try:
                self._check(record, index)
            except RecordError as err:
                if not skip_bad_records:
                    raise RecordError(f"{err.record} of {self.data_path}", err.detail) from None
                self.skipped.append(str(err))
                continue
            if images_only and not has_image(record):
                self.num_text_only += 1
                continue
            self.records.append(record)
        if self.skipped:
            first = "; ".join(self.skipped[:3])
            warnings.warn(
                f"{self.data_path}: skipped {len(self.skipped)} of {len(records)} bad records; first: {first}",
                stacklevel=2,
            )
        if image_processor is None and any(has_image(record) for record in self.records):
            raise ValueError(f"{self.data_path} has image records but no image_processor was given")
        self.modality_lengths = [
            estimated_length(r, num_image_tokens) * (1 if has_image(r) else -1) for r in self.records
        ]
        self.num_skipped_late = 0  # items replaced in __getitem__ (counted in this process only)

    @property
    def num_skipped(self) -> int:
        """Records dropped at construction (`skip_bad_records=True`)."""
        return len(self.skipped)

    @property
    def lengths(self) -> list[int]:
        """Estimated token lengths (see `estimated_length`), for length grouping without modality."""
        return [abs(length) for length in self.modality_lengths]

    def _check(self, record: object, index: int) -> None:
        validate_record(record, index)
        if has_image(record):
            try:
                check_image_file(self.image_folder / record["image"])
            except (FileNotFoundError, ImageLoadError) as err:
                raise RecordError(record_name(record), str(err)) from None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self.records)):
            try:
                return self._load((index + attempt) % len(self.records))
            except RecordError as err:
                if not self.skip_bad_records:
                    raise
                self.num_skipped_late += 1
                warnings.warn(f"{self.data_path}: skipping {err}", stacklevel=2)
        raise RuntimeError(f"{self.data_path}: no record could be loaded")

    def _load(self, index: int) -> dict:
        record = self.records[index]
        name = record_name(record)
        encoded = encode_conversation(
            record,
            self.tokenizer,
            self.template,
            self.num_image_tokens,
            max_length=self.max_length,
            image_token_id=self.image_token_id,
        )
        if encoded.num_supervised == 0:
            raise RecordError(
                name, f"no answer token is left within max_length={self.max_length} (the loss would be NaN)"
            )
        item = {"id": record["id"], "input_ids": encoded.input_ids, "labels": encoded.labels}
        if has_image(record):
            path = self.image_folder / record["image"]
            try:
                image = load_image(path)
            except (FileNotFoundError, ImageLoadError) as err:
                raise RecordError(name, str(err)) from err
            item["pixel_values"] = self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        return item


class ModalityLengthGroupedSampler(Sampler[int]):
    """Batches of one modality (all image or all text records) and similar lengths, in a seeded random order.

    Index order: each modality is shuffled and length-grouped with transformers' `get_length_grouped_indices` in
    steps of `batch_size * world_size` indices; full steps of both modalities are shuffled together, the step holding
    the longest record goes first (an out-of-memory error shows at once), and the partial steps of both modalities
    (the only place modalities may mix) come last. The order depends only on `seed` and the epoch (`set_epoch`).

    Distributed use:
        - `rank=None` (default) yields the whole order: consecutive `batch_size` slices are the ranks' batches of
          one step, round robin, which is how accelerate (and so the HF Trainer) shards a sampler's batches. Give
          `world_size` = number of processes and `batch_size` = per-device batch.
        - `rank=r` yields only rank r's batches, padded (by wrapping around) so every rank gets the same count;
          use it with a plain `DataLoader(batch_size=batch_size)` per rank.

    Args:
        modality_lengths: per record, positive for image records and negative for text-only ones
            (`LlavaJsonDataset.modality_lengths`).
        batch_size: per-device batch size.
        world_size: number of data-parallel processes.
        rank: this process's index, or None (see above).
        seed: base seed; the epoch is added to it.
        group_by_modality: False groups by length only, mixing modalities.
    """

    def __init__(
        self,
        modality_lengths: Sequence[int],
        batch_size: int,
        world_size: int = 1,
        rank: int | None = None,
        seed: int = 0,
        group_by_modality: bool = True,
    ):
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be positive, got {batch_size} and {world_size}")
        if rank is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if any(length == 0 for length in modality_lengths):
            raise ValueError("modality_lengths must be non-zero (positive: image record, negative: text-only)")
        self.modality_lengths = list(modality_lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.group_by_modality = group_by_modality
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.rank is None:
            return len(self.modality_lengths)
        return math.ceil(len(self.modality_lengths) / (self.batch_size * self.world_size)) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()
        if self.rank is None:
            return iter(order)
        step = self.batch_size * self.world_size
        padding = -len(order) % step
        order += (order * math.ceil(padding / max(1, len(order))))[:padding]
        start = self.rank * self.batch_size
        return iter([i for s in range(0, len(order), step) for i in order[s + start : s + start + self.batch_size]])

    def global_order(self) -> list[int]:
        """Every index once, in this epoch's order (all ranks' batches, round robin)."""
        lengths = [abs(length) for length in self.modality_lengths]
        if self.group_by_modality:
            groups = [
                [i for i, length in enumerate(self.modality_lengths) if length > 0],
                [i for i, length in enumerate(self.modality_lengths) if length < 0],
            ]
        else:
            groups = [list(range(len(lengths)))]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        step = self.batch_size * self.world_size
        steps: list[list[int]] = []
        rest: list[int] = []
        for group in groups:
            if not group:
                continue
            grouped = get_length_grouped_indices([lengths[i] for i in group], step, generator=generator)
            order = [group[j] for j in grouped]
            full = len(order) - len(order) % step
            steps += [order[s : s + step] for s in range(0, full, step)]
            rest += order[full:]
        steps = [steps[j] for j in torch.randperm(len(steps), generator=generator).tolist()]
        if steps:
            longest = max(range(len(steps)), key=lambda s: max(lengths[i] for i in steps[s]))
            steps[0], steps[longest] = steps[longest], steps[0]
        return [i for s in steps for i in s] + rest


@dataclass
class DataCollatorForLlava:
    """Pads a list of dataset items into a batch for `LlavaForConditionalGeneration`.

    Right padding: `input_ids` with the pad id (the tokenizer's pad, else unk, else eos: padded positions are masked
    anyway), `labels` with -100, `attention_mask` 1 on real tokens. `pixel_values` stacks the images of image records
    only, in batch order; a batch without images has no `pixel_values` key. The placeholders in the batch are checked
    to be consistent: every image record has the same number (N) and text-only records have none, so the model sees
    exactly (number of images) × N placeholders.

    Args:
        tokenizer: the LLM's tokenizer.
        pad_to_multiple_of: round the padded length up to a multiple of this.
        image_token_id: the placeholder id; defaults to the tokenizer's `<image>` id.
        budgets: for an elastic tower, {budget: placeholders per image} to draw each batch's budgets from
            (`budgets.batch_budgets`, by `seed` and the batch's record ids); items carry the largest count and are
            cut down to each drawn one. None: every batch at the items' own count.
        seed: the run's seed, for the draw.
        budgets_per_step: how many budgets each batch runs at (None: all; 1: one drawn; more: the smallest and
            others drawn).

    Returns (from a call on B items, longest L):
        `input_ids` [B, L] int64, `attention_mask` [B, L] int64, `labels` [B, L] int64, `pixel_values` [M, 3, H, W]
        for the M image records (if M > 0), and with `budgets` and M > 0 `num_latent_tokens` (an int: the budget the
        model must run the batch at, `budgets.vlm_budget`); with more budgets per step, `more_budgets`: one dict of
        `input_ids`, `attention_mask`, `labels` and `num_latent_tokens` per further budget, the same records and
        images with that budget's placeholders.
    """

    tokenizer: PreTrainedTokenizerBase
    pad_to_multiple_of: int | None = None
    image_token_id: int | None = None
    budgets: Mapping[int, int] | None = None
    seed: int = 0
    budgets_per_step: int | None = None

    def __post_init__(self):
        self.image_token_id = resolve_image_token_id(self.tokenizer, self.image_token_id)
        candidates = (self.tokenizer.pad_token_id, self.tokenizer.unk_token_id, self.tokenizer.eos_token_id)
        self.pad_token_id = next((i for i in candidates if i is not None), None)
        if self.pad_token_id is None:
            raise ValueError("The tokenizer has no pad, unk or eos token to pad with")
        if self.budgets:
            if self.budgets_per_step is None:
                self.budgets_per_step = len(self.budgets)
            batch_budgets(list(self.budgets), self.seed, [], self.budgets_per_step)  # refuses a count it cannot draw

    def __call__(self, items: Sequence[Mapping]) -> dict[str, Any]:
        if not items:
            raise ValueError("Cannot collate an empty batch")
        if not self.budgets or all(item.get("pixel_values") is None for item in items):
            return self._padded(items, with_images=True)
        drawn = batch_budgets(
            list(self.budgets), self.seed, [item.get("id", "") for item in items], self.budgets_per_step
        )
        batches = [
            {**self._padded([self._at_budget(item, self.budgets[n]) for item in items], with_images=i == 0),
             "num_latent_tokens": n}
            for i, n in enumerate(drawn)
        ]  # fmt: skip
        batch = batches[0]
        if len(batches) > 1:
            batch["more_budgets"] = batches[1:]
        return batch

    def _padded(self, items: Sequence[Mapping], with_images: bool) -> dict[str, Tensor]:
        """`input_ids`, `attention_mask`, `labels` of `items`, padded, and with `with_images` their `pixel_values`."""
        length = max(len(item["input_ids"]) for item in items)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        images, placeholders = [], set()
        for row, item in enumerate(items):
            ids = torch.as_tensor(item["input_ids"], dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            labels[row, : len(ids)] = torch.as_tensor(item["labels"], dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
            count = int((ids == self.image_token_id).sum())
            name = f"item {item.get('id', row)!r}"
            if item.get("pixel_values") is not None:
                if count == 0:
                    raise ValueError(f"{name} has pixel_values but no image placeholder")
                images.append(item["pixel_values"])
                placeholders.add(count)
            elif count:
                raise ValueError(f"{name} has {count} image placeholders but no pixel_values")
        if len(placeholders) > 1:
            raise ValueError(f"Image records in one batch have different placeholder counts: {sorted(placeholders)}")
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if images and with_images:
            shapes = {tuple(image.shape) for image in images}
            if len(shapes) > 1:
                raise ValueError(f"pixel_values of different shapes in one batch: {sorted(shapes)}")
            batch["pixel_values"] = torch.stack(images)
        return batch

    def _at_budget(self, item: Mapping, per_image: int) -> Mapping:
        """The item with each image's placeholders (the largest budget's count) cut to `per_image`."""
        if item.get("pixel_values") is None:
            return item
        input_ids, labels = expand_placeholders(
            torch.as_tensor(item["input_ids"], dtype=torch.long),
            torch.as_tensor(item["labels"], dtype=torch.long),
            self.image_token_id,
            max(self.budgets.values()),
            per_image,
        )
        return {**item, "input_ids": input_ids, "labels": labels}
