"""Optimizer set-up shared by the teacher and the student trainers."""

from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters: weight decay on matrices only, not on gains, biases, learned
    embeddings (class, position, token, stage) or RoIs. Frozen parameters get no optimizer state at all."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "embedding" in name or "initial_roi" in name
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
