"""Cost of an encoder: parameters, FLOPs counted by torch's FLOP counter, and output tokens."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class ModelProfile:
    """Parameters, GFLOPs for one image (2 FLOPs per multiply-add; matmuls, convs and attention), output tokens."""

    params: int
    gflops: float
    num_tokens: int
    image_size: tuple[int, int]

    def as_dict(self) -> dict:
        return asdict(self)


def _counted(model: Callable[[torch.Tensor], object], example: torch.Tensor) -> tuple[float, object]:
    """(total GFLOPs, output) of one `model(example)` call under torch's FLOP counter."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        output = model(example)
    return counter.get_total_flops() / 1e9, output


def count_gflops(model: Callable[[torch.Tensor], object], example: torch.Tensor) -> float:
    """GFLOPs of `model(example)` per batch element, as counted by `torch.utils.flop_counter`."""
    return _counted(model, example)[0] / example.shape[0]


def profile(model: nn.Module, image_size: int | tuple[int, int] = 224) -> ModelProfile:
    """Profile an encoder on one random image of `image_size` (an int or (H, W)).

    `num_tokens` is the model's `num_tokens` (SparseFormer) or, for other encoders, the length of the
    `last_hidden_state` / token output they return.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    param = next(model.parameters())
    example = torch.randn(1, 3, height, width, device=param.device, dtype=param.dtype)
    gflops, output = _counted(model, example)
    num_tokens = getattr(model, "num_tokens", None)
    if num_tokens is None:
        tokens = getattr(output, "last_hidden_state", output)
        num_tokens = tokens.shape[1] if isinstance(tokens, torch.Tensor) and tokens.ndim == 3 else 0
    return ModelProfile(
        params=sum(p.numel() for p in model.parameters()),
        gflops=gflops,
        num_tokens=int(num_tokens),
        image_size=(height, width),
    )
