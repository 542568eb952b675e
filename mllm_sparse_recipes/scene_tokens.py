"""Scene tokens: a synthetic-world scene as one feature vector per object, the ground truth an image shows.

Scene pretraining (`pretrain_llm.py`) feeds these to a tiny LLM in place of an image's visual tokens. Each object
becomes one row: one-hot shape, colour and size class, which half of the image it is in (left / top), its centre and
its radius. The rows are shuffled (the order carries no information, as a vision tower's token order says nothing of
which object is the principal one) and padded with empty rows (a flag of their own) to a fixed count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mllm_sparse.synth.world import COLOR_NAMES, SHAPES, SIZES

_SHAPE, _COLOR, _SIZE = 0, len(SHAPES), len(SHAPES) + len(COLOR_NAMES)
_LEFT = _SIZE + len(SIZES)
_TOP, _CX, _CY, _RADIUS, _EMPTY = _LEFT + 1, _LEFT + 2, _LEFT + 3, _LEFT + 4, _LEFT + 5
SCENE_FEATURES = _EMPTY + 1
# Radii are fractions of the image side (at most ~0.2); scaled to about the range of the other features.
_RADIUS_SCALE = 4.0


def object_features(objects: Sequence[Mapping], name: str = "scene") -> Tensor:
    """[len(objects), SCENE_FEATURES] float32: the rows of a scene's objects, in their order.

    Args:
        objects: `scenes.jsonl` objects, each with shape, color, size, cx, cy and radius.
        name: what the objects belong to (an image path), for error messages.
    """
    rows = torch.zeros(len(objects), SCENE_FEATURES)
    for i, obj in enumerate(objects):
        try:
            shape, color, size = SHAPES.index(obj["shape"]), COLOR_NAMES.index(obj["color"]), SIZES.index(obj["size"])
            cx, cy, radius = float(obj["cx"]), float(obj["cy"]), float(obj["radius"])
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{name}: object {i} is not a synthetic-world object ({obj!r}): {err!r}") from err
        rows[i, _SHAPE + shape] = rows[i, _COLOR + color] = rows[i, _SIZE + size] = 1.0
        rows[i, _LEFT], rows[i, _TOP] = float(cx < 0.5), float(cy < 0.5)
        rows[i, _CX], rows[i, _CY], rows[i, _RADIUS] = cx, cy, radius * _RADIUS_SCALE
    return rows


def scene_tokens(
    objects: Sequence[Mapping], num_tokens: int, generator: torch.Generator, name: str = "scene"
) -> Tensor:
    """[num_tokens, SCENE_FEATURES] float32: the objects' rows plus empty rows, in an order drawn from `generator`.

    Raises:
        ValueError: the scene has more objects than `num_tokens`.
    """
    if len(objects) > num_tokens:
        raise ValueError(f"{name} has {len(objects)} objects, more than the {num_tokens} scene tokens")
    rows = torch.zeros(num_tokens, SCENE_FEATURES)
    rows[: len(objects)] = object_features(objects, name)
    rows[len(objects) :, _EMPTY] = 1.0
    return rows[torch.randperm(num_tokens, generator=generator)]
