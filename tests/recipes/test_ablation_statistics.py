"""The paired cluster bootstrap that says whether one arm beats another on the same test answers."""

from __future__ import annotations

import math
import random

import pytest

from mllm_sparse_recipes.ablation.statistics import paired_difference


def predictions(correct: list[list[bool]]) -> list[dict]:
    """`eval-vlm`-style predictions: record i's turns are correct[i]."""
    return [
        {"id": f"rec-{i}", "turn": t + 1, "correct": c} for i, turns in enumerate(correct) for t, c in enumerate(turns)
    ]


def test_identical_runs_differ_by_exactly_nothing():
    rng = random.Random(0)
    run = predictions([[rng.random() < 0.6 for _ in range(3)] for _ in range(50)])
    result = paired_difference(run, list(reversed(run)))
    assert result == {
        "difference": 0.0,
        "low": 0.0,
        "high": 0.0,
        "answers": 150,
        "records": 50,
        "a_only": 0,
        "b_only": 0,
    }


def test_a_clear_win_excludes_zero_and_counts_the_discordant_answers():
    rng = random.Random(1)
    b = [[rng.random() < 0.5 for _ in range(2)] for _ in range(200)]
    a = [[True if rng.random() < 0.5 else c for c in turns] for turns in b]  # a fixes about half of b's errors
    result = paired_difference(predictions(a), predictions(b))
    gained = sum(x and not y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    assert result["a_only"] == gained and result["b_only"] == 0
    assert result["difference"] == pytest.approx(gained / 400)
    assert 0 < result["low"] < result["difference"] < result["high"]


def test_one_answer_per_record_matches_the_normal_interval():
    """With one answer per record the cluster bootstrap is the plain bootstrap of a mean: its 95% interval is close to
    the normal one, difference ± 1.96 × sd / sqrt(n)."""
    rng = random.Random(2)
    a = [[rng.random() < 0.7] for _ in range(2000)]
    b = [[rng.random() < 0.6] for _ in range(2000)]
    result = paired_difference(predictions(a), predictions(b), samples=4000)
    deltas = [float(x[0]) - float(y[0]) for x, y in zip(a, b, strict=True)]
    mean = sum(deltas) / len(deltas)
    sd = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (len(deltas) - 1))
    half = 1.96 * sd / math.sqrt(len(deltas))
    assert result["low"] == pytest.approx(mean - half, abs=0.15 * half)
    assert result["high"] == pytest.approx(mean + half, abs=0.15 * half)


def test_records_cluster_widen_the_interval():
    """Turns of one record that are right or wrong together carry less evidence than independent answers: the
    interval is wider than for the same answers spread over one-turn records."""
    rng = random.Random(3)
    outcomes = [(rng.random() < 0.6, rng.random() < 0.5) for _ in range(300)]
    clustered = paired_difference(
        predictions([[x] * 5 for x, _ in outcomes]), predictions([[y] * 5 for _, y in outcomes])
    )
    spread = paired_difference(
        predictions([[x] for x, _ in outcomes for _ in range(5)]),
        predictions([[y] for _, y in outcomes for _ in range(5)]),
    )
    assert clustered["difference"] == pytest.approx(spread["difference"])
    assert clustered["high"] - clustered["low"] > 1.8 * (spread["high"] - spread["low"])


def test_different_answers_are_refused_with_the_record_named():
    a = predictions([[True, False], [True]])
    with pytest.raises(ValueError, match=r"'rec-1' turn 1 is missing from the second"):
        paired_difference(a, a[:2])
    with pytest.raises(ValueError, match="no answers"):
        paired_difference([], [])


def test_paired_comparisons_pair_each_arm_as_the_ablation_reads_them(tmp_path):
    """SparseFormer vs the pooled arm of its N and vs the ViT, pooled vs the ViT; overall and per object size, each
    row computed from that size's answers only, read from OUT/arms/NAME/eval_STAGE."""
    from llava_adapter.evaluate import JSON_NAME
    from mllm_sparse.files import write_json
    from mllm_sparse_recipes.ablation import SIZES
    from mllm_sparse_recipes.ablation.statistics import paired_comparisons

    small, large = SIZES[0], SIZES[-1]
    # 4 records of 2 turns: records 0-1 ask about small objects, 2-3 about large ones
    right = {  # which answers each arm gets right, per record
        "sparseformer-16": [[True, True], [True, True], [True, False], [False, False]],
        "pooled-16": [[False, False], [False, True], [True, False], [False, False]],
        "vit": [[True, True], [True, True], [True, True], [True, True]],
    }
    for name, correct in right.items():
        rows = [
            {"id": f"rec-{i}", "turn": t + 1, "correct": c, "target_size": small if i < 2 else large}
            for i, turns in enumerate(correct)
            for t, c in enumerate(turns)
        ]
        write_json(tmp_path / "arms" / name / "eval_stage2" / JSON_NAME, {"predictions": rows})
    rows = paired_comparisons(tmp_path, ["sparseformer-16", "pooled-16", "vit"], "stage2")
    assert [(r["a"], r["b"]) for r in rows] == [
        ("sparseformer-16", "pooled-16"),
        ("sparseformer-16", "vit"),
        ("pooled-16", "vit"),
    ]
    sf_pooled, sf_vit, pooled_vit = rows
    assert sf_pooled["all"]["difference"] == pytest.approx(3 / 8)
    assert sf_pooled[small]["difference"] == pytest.approx(3 / 4) and sf_pooled[small]["answers"] == 4
    assert sf_pooled[large]["difference"] == 0.0 and sf_pooled[large]["records"] == 2
    assert sf_vit[small]["difference"] == 0.0 and sf_vit[large]["difference"] == pytest.approx(-3 / 4)
    assert pooled_vit["all"]["difference"] == pytest.approx(-6 / 8)
    assert all(r[size] is None for r in rows for size in SIZES[1:-1])  # no answers about those sizes
    assert paired_comparisons(tmp_path, ["sparseformer-16", "vit"], "stage2")[0]["b"] == "vit"  # no pooled arm


def test_the_result_does_not_depend_on_the_order_of_the_predictions():
    """Reports list predictions in any order: the same answers give the same interval, draw for draw."""
    rng = random.Random(2)
    a = predictions([[rng.random() < 0.7 for _ in range(2)] for _ in range(40)])
    b = predictions([[rng.random() < 0.5 for _ in range(2)] for _ in range(40)])
    shuffled_a, shuffled_b = a[:], b[:]
    random.Random(3).shuffle(shuffled_a)
    random.Random(4).shuffle(shuffled_b)
    assert paired_difference(shuffled_a, shuffled_b) == paired_difference(a, b)
