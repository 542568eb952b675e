"""A LLaVA JSON test set as a local lmms-eval task pack, scored as `eval-vlm` scores it (`mllm-sparse lmms-task`).

    mllm-sparse lmms-task --data runs/world/llava_test.json --out runs/lmms_tasks
    lmms-eval --model mllm_sparse_llava --model_args pretrained=runs/vlm \\
        --include_path runs/lmms_tasks --tasks mllm_sparse_synth --batch_size 8 --output_path runs/lmms_results

The pack folder holds two tasks, their documents and a `utils.py` that imports the functions below:

- `TASK` (`mllm_sparse_synth`, or `--task`): one document per question, asked with the gold answers of the record's
  earlier turns as context, exactly `eval-vlm`'s questions (`evaluate.questions`). A first question's context is its
  text; a later one's is the conversation so far as a JSON list of LLaVA turns (lmms-eval's conversational context,
  which `mllm_sparse_llava` reads). Greedy, `max_new_tokens` as `eval-vlm` (16). Metrics: `accuracy` (exact match
  after `evaluate.normalize_answer`) and `accuracy_<type>` per question type: the same numbers as `eval-vlm`'s
  `accuracy` and `by_type`.
- `TASK_chat` (`mllm_sparse_synth_chat`): one document per record, `generate_until_multi_round`: the model answers
  the record's questions in one conversation, its own answers (not the gold ones) as context. `accuracy` and
  `accuracy_<type>` are over all questions.

Documents carry absolute image paths, so the pack works from any directory; regenerate it if the data moves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm_sparse.files import atomic_path, write_json
from mllm_sparse.images import load_image

from .evaluate import MAX_NEW_TOKENS, is_correct, load_records, questions

TASK = "mllm_sparse_synth"
QUESTIONS_FILE = "questions.json"
CONVERSATIONS_FILE = "conversations.json"
UTILS = f'''"""lmms-eval functions of this task pack, written by `mllm-sparse lmms-task`; see `{__name__}`."""

from {__name__} import (  # noqa: F401
    chat_doc_to_text,
    chat_process_results,
    doc_to_text,
    doc_to_visual,
    micro_average,
    process_results,
)
'''


def metric_name(qtype: str) -> str:
    """`accuracy_<type>`, the type reduced to lowercase letters, digits and underscores."""
    return "accuracy_" + re.sub(r"[^a-z0-9]+", "_", qtype.lower()).strip("_")


# ------------------------------------------------------------------------------------ functions lmms-eval calls


def doc_to_visual(doc: Mapping) -> list:
    """The document's image (loaded, errors naming the file), or none for a text-only question."""
    return [load_image(doc["image"])] if doc["image"] else []


def doc_to_text(doc: Mapping, lmms_eval_specific_kwargs: Mapping | None = None) -> str:
    """The question, or for a later turn the conversation up to it as a JSON list of LLaVA turns."""
    turns = json.loads(doc["prompt"])
    return turns[0]["value"] if len(turns) == 1 else json.dumps(turns)


def process_results(doc: Mapping, results: Sequence[str]) -> dict[str, float]:
    correct = float(is_correct(results[0], doc["gold"]))
    return {"accuracy": correct, metric_name(doc["type"]): correct}


def chat_doc_to_text(
    doc: Mapping,
    lmms_eval_specific_kwargs: Mapping | None = None,
    previous_output: Sequence[str] | None = None,
    round_idx: int | None = None,
    previous_round_info: Any = None,
):
    """lmms-eval's multi-round protocol: the first context (`round_idx` None), then per round
    (visuals, next question, done, outputs, info)."""
    asked = doc["questions"]
    if round_idx is None:
        if not doc["system"]:
            return asked[0]
        return json.dumps([{"from": "system", "value": doc["system"]}, {"from": "human", "value": asked[0]}])
    if round_idx >= len(asked):
        return None, None, True, previous_output, None
    return None, asked[round_idx], False, previous_output, None


def chat_process_results(doc: Mapping, results: Sequence) -> dict[str, tuple[int, int]]:
    answers = list(results[0]) if results and isinstance(results[0], (list, tuple)) else list(results)
    out: dict[str, list[int]] = {"accuracy": [0, 0]}
    for k, (gold, qtype) in enumerate(zip(doc["golds"], doc["types"], strict=True)):
        correct = int(k < len(answers) and is_correct(str(answers[k]), gold))
        for name in ("accuracy", metric_name(qtype)):
            entry = out.setdefault(name, [0, 0])
            entry[0] += correct
            entry[1] += 1
    return {name: (c, t) for name, (c, t) in out.items()}


def micro_average(items: Sequence[tuple[int, int]]) -> float:
    """Correct answers over all questions, from per-document (correct, total) pairs."""
    total = sum(t for _, t in items)
    return sum(c for c, _ in items) / total if total else float("nan")


# --------------------------------------------------------------------------------------------- writing the pack


@dataclass
class LmmsTaskSettings:
    """What `mllm-sparse lmms-task` does: one field per option of the command.

    Attributes:
        data: a LLaVA JSON test set (checked as `eval-vlm` checks it).
        out: the pack folder (lmms-eval's `--include_path`).
        image_folder: root of the records' image paths; None: the data file's folder.
        task: the question task's name; the conversation task is `<task>_chat`.
        limit: only the first N records.
    """

    data: Path
    out: Path
    image_folder: Path | None = None
    task: str = TASK
    limit: int | None = None


def run(settings: LmmsTaskSettings) -> dict[str, Any]:
    """Write the task pack (see the module docstring).

    Returns:
        {"tasks": [question task, conversation task], "questions": n, "records": m, "types": [...], "out": out}.
    """
    task = settings.task
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", task):
        raise ValueError(f"--task must be letters, digits and underscores, starting with a letter; got {task!r}")
    data = Path(settings.data)
    folder = Path(settings.image_folder) if settings.image_folder is not None else data.parent
    records, _ = load_records(data, folder, settings.limit)
    items = questions(records, folder.resolve())
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    question_docs = [
        {
            "question_id": f"{item.record_id}#{item.turn + 1}",
            "record_id": item.record_id,
            "turn": item.turn + 1,
            "type": item.qtype,
            "image": str(item.image) if item.image is not None else "",
            "prompt": json.dumps(item.prompt["conversations"]),
            "gold": item.gold,
        }
        for item in items
    ]
    by_record: dict[int, list] = {}
    for item in items:
        by_record.setdefault(item.record_index, []).append(item)
    conversation_docs = []
    for index, record_items in by_record.items():
        turns = records[index]["conversations"]
        conversation_docs.append(
            {
                "record_id": record_items[0].record_id,
                "image": question_docs[items.index(record_items[0])]["image"],
                "system": turns[0]["value"] if turns[0]["from"] == "system" else "",
                "questions": [item.question for item in record_items],
                "golds": [item.gold for item in record_items],
                "types": [item.qtype for item in record_items],
            }
        )
    types = sorted({item.qtype for item in items})
    write_json(out / QUESTIONS_FILE, question_docs)
    write_json(out / CONVERSATIONS_FILE, conversation_docs)
    with atomic_path(out / "utils.py") as tmp:
        tmp.write_text(UTILS)
    chat_task = f"{task}_chat"
    for name, docs_file, kind in ((task, QUESTIONS_FILE, "questions"), (chat_task, CONVERSATIONS_FILE, "chat")):
        with atomic_path(out / f"{name}.yaml") as tmp:
            tmp.write_text(_yaml(name, (out / docs_file).resolve(), kind, types, data))
    return {
        "tasks": [task, chat_task],
        "questions": len(question_docs),
        "records": len(conversation_docs),
        "types": types,
        "out": str(out),
    }


def _yaml(task: str, docs: Path, kind: str, types: Sequence[str], data: Path) -> str:
    chat = kind == "chat"
    prefix = "chat_" if chat else ""
    aggregation = "!function utils.micro_average" if chat else "mean"
    metrics = "".join(
        f"  - metric: {name}\n    aggregation: {aggregation}\n    higher_is_better: true\n"
        for name in ["accuracy", *dict.fromkeys(metric_name(t) for t in types)]
    )
    return f"""# Written by `mllm-sparse lmms-task` from {json.dumps(str(data))}; `{__name__}` explains the task.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(docs))}
test_split: test
output_type: {"generate_until_multi_round" if chat else "generate_until"}
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.{prefix}doc_to_text
doc_to_target: {"golds" if chat else "gold"}
generation_kwargs:
  max_new_tokens: {MAX_NEW_TOKENS}
  do_sample: false
  temperature: 0
  num_beams: 1
process_results: !function utils.{prefix}process_results
metric_list:
{metrics}metadata:
  version: 1.0
"""
