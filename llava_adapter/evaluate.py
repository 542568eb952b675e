"""What `mllm-sparse eval-vlm` does: exact-match accuracy and throughput of a LLaVA model on a LLaVA-format test set.

    mllm-sparse eval-vlm --model runs/vlm --data runs/world/llava_test.json --image-folder runs/world
    mllm-sparse eval-vlm --model runs/vlm --data test.json --image-folder images --batch-size 16 --limit 200 --out rep

Scoring. Every human turn of every record is one question. Turn k is asked with the record's earlier turns as context,
with the gold answers (not the model's own), as LLaVA's multi-turn evaluations do; its prediction is compared with the
gold answer after `normalize_answer` (lowercase, punctuation and extra whitespace removed, number words as digits:
"Red." == "red", "Three" == "3"). Text-only records are scored like the others.

Breakdowns: by question type (`qa_meta[k]["type"]` of the synthetic world's records; "text" for a text-only record
without it; else "unknown"), by the size of the object asked about (`qa_meta[k]["target_size"]`: small / medium /
large; turns about no single object, "none", are left out of this breakdown), by turn (1 = first question) and by
modality.

Batching. With gold answers as context the questions are independent, so they are batched freely: all first turns
first (records in file order, image and text records in separate batches), then all second turns, and so on, in
batches of `--batch-size` through `ChatEngine.generate_batch`. Each question encodes its image once; a record's
follow-up turns encode it again (so `images_encoded` counts image questions, not image files).

Bad records. A record that is malformed or whose image is missing fails the run before the model loads; an image that
exists but cannot be decoded fails it when its batch comes; both errors name the record and the image. With
`--skip-bad-records` (as in `scripts/train_vlm.py`) such records and questions are skipped and counted instead: the
report scores the questions answered and lists the skipped ones (`skipped`: id, turn, error).

Outputs, written atomically into `--out` (default: the model folder): `eval_vlm.json` (summary, breakdowns,
throughput, every prediction and every skipped question) and `eval_vlm.md` (the tables, also printed).
"""

from __future__ import annotations

import itertools
import re
import string
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from mllm_sparse.files import atomic_path, read_json, write_json
from mllm_sparse.images import ImageLoadError, check_image_file, load_image

from .chat import ChatEngine, Timings
from .conversation import RecordError, has_image, record_name, validate_record

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
NO_TARGET = ("", "none")
JSON_NAME = "eval_vlm.json"
MD_NAME = "eval_vlm.md"
MAX_NEW_TOKENS = 16  # the answers here are a word or two


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed, number words zero–ten as digits ("Three." → "3")."""
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    return " ".join(str(NUMBER_WORDS.index(w)) if w in NUMBER_WORDS else w for w in words)


def is_correct(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


@dataclass(frozen=True)
class Question:
    """One scored turn: turn `turn` (0-based human-turn index) of record `record_index`."""

    record_index: int
    record_id: str
    turn: int
    prompt: dict[str, Any]  # the record up to and including this human turn, gold answers before it
    question: str
    gold: str
    qtype: str
    target_size: str | None
    image: Path | None


def load_records(
    data: str | Path, image_folder: str | Path | None = None, limit: int | None = None, skip_bad_records: bool = False
) -> tuple[list[dict], list[dict[str, Any]]]:
    """Read and check a LLaVA JSON test set: the valid records (`conversation.validate_record`) whose images exist.

    Returns:
        (records, skipped): `skipped` holds one `{"id", "turn": None, "error"}` per bad record when
        `skip_bad_records`; without it the first bad record raises `RecordError` naming the file and the record.
    """
    data = Path(data)
    records = read_json(data)  # FileNotFoundError / malformed JSON: ValueError naming the file
    if not isinstance(records, list):
        raise ValueError(f"{data}: expected a JSON list of LLaVA records, got a JSON {type(records).__name__}")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be positive, got {limit}")
        records = records[:limit]
    if not records:
        raise ValueError(f"{data}: no records to evaluate")
    folder = Path(image_folder) if image_folder is not None else data.parent
    good, skipped = [], []
    for index, record in enumerate(records):
        try:
            _check_record(record, index, folder)
        except RecordError as err:
            if not skip_bad_records:
                raise RecordError(f"{err.record} of {data}", f"{err.detail} (--skip-bad-records skips it)") from None
            name = record["id"] if isinstance(record, Mapping) and "id" in record else f"#{index}"
            skipped.append({"id": str(name), "turn": None, "error": err.detail})
            continue
        good.append(record)
    if not good:
        raise ValueError(f"{data}: all {len(records)} records are bad; first: {skipped[0]['error']}")
    return good, skipped


def _check_record(record: object, index: int, folder: Path) -> None:
    validate_record(record, index)
    if has_image(record):
        try:
            check_image_file(folder / record["image"])
        except (FileNotFoundError, ImageLoadError) as err:
            raise RecordError(record_name(record, index), str(err)) from None
    meta = record.get("qa_meta")
    if meta is not None and not (isinstance(meta, list) and all(isinstance(m, Mapping) for m in meta)):
        raise RecordError(record_name(record, index), "'qa_meta' must be a list of objects, one per question")


def questions(records: Sequence[Mapping], image_folder: Path) -> list[Question]:
    """Every human turn of every record as a `Question`, in record order, then turn order."""
    out = []
    for index, record in enumerate(records):
        turns = record["conversations"]
        start = 1 if turns[0]["from"] == "system" else 0
        meta = record.get("qa_meta") or []
        for k, i in enumerate(range(start, len(turns), 2)):
            info = meta[k] if k < len(meta) else {}
            qtype = info.get("type") or ("text" if not has_image(record) else "unknown")
            size = info.get("target_size")
            prompt = {key: value for key, value in record.items() if key not in ("conversations", "qa_meta")}
            prompt["conversations"] = [dict(turn) for turn in turns[: i + 1]]
            out.append(
                Question(
                    record_index=index,
                    record_id=str(record["id"]),
                    turn=k,
                    prompt=prompt,
                    question=turns[i]["value"],
                    gold=turns[i + 1]["value"],
                    qtype=str(qtype),
                    target_size=None if size is None or str(size).lower() in NO_TARGET else str(size),
                    image=image_folder / record["image"] if has_image(record) else None,
                )
            )
    return out


def batches(items: Sequence[Question], batch_size: int) -> list[list[int]]:
    """Indices of `items` in batches: by turn, then modality (image first), then file order."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault((item.turn, item.image is None), []).append(i)
    out = []
    for key in sorted(groups):
        group = groups[key]
        out += [group[s : s + batch_size] for s in range(0, len(group), batch_size)]
    return out


def _load_question_image(item: Question) -> Image.Image | None:
    if item.image is None:
        return None
    try:
        return load_image(item.image)
    except (FileNotFoundError, ImageLoadError) as err:
        raise RecordError(f"record {item.record_id!r} (turn {item.turn + 1})", str(err)) from err


def question_only_prior(train_data: str | Path, rows: Sequence[Mapping]) -> dict[str, Any]:
    """The question-only prior on scored rows: each question answered with the training split's most frequent answer
    to the same question text, whatever the image. A model has learnt to read images where it beats this; it is the
    score of a lookup table from question to answer, not a bound on what an image-blind model could learn.

    Args:
        train_data: the LLaVA JSON the model trained on (a leading system turn is skipped, as `questions` does).
        rows: `evaluate(...)["predictions"]` of some model (the questions and gold answers are what is used).
    Returns:
        `accuracy`, `num_answers` and breakdowns `by_type` / `by_target_size` (as in `evaluate`), and `predictions`.
    """

    def text(turn: str) -> str:
        return turn.replace("<image>", "").strip()

    answers: dict[str, Counter] = defaultdict(Counter)
    for record in read_json(train_data):
        turns = record.get("conversations", [])
        for asked, answered in itertools.pairwise(turns):
            if asked.get("from") == "human" and answered.get("from") == "gpt":
                answers[text(asked["value"])][answered["value"]] += 1
    scored = []
    for row in rows:
        seen = answers.get(text(row["question"]))
        guess = seen.most_common(1)[0][0] if seen else ""
        scored.append({**row, "prediction": guess, "correct": is_correct(guess, row["gold"])})
    return {
        "num_answers": len(scored),
        "accuracy": sum(r["correct"] for r in scored) / len(scored) if scored else 0.0,
        "by_type": accuracy_by(scored, lambda r: r["type"]),
        "by_target_size": accuracy_by(scored, lambda r: r["target_size"]),
        "predictions": scored,
    }


def accuracy_by(rows: Sequence[Mapping], key: Callable[[Mapping], Any]) -> dict[str, dict[str, float | int]]:
    """{value: {"correct", "total", "accuracy"}} over scored rows, grouped by `key(row)` (None: left out)."""
    out: dict[str, dict[str, float | int]] = {}
    for row in rows:
        value = key(row)
        if value is None:
            continue
        entry = out.setdefault(str(value), {"correct": 0, "total": 0})
        entry["correct"] += int(row["correct"])
        entry["total"] += 1
    for entry in out.values():
        entry["accuracy"] = entry["correct"] / entry["total"]
    return dict(sorted(out.items()))


def evaluate(
    engine: ChatEngine,
    records: Sequence[Mapping],
    image_folder: str | Path,
    batch_size: int = 8,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = True,
    skip_bad_records: bool = False,
) -> dict[str, Any]:
    """Ask every question of `records` (see the module docstring) and score the answers.

    A question whose image cannot be read raises `RecordError` naming the record and the image, or, with
    `skip_bad_records`, is left out and listed in `skipped`.

    Returns:
        The report: `accuracy`, `correct`, `num_answers`, breakdowns `by_type`, `by_target_size`, `by_turn`,
        `by_modality` ({key: {"correct", "total", "accuracy"}}), `throughput`, `predictions` (one row per
        answered question: id, turn, type, target_size, question, gold, prediction, correct) and `skipped` (one
        `{"id", "turn", "error"}` per question left out).
    """
    items = questions(records, Path(image_folder))
    predictions: list[str | None] = [None] * len(items)
    skipped: list[dict[str, Any]] = []
    timings: list[Timings] = []
    start = time.perf_counter()
    for batch in tqdm(batches(items, batch_size), desc="eval-vlm", disable=not progress, unit="batch"):
        images = {}
        for i in batch:
            try:
                images[i] = _load_question_image(items[i])
            except RecordError as err:
                if not skip_bad_records:
                    raise RecordError(err.record, f"{err.detail} (--skip-bad-records skips it)") from err
                skipped.append({"id": items[i].record_id, "turn": items[i].turn + 1, "error": err.detail})
        batch = [i for i in batch if i in images]
        if not batch:
            continue
        prompts = [items[i].prompt for i in batch]
        answers = engine.generate_batch(prompts, [images[i] for i in batch], max_new_tokens=max_new_tokens)
        if len(answers) != len(batch):
            raise RuntimeError(f"generate_batch returned {len(answers)} answers for {len(batch)} questions")
        for i, answer in zip(batch, answers, strict=True):
            predictions[i] = answer
        if engine.last_timings is not None:
            timings.append(engine.last_timings)
    wall_s = time.perf_counter() - start

    rows = [
        {
            "id": item.record_id,
            "turn": item.turn + 1,
            "type": item.qtype,
            "target_size": item.target_size,
            "modality": "text" if item.image is None else "image",
            "question": item.question,
            "gold": item.gold,
            "prediction": prediction,
            "correct": is_correct(prediction, item.gold),
        }
        for item, prediction in zip(items, predictions, strict=True)
        if prediction is not None
    ]
    correct = sum(row["correct"] for row in rows)
    return {
        "num_records": len(records),
        "num_answers": len(rows),
        "correct": correct,
        "accuracy": correct / len(rows) if rows else 0.0,
        "by_type": accuracy_by(rows, lambda row: row["type"]),
        "by_target_size": accuracy_by(rows, lambda row: row["target_size"]),
        "by_turn": accuracy_by(rows, lambda row: row["turn"]),
        "by_modality": accuracy_by(rows, lambda row: row["modality"]),
        "throughput": throughput(timings, wall_s, rows, engine, batch_size),
        "predictions": rows,
        "skipped": skipped,
    }


def throughput(
    timings: Sequence[Timings], wall_s: float, rows: Sequence[Mapping], engine: ChatEngine, batch_size: int
) -> dict[str, Any]:
    """Rates over the whole run (wall clock: image loading, preprocessing and generation) and the stage means."""
    images = sum(t.num_images for t in timings)
    encode_s = sum(t.encode_s for t in timings)
    decode_s = sum(t.decode_s for t in timings)
    decoded = sum(t.tokens_per_s * t.decode_s for t in timings)
    calls = max(1, len(timings))
    device = engine.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {
        "device": f"{device} ({name})",
        "dtype": str(engine.model.dtype).removeprefix("torch."),
        "num_image_tokens": engine.num_image_tokens,
        "batch_size": batch_size,
        "batches": len(timings),
        "wall_s": wall_s,
        "answers_per_s": len(rows) / wall_s if wall_s > 0 else 0.0,
        "images_encoded": images,
        "images_per_s": images / wall_s if wall_s > 0 else 0.0,
        "encode_ms_per_image": 1000 * encode_s / images if images else 0.0,
        "mean_encode_s": encode_s / calls,
        "mean_prefill_s": sum(t.prefill_s for t in timings) / calls,
        "mean_decode_s": decode_s / calls,
        "decode_tokens_per_s": decoded / decode_s if decode_s > 0 else 0.0,
        "prompt_tokens": sum(t.prompt_tokens for t in timings),
        "new_tokens": sum(t.new_tokens for t in timings),
    }


def to_markdown(report: Mapping[str, Any]) -> str:
    """The report's tables: accuracy overall and by type / target size / turn / modality, then throughput."""
    elastic = len(report.get("budgets", [])) > 1
    lines = [
        f"# eval-vlm: {report.get('model', '')}",
        "",
        f"Data: `{report.get('data', '')}`, template `{report.get('template', '')}`"
        + (f", budget {report['num_latent_tokens']} of {report['budgets']}" if elastic else "")
        + f": {report['num_records']} records, {report['num_answers']} answers"
        + (f", {len(report['skipped'])} skipped (listed in {JSON_NAME})." if report.get("skipped") else "."),
        "",
        "| split | key | correct | total | accuracy |",
        "|---|---|---|---|---|",
        f"| overall | all | {report['correct']} | {report['num_answers']} | {100 * report['accuracy']:.1f}% |",
    ]
    for split in ("by_type", "by_target_size", "by_turn", "by_modality"):
        for key, entry in report[split].items():
            lines.append(
                f"| {split.removeprefix('by_')} | {key} | {entry['correct']} | {entry['total']} | "
                f"{100 * entry['accuracy']:.1f}% |"
            )
    t = report["throughput"]
    lines += [
        "",
        f"Throughput on {t['device']}, {t['dtype']}, batch {t['batch_size']}, N = {t['num_image_tokens']} image "
        "tokens per image (stage means are per batch):",
        "",
        "| answers/s | images/s | encode ms/image | mean encode s | mean prefill s | mean decode s | decode tok/s |",
        "|---|---|---|---|---|---|---|",
        f"| {t['answers_per_s']:.2f} | {t['images_per_s']:.2f} | {t['encode_ms_per_image']:.2f} | "
        f"{t['mean_encode_s']:.4f} | {t['mean_prefill_s']:.4f} | {t['mean_decode_s']:.4f} | "
        f"{t['decode_tokens_per_s']:.1f} |",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class EvalVlmSettings:
    """What `mllm-sparse eval-vlm` does: one field per option of the command.

    Attributes:
        model: a saved LLaVA folder (model + processor).
        data: the LLaVA JSON test set.
        image_folder: where the records' images are; None: `data`'s folder.
        template: the conversation template (`conversation.TEMPLATES`); None: the one the model folder records.
        num_latent_tokens: the token budget to encode images at, one the model's tower serves (an elastic tower
            serves several); None: the model's default.
        batch_size: questions per `generate_batch` call.
        max_new_tokens: answer length limit.
        limit: evaluate only the first `limit` records; None: all.
        out: where `eval_vlm.json` and `eval_vlm.md` go; None: `model`.
        device: "cuda", "cpu", "cuda:1", ...; None: cuda if available.
        dtype: cast the model, e.g. "bfloat16"; None: as saved.
        skip_bad_records: skip (and count) bad records and unreadable images instead of failing.
        progress: show a progress bar.
    """

    model: Path
    data: Path
    image_folder: Path | None = None
    template: str | None = None
    num_latent_tokens: int | None = None
    batch_size: int = 8
    max_new_tokens: int = MAX_NEW_TOKENS
    limit: int | None = None
    out: Path | None = None
    device: str | None = None
    dtype: str | None = None
    skip_bad_records: bool = False
    progress: bool = True


def run(settings: EvalVlmSettings) -> dict[str, Any]:
    """Score `settings.model` on `settings.data` and write `eval_vlm.json` and `eval_vlm.md` (atomically) into
    `settings.out`; bad data is refused before the model loads.

    Returns:
        The report (`evaluate`'s, with the settings it was made with); `to_markdown(report)` gives its tables.
    """
    model, data = Path(settings.model), Path(settings.data)
    image_folder = Path(settings.image_folder) if settings.image_folder is not None else data.parent
    for name in ("batch_size", "max_new_tokens"):
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(settings, name)}")
    out = Path(settings.out) if settings.out is not None else model
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; the report is written into a folder")
    # Data errors surface before the model loads.
    records, skipped = load_records(data, image_folder, settings.limit, settings.skip_bad_records)
    engine = ChatEngine.from_pretrained(
        model,
        template=settings.template,
        device=settings.device,
        dtype=settings.dtype,
        num_latent_tokens=settings.num_latent_tokens,
    )
    report = {
        "model": str(model),
        "data": str(data),
        "image_folder": str(image_folder),
        "template": engine.template,
        "num_latent_tokens": engine.num_latent_tokens,
        "budgets": engine.budgets,
        "max_new_tokens": settings.max_new_tokens,
        "limit": settings.limit,
    }
    report |= evaluate(
        engine,
        records,
        image_folder,
        settings.batch_size,
        settings.max_new_tokens,
        settings.progress,
        settings.skip_bad_records,
    )
    report["skipped"] = skipped + report["skipped"]
    write_json(out / JSON_NAME, report)
    with atomic_path(out / MD_NAME) as tmp:
        tmp.write_text(to_markdown(report))
    return report
