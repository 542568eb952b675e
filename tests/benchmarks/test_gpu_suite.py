"""The GPU suite's `--quick` CPU mode runs every part end to end, so a GPU run cannot fail on a typo; and what the
VLM-latency benchmark derives for a sliced LLM (KV bytes, FLOPs) equals what the whole LLM measures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import vlm_latency  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("suite")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_suite.py"), "--quick", "--out-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_every_part_runs_and_writes_its_results(quick_run):
    suite = json.loads((quick_run / "gpu_suite_quick.json").read_text())
    assert sorted(suite["parts"]) == ["bootstrap_speed", "encoder_speed", "vlm_latency"]
    assert all(part["status"] == 0 for part in suite["parts"].values())
    for name in ("encoder_speed", "vlm_latency", "bootstrap_speed"):
        assert (quick_run / f"{name}_quick.md").read_text().startswith("# ")
    assert (quick_run / "vlm_latency_quick.png").stat().st_size > 10_000
    speed = json.loads((quick_run / "bootstrap_speed_quick.json").read_text())
    modes = {"teacher_per_batch", "from_cache", "teacher_forward", "elastic_per_batch", "elastic_from_cache"}
    assert set(speed["images_per_s"]) == modes
    assert all(v > 0 for v in speed["images_per_s"].values())
    assert speed["budgets"] == [4, 9, 16] and set(speed["elastic_cost"]) == {"teacher_per_batch", "from_cache"}


def test_each_arm_feeds_its_budget_and_its_kv_cache_has_exactly_that_length(quick_run):
    report = json.loads((quick_run / "vlm_latency_quick.json").read_text())
    _, shapes, _, _ = vlm_latency.quick_shapes()
    budgets = {"vit-64": 64, "sparseformer-9": 9, "sparseformer-4": 4, "pooled-16": 16, "pooled-4": 4}
    for llm in report["llms"]:
        config = shapes[llm["llm"]]
        head_dim = config.hidden_size // config.num_attention_heads
        assert sorted(r["arm"] for r in llm["results"]) == sorted(list(budgets) * 2)  # batch 1 and 8
        for row in llm["results"]:
            assert row["image_tokens"] == budgets[row["arm"]]
            length = 1 + budgets[row["arm"]] + vlm_latency.TEXT_TOKENS
            # keys and values, every layer (the sliced LLM's scaled to full depth), fp32
            expected = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * length * row["batch"] * 4
            assert row["kv_cache_bytes"] == expected
            assert row["ttft_s"] > row["encode_s"] > 0 and row["decode_tokens_per_s"] > 0
        vit = next(r for r in llm["results"] if r["arm"] == "vit-64" and r["batch"] == 1)
        assert vit["ttft_ratio"] == 1 and vit["flop_ratio"] == 1


def test_a_sliced_llm_scaled_per_layer_counts_the_flops_of_the_whole_one():
    vit_config, shapes, preset, _ = vlm_latency.quick_shapes()
    arm = vlm_latency.build_towers(vit_config, preset, {"sparseformer": [4], "pooled": []})[1]
    tokenizer = vlm_latency.tokenizer_for_prompts()
    cpu = torch.device("cpu")
    flops = {}
    for layers in (1, None):
        llm, scale = vlm_latency.build_llm(shapes["llama-tiny"], layers, torch.float32, cpu)
        arm.model = vlm_latency.build_vlm(arm.tower, llm, tokenizer).eval()
        flops[layers] = vlm_latency.flops_of(arm, scale, cpu)
    assert flops[1] == pytest.approx(flops[None], rel=1e-9)
    assert flops[None]["prefill"] > flops[None]["decode_step"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_a_gpu_the_suite_refuses_in_one_line():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_suite.py")], capture_output=True, text=True)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "gpu_suite: no CUDA device is available here; `--quick` checks the suite on the CPU"
    ]
