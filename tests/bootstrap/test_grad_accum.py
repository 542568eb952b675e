"""Gradient accumulation in `mllm-sparse bootstrap`: k micro-batches per step train exactly as one batch does."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import bootstrap.train as train_module
from bootstrap.train import BootstrapSettings


def _run(setup, out, grad_accum: int) -> dict:
    root, spec = setup
    settings = BootstrapSettings(
        teacher=spec,
        num_latent_tokens=4,
        data=root / "world",
        out=out,
        steps=3,
        batch_size=4,
        grad_accum=grad_accum,
        lr=3e-3,
        image_size=64,
        token_loss_weight=0.5,
        region_distill_weight=0.5,
        token_loss_layer=-1,
        region_boxes=4,
        device="cpu",
    )
    return train_module.run(settings)


def test_accumulating_micro_batches_matches_one_batch(setup, tmp_path, monkeypatch, one_thread):
    """2 micro-batches of 2 images and 4 of 1 against batches of 4: the same loss curve and the same weights after
    3 steps."""
    # the final evaluation is not what is compared; skipping it keeps each run near a second
    summary = {"student_gflops": 0.0, "student_tokens": 0, "teacher_gflops": 0.0, "teacher_tokens": 0}
    monkeypatch.setattr(train_module, "evaluate_encoder", lambda *args, **kwargs: summary)
    runs = {k: _run(setup, tmp_path / f"accum{k}", k) for k in (1, 2, 4)}
    weights = {k: load_file(tmp_path / f"accum{k}" / "model.safetensors") for k in runs}
    assert len(runs[1]["loss_curve"]) == 3
    for k in (2, 4):
        assert runs[k]["loss_curve"] == pytest.approx(runs[1]["loss_curve"], abs=1e-5)
        # AdamW turns float-noise gradients of parameters the loss barely sees into steps of up to lr (3e-3)
        for key, value in weights[1].items():
            torch.testing.assert_close(weights[k][key], value, atol=3e-4, rtol=1e-4, msg=f"grad_accum {k}: {key}")
