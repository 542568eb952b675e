"""Is one model better than another on the same test questions? A paired bootstrap over test records.

Two `eval-vlm` runs on the same data score the same questions, so their accuracies are compared question by question
(paired), not as two independent proportions. A record's turns share one image and are not independent, so the
bootstrap resamples whole records (a cluster bootstrap): each draw takes `len(records)` records with replacement and
recomputes the accuracy difference over all their answers.

    from mllm_sparse_recipes.ablation.statistics import paired_difference
    paired_difference(report_a["predictions"], report_b["predictions"])  # {"difference": 0.010, "low": -0.008, ...}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mllm_sparse.files import read_json

from . import SIZES


def answer_key(prediction: Mapping) -> tuple[str, int]:
    """A scored answer's identity across runs: (record id, turn)."""
    return str(prediction["id"]), int(prediction["turn"])


def paired_difference(
    a: Sequence[Mapping], b: Sequence[Mapping], samples: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, float | int]:
    """Accuracy of run `a` minus that of run `b` on the same answers, with a cluster-bootstrap confidence interval.

    Args:
        a, b: the `predictions` of two `eval-vlm` reports (each with `id`, `turn`, `correct`), the same answers.
        samples: bootstrap draws; level: the interval's coverage; seed: the draws' seed.
    Returns:
        difference (a − b, as a fraction), low / high (the interval), answers, records, and a_only / b_only (answers
        only one of the two got right).
    Raises:
        ValueError: the two runs scored different answers (the first missing one is named) or nothing.
    """
    correct_a = {answer_key(p): bool(p["correct"]) for p in a}
    correct_b = {answer_key(p): bool(p["correct"]) for p in b}
    if correct_a.keys() != correct_b.keys():
        missing = sorted(correct_a.keys() ^ correct_b.keys())[0]
        side = "the first" if missing in correct_b else "the second"
        raise ValueError(
            f"the two runs scored different answers: record {missing[0]!r} turn {missing[1]} is missing from {side} "
            "(evaluate both on the same data and --limit)"
        )
    if not correct_a:
        raise ValueError("no answers to compare")
    keys = sorted(correct_a)
    records = sorted({record for record, _ in keys})
    index = {record: i for i, record in enumerate(records)}
    group = torch.tensor([index[record] for record, _ in keys])
    delta = torch.tensor([float(correct_a[k]) - float(correct_b[k]) for k in keys], dtype=torch.float64)
    per_record = torch.zeros(len(records), dtype=torch.float64).index_add_(0, group, delta)
    answers_per_record = torch.bincount(group, minlength=len(records)).double()
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(records), (samples, len(records)), generator=generator)
    resampled = per_record[draws].sum(1) / answers_per_record[draws].sum(1)  # [samples]
    tail = (1 - level) / 2
    low, high = torch.quantile(resampled, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return {
        "difference": delta.mean().item(),
        "low": low,
        "high": high,
        "answers": len(keys),
        "records": len(records),
        "a_only": int((delta > 0).sum()),
        "b_only": int((delta < 0).sum()),
    }


def predictions(out: Path, name: str, stage: str) -> list[dict]:
    from llava_adapter.evaluate import JSON_NAME

    return read_json(out / "arms" / name / f"eval_{stage}" / JSON_NAME)["predictions"]


def scores(report: dict[str, Any]) -> dict[str, Any]:
    """Accuracy overall, by question type and by object size, and the answers counted, of an `eval-vlm` report (or
    of `question_only_prior`'s, which has the same keys)."""
    return {
        "accuracy": report["accuracy"],
        "by_type": {k: v["accuracy"] for k, v in report["by_type"].items()},
        "by_target_size": {k: v["accuracy"] for k, v in report["by_target_size"].items()},
        "answers": report["num_answers"],
    }


# the rows each method's row is compared with at its own budget, in this order
RIVALS = {"sparseformer": ["pooled", "visionzip", "m3"], "elastic": ["sparseformer", "m3", "pooled"]}


def paired_comparisons(out: Path, names: list[str], stage: str) -> list[dict[str, Any]]:
    """Each SparseFormer arm against every peer of its N (pooled, visionzip, m3), each elastic row against the
    dedicated SparseFormer, m3 and the pooled arm of its N, and every arm against the ViT: accuracy differences on
    the same answers, overall and by object size, with 95% cluster-bootstrap intervals."""
    pairs = []
    for name in names:
        method, _, budget = name.partition("-")
        rivals = RIVALS.get(method, [])
        pairs += [(name, f"{rival}-{budget}") for rival in rivals if f"{rival}-{budget}" in names]
        if name != "vit" and "vit" in names:
            pairs.append((name, "vit"))
    out_rows = []
    for a, b in pairs:
        pa, pb = predictions(out, a, stage), predictions(out, b, stage)
        row = {"a": a, "b": b, "all": paired_difference(pa, pb)}
        for size in SIZES:
            sa = [p for p in pa if p["target_size"] == size]
            row[size] = paired_difference(sa, [p for p in pb if p["target_size"] == size]) if sa else None
        out_rows.append(row)
    return out_rows
