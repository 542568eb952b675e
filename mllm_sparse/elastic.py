"""Elastic token budgets: one SparseFormer serving several latent-token counts.

Only the initial RoIs depend on N in a bootstrapped SparseFormer: the initial token embedding is shared
(`same_token_embedding`), and every unit is per token or attention over tokens. An elastic encoder
(`SparseFormerConfig.budgets`) therefore keeps one learned RoI table per budget and shares everything else;
`model(pixels, num_latent_tokens=N)` picks the budget per call, `from_pretrained(dir, num_latent_tokens=N)` sets the
default at load time.

    elastic = make_elastic(mllm_sparse.create_model("sparseformer_btsp_openai_clip_large", pretrained="official"),
                           budgets=[9, 16, 25, 36, 49, 63])
    elastic(pixels, num_latent_tokens=16).last_hidden_state   # [B, 16 + 1, 1024]
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch

from .modeling import SparseFormerModel, _initial_rois


def make_elastic(model: SparseFormerModel, budgets: Sequence[int], default: int | None = None) -> SparseFormerModel:
    """An elastic copy of `model` that serves `budgets`.

    Every weight is copied with its `requires_grad`; a budget `model` already serves keeps its learned initial RoIs,
    the others start on their own grid (as a fresh encoder of that budget would) and train as its RoIs do.

    Args:
        model: a fixed-budget or elastic SparseFormer with one shared initial token embedding.
        budgets: the latent-token counts to serve.
        default: the default budget; None keeps `model`'s where it is among `budgets`, else the largest.
    Returns:
        The elastic model, on `model`'s device and dtype, in `model`'s train/eval mode.
    """
    if not model.config.same_token_embedding:
        raise ValueError(
            "Only an encoder with one shared initial token embedding can be elastic (same_token_embedding=True, "
            "the bootstrapped layout); this one has one embedding per token"
        )
    served = sorted({int(b) for b in budgets})
    if default is None:
        default = model.config.num_latent_tokens if model.config.num_latent_tokens in served else served[-1]
    config = copy.deepcopy(model.config)
    config.budgets = served
    config.num_latent_tokens = int(default)
    config.validate_fields()
    elastic = SparseFormerModel(config).to(device=model.device, dtype=model.dtype)
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith(("initial_roi.", "initial_rois."))}
    result = elastic.load_state_dict(shared, strict=False)
    assert not result.unexpected_keys and all(k.startswith("initial_rois.") for k in result.missing_keys), result
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    rois_trainable = model.initial_roi_table(model.config.num_latent_tokens).requires_grad
    with torch.no_grad():
        for n in served:
            table = model.initial_roi_table(n) if n in model.budgets else _initial_rois(n)
            elastic.initial_roi_table(n).copy_(table)
    for name, param in elastic.named_parameters():
        param.requires_grad_(trainable.get(name, rois_trainable))
    return elastic.train(model.training)


@contextlib.contextmanager
def default_budget(model: SparseFormerModel, num_latent_tokens: int) -> Iterator[SparseFormerModel]:
    """Within the block, `model`'s default budget is `num_latent_tokens`: calls that name none (evaluations,
    profiling, `num_tokens`) run at it."""
    n = model.config.budget(num_latent_tokens)
    before = model.config.num_latent_tokens
    model.config.num_latent_tokens = n
    try:
        yield model
    finally:
        model.config.num_latent_tokens = before
