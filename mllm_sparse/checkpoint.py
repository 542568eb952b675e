"""Reading weights: official `*_converted.pth` files, safetensors files, `save_pretrained` folders and URLs.

Every load is strict. A mismatch raises `CheckpointMismatchError`, which names the file and lists the missing keys,
the unexpected keys and the shape mismatches.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

STATE_DICT_WRAPPERS = ("model", "state_dict")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not match the model it is loaded into."""


class CheckpointError(ValueError):
    """A weights file that cannot be used: truncated, corrupt, not a state_dict of tensors, or non-finite."""


def check_finite(state: dict[str, Tensor], source: str | Path) -> None:
    """Raise `CheckpointError` naming the tensors of `state` that hold a NaN or an infinity."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f", ... ({len(bad) - 5} more)" if len(bad) > 5 else "")
        raise CheckpointError(f"{source}: non-finite values (NaN or inf) in {len(bad)} tensor(s): {shown}")


def load_safetensors(path: str | Path, allow_nonfinite: bool = False) -> dict[str, Tensor]:
    """Read a `.safetensors` file; a truncated or corrupt file, or (unless allowed) a non-finite tensor, raises
    `CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from err
    if not allow_nonfinite:
        check_finite(state, path)
    return state


def read_state_dict(source: str | Path) -> dict[str, Tensor]:
    """Read a state_dict from a `.pth`/`.pt`/`.bin` pickle (weights only), a `.safetensors` file, a folder holding
    `model.safetensors`, or an http(s) URL. A `{"model": state_dict}` wrapper is removed.
    """
    source = str(source)
    if source.startswith(("http://", "https://")):
        state = torch.hub.load_state_dict_from_url(source, map_location="cpu", weights_only=True)
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"No checkpoint at {path}")
        if path.suffix == ".safetensors":
            state = load_safetensors(path, allow_nonfinite=True)
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is not a weights file
                raise CheckpointError(f"Cannot read {path} as a weights-only PyTorch checkpoint: {err}") from err
    for key in STATE_DICT_WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{source} does not hold a state_dict of tensors")
    check_finite(state, source)
    return state


def check_state_dict(model: nn.Module, state_dict: dict[str, Tensor], source: str, what: str) -> None:
    """Raise `CheckpointMismatchError` unless `state_dict` has exactly the model's keys and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != expected[k]
    )
    if not (missing or unexpected or shapes):
        return
    lines = [f"Checkpoint {source} does not match {what}:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
            lines.append(f"  {title} ({len(items)}): {shown}")
    roi = state_dict.get("initial_roi.weight")
    if roi is not None and "initial_roi.weight" in expected and tuple(roi.shape) != expected["initial_roi.weight"]:
        cls = int("cls_embedding.weight" in state_dict)
        lines.append(
            f"  hint: the checkpoint has {roi.shape[0]} latent tokens; build the model with "
            f"num_tokens={roi.shape[0] + cls} (CLS included)"
        )
    raise CheckpointMismatchError("\n".join(lines))


def load_pretrained(model: nn.Module, source: str | Path, preset: str | None = None) -> None:
    """Load weights into `model` strictly; see `read_state_dict` for the accepted sources."""
    state_dict = read_state_dict(source)
    check_state_dict(model, state_dict, str(source), f"preset {preset!r}" if preset else type(model).__name__)
    model.load_state_dict(state_dict, strict=True)
