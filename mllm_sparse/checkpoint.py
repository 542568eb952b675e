"""Reading weights: official `*_converted.pth` files, safetensors files, `save_pretrained` folders and URLs.

Every load is strict. A mismatch raises `CheckpointMismatchError`, which names the file and lists the missing keys,
the unexpected keys and the shape mismatches. A file that cannot be used (truncated, corrupt, not a state_dict,
holding NaN or inf) raises `CheckpointError` naming the file and what is wrong; `load_checked` gives any HF
`from_pretrained` the same checks.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

M = TypeVar("M", bound=nn.Module)

STATE_DICT_WRAPPERS = ("model", "state_dict")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not match the model it is loaded into."""


class CheckpointError(ValueError):
    """A weights file that cannot be used: truncated, corrupt, not a state_dict of tensors, or non-finite."""


def check_finite(state: dict[str, Tensor], source: str | Path) -> None:
    """Raise `CheckpointError` naming the tensors of `state` that hold a NaN or an infinity."""
    # One isfinite pass per tensor; meta tensors (HF's empty-weight init) hold no values to check.
    bad = [
        k
        for k, v in state.items()
        if v.is_floating_point() and v.device.type != "meta" and not bool(torch.isfinite(v).all())
    ]
    if bad:
        shown = ", ".join(bad[:5]) + (f", ... ({len(bad) - 5} more)" if len(bad) > 5 else "")
        raise CheckpointError(f"{source}: non-finite values (NaN or inf) in {len(bad)} tensor(s): {shown}")


def _unreadable(path: str | Path, err: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}")


def check_safetensors_file(path: str | Path) -> None:
    """Raise `CheckpointError` naming `path` unless its header is whole and covers the file; reads no tensor."""
    try:
        with safe_open(str(path), "pt"):
            pass
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, err) from err


def load_safetensors(path: str | Path, allow_nonfinite: bool = False) -> dict[str, Tensor]:
    """Read a `.safetensors` file; a truncated or corrupt file, or (unless allowed) a non-finite tensor, raises
    `CheckpointError` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, err) from err
    if not allow_nonfinite:
        check_finite(state, path)
    return state


def read_state_dict(source: str | Path) -> dict[str, Tensor]:
    """Read a state_dict from a `.pth`/`.pt`/`.bin` pickle (weights only), a `.safetensors` file, a folder holding
    `model.safetensors`, or an http(s) URL. A `{"model": state_dict}` wrapper is removed.
    """
    source = str(source)
    if source.startswith(("http://", "https://")):
        try:
            state = torch.hub.load_state_dict_from_url(source, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
            # A download cut short stays in torch.hub's cache; the message says so, so the user can delete it.
            raise CheckpointError(
                f"{source}: the downloaded file (in {torch.hub.get_dir()}/checkpoints) is not a weights-only "
                f"PyTorch checkpoint (truncated?): {err}"
            ) from err
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


# Files whose presence in a `save_pretrained` folder means it has weights (sharded folders have an index).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_model_folder(folder: str | Path, what: str = "model", model_types: tuple[str, ...] = ()) -> None:
    """Refuse a local `save_pretrained` folder that cannot load, naming the folder and what it lacks.

    Checks, cheaply (headers only, no tensor read): config.json exists, is JSON and (if `model_types` is given) of one
    of those model types; a weights file exists; every shard an index names exists; every `.safetensors` file in the
    folder is whole (a truncated file raises `CheckpointError` naming it).
    """
    from .files import read_json

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {folder}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a saved {what} folder: it has no config.json")
    config = read_json(config_path)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_types and model_type not in model_types:
        raise CheckpointError(
            f"{folder} is not a saved {what} folder: its config.json has model_type {model_type!r}, "
            f"expected {' or '.join(map(repr, model_types))}"
        )
    present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        raise FileNotFoundError(
            f"{folder} is not a saved {what} folder: it has config.json but no weights file "
            f"({' or '.join(WEIGHT_FILES[::2])})"
        )
    for index in (name for name in present if name.endswith(".index.json")):
        listing = read_json(folder / index)
        weight_map = listing.get("weight_map") if isinstance(listing, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{folder / index}: not a weight index (no 'weight_map' object)")
        missing = sorted({shard for shard in weight_map.values() if not (folder / shard).is_file()})
        if missing:
            raise FileNotFoundError(f"{folder}: weight shard(s) named in {index} are missing: {', '.join(missing)}")
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors_file(path)


def load_checked(
    load: Callable[..., M],
    source: str | Path,
    *args,
    what: str = "model",
    model_types: tuple[str, ...] = (),
    **kwargs,
) -> M:
    """`load(source, *args, **kwargs)`, an HF `from_pretrained`, with a damaged folder or bad weights named.

    A local folder is checked first (`check_model_folder`); the loaded weights are then checked finite, one pass per
    tensor (`check_finite`: NaN or inf refused by tensor name). A hub id is loaded as is, its weights still checked.
    Raises `CheckpointError`, `FileNotFoundError` (both one line through the CLI).
    """
    local = Path(source).is_dir()
    if local:
        check_model_folder(source, what, model_types)
    try:
        model = load(str(source), *args, **kwargs)
    except SafetensorError as err:  # a file the header check did not see (a hub download)
        raise CheckpointError(f"{source}: a weights file of this {what} is not readable: {err}") from err
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as err:
        if not local:
            raise  # a hub id that cannot be fetched: the caller knows what to suggest
        # e.g. a truncated legacy pytorch_model.bin (a RuntimeError from torch's zip reader)
        raise CheckpointError(f"{source}: cannot load this {what}: {err}") from err
    check_finite(model.state_dict(), source)
    return model
