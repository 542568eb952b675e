"""Token budgets of a LLaVA model: one model whose elastic tower serves several image-token counts.

A LLaVA model around an elastic SparseFormer (`mllm_sparse.elastic`) serves every budget of its encoder from one set
of weights: the tower yields N tokens, the processor inserts N placeholders, the projector and the LLM read any N.
A budget is chosen per call, for the processor and the model together:

    with vlm_budget(model, 16):                    # the tower runs at 16 tokens inside the block
        inputs = processor(images=image, text=prompt, num_latent_tokens=16, return_tensors="pt")
        model.generate(**inputs)

Outside the block the model runs at its default budget (the tower config's `num_latent_tokens`). The budget is set on
the tower rather than passed to `generate`, because transformers' LLaVA hands extra keywords to the LLM as well as
the tower. Training draws the budgets of each batch (`batch_budgets`: one, or several whose losses are averaged) and
re-expands each record's placeholders to them (`expand_placeholders`), so the projector and the LLM see every budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from transformers import LlavaForConditionalGeneration

from mllm_sparse.elastic import default_budget

from .towers import layer_tokens, num_image_tokens


def llava_model(model: nn.Module) -> LlavaForConditionalGeneration:
    """The `LlavaForConditionalGeneration` inside DeepSpeed / DDP (`.module`), peft and `torch.compile` wrappers."""
    while not isinstance(model, LlavaForConditionalGeneration):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            raise TypeError(f"{type(model).__name__} holds no LlavaForConditionalGeneration")
    return model


def served_budgets(model: nn.Module) -> list[int]:
    """The latent-token budgets the model's tower serves at the layer the LLM reads, ascending."""
    llava = llava_model(model)
    return list(layer_tokens(llava.model.vision_tower.config, llava.config.vision_feature_layer).budgets)


def default_latent_budget(model: nn.Module) -> int:
    """The budget the model runs at outside `vlm_budget`: the tower config's `num_latent_tokens`."""
    llava = llava_model(model)
    return layer_tokens(llava.model.vision_tower.config, llava.config.vision_feature_layer).num_latent_tokens


def image_tokens_at(model: nn.Module, num_latent_tokens: int | None = None) -> int:
    """Placeholders per image at budget `num_latent_tokens` (None: the default); an unserved budget raises
    `ValueError` naming the served ones."""
    llava = llava_model(model)
    config = llava.config
    return num_image_tokens(
        llava.model.vision_tower.config,
        config.vision_feature_layer,
        config.vision_feature_select_strategy,
        num_latent_tokens,
    )


@contextlib.contextmanager
def vlm_budget(model: nn.Module, num_latent_tokens: int | None) -> Iterator[nn.Module]:
    """Within the block the model runs at budget `num_latent_tokens`: its tower yields that many latent tokens and
    `config.image_seq_length` counts the placeholders they fill. None, or a fixed tower's own count: no change.

    Raises `ValueError` naming the served budgets for any other count.
    """
    if num_latent_tokens is None:
        yield model
        return
    llava = llava_model(model)
    n = int(num_latent_tokens)
    config = llava.config
    placeholders = image_tokens_at(llava, n)  # refuses an unserved n, naming the served ones
    before = config.image_seq_length
    elastic = len(served_budgets(llava)) > 1
    with default_budget(llava.model.vision_tower, n) if elastic else contextlib.nullcontext():
        config.image_seq_length = placeholders
        try:
            yield model
        finally:
            config.image_seq_length = before


def batch_budgets(budgets: Sequence[int], seed: int, record_ids: Sequence[str], per_step: int = 1) -> list[int]:
    """The budgets a training batch runs at, by the seed and the batch's record ids.

    One per step: drawn uniformly from `budgets`. More: the smallest always (the budget whose few tokens are hardest
    to read) and `per_step - 1` drawn from the others without repeats; every budget per step is M3's recipe. A
    function of the batch alone, so a resumed run, every data-loader worker and a re-run draw the same budgets for the
    same batch (a stateful generator would not survive a resume that skips batches).

    Returns the budgets, the one to run first (the smallest, for more than one) first.
    """
    ordered = sorted(budgets)
    if not 1 <= per_step <= len(ordered):
        raise ValueError(f"{per_step} budgets per step: choose 1 to {len(ordered)} (the budgets {ordered})")
    key = f"{seed}\x00" + "\x00".join(str(i) for i in record_ids)
    digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    if per_step == 1:
        return [ordered[digest % len(ordered)]]
    return [ordered[0], *sorted(random.Random(digest).sample(ordered[1:], per_step - 1))]


def expand_placeholders(
    input_ids: Tensor, labels: Tensor, image_token_id: int, per_image: int, new_per_image: int
) -> tuple[Tensor, Tensor]:
    """[L] ids and labels with every image's `per_image` placeholders replaced by `new_per_image` ones.

    Placeholder runs are cut into images of `per_image` tokens (adjacent images included); their labels are ignored
    positions, which stay ignored.
    """
    is_image = input_ids == image_token_id
    count = int(is_image.sum())
    if count % per_image:
        raise ValueError(f"{count} image placeholders are not a whole number of images of {per_image}")
    first_of_image = is_image & ((is_image.cumsum(0) - 1) % per_image == 0)
    repeats = torch.where(is_image, 0, 1)
    repeats[first_of_image] = new_per_image
    return input_ids.repeat_interleave(repeats), labels.repeat_interleave(repeats)


def drawn_budgets(model: nn.Module, budgets: Sequence[int] | None) -> dict[int, int] | None:
    """{budget: placeholders per image} for the budgets training draws from (each one the tower serves); None when
    no budgets are asked for."""
    if not budgets:
        return None
    return {int(n): image_tokens_at(model, n) for n in sorted(set(budgets))}
