"""Training-loop pieces shared by `bootstrap`, `train-teacher` and `pretrain-llm`: the schedule, the data order, and
checkpoints that keep a run's work.

A checkpoint is OUT/checkpoints/step_N/ (N optimizer steps done), written into a temporary folder and renamed in one
step: the weights as safetensors, `trainer_state.pt` (optimizer, scheduler, counters, RNG state; read back with
`torch.load(..., weights_only=True)`) and `run_settings.json`, the run's settings. `RunFolder` keeps the rules:

- a run without `--resume` into a folder that holds checkpoints is refused; nothing is overwritten;
- `--resume` continues from the newest checkpoint whose files are whole and finite; a damaged one (truncated, partial,
  non-finite) is skipped with a message, and the one before it is used;
- a resumed run whose settings that decide the weights differ from the checkpoint's is refused, naming each setting
  (old -> new); the others (evaluation and checkpoint cadence, data-loader workers; the device and CPU threads, which
  change only the floating-point rounding) may change, and are stated;
- a non-finite loss (checked before the backward pass: a NaN sampling grid crashes `grid_sample`'s backward on CPU),
  gradient or weight stops the run with a `DivergenceError` naming the step and the last good checkpoint, and no
  checkpoint is ever written with non-finite weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import CheckpointError, load_safetensors
from .files import atomic_dir, read_json

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
SETTINGS_FILE = "run_settings.json"

logger = logging.getLogger(__name__)


class DivergenceError(ValueError):
    """A training run met a non-finite loss, gradient or weight and stopped before saving it."""


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """`LambdaLR` factor: linear warm-up over `warmup` steps, then a cosine from 1 to 0 at step `total`.

    Not transformers' `get_cosine_schedule_with_warmup`, whose warm-up starts one step later (at 0): the recipes'
    published figures were made with this one, and the shift alone moves them (benchmarks/README.md, 2026-12-03).
    """

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return fn


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of an epoch's data order: a function of (seed, epoch) only, so a resumed run replays it."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def adamw(params: Any, **kwargs: Any) -> torch.optim.AdamW:
    """`torch.optim.AdamW(params, **kwargs)` with its fused kernel, as HF's Trainer uses by default: one pass over
    each weight per step instead of one kernel per operation (the teacher's 3.5 M parameters on 2 CPU cores: 18.5 ->
    2.6 ms an optimizer step, too little of a teacher step to measure)."""
    return torch.optim.AdamW(params, **kwargs, fused=True)


def epoch_order(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of an epoch, a function of (seed, epoch) only, so a resumed run replays it exactly."""
    return torch.randperm(num_items, generator=epoch_generator(seed, epoch))


def checkpoints(out: Path) -> list[Path]:
    """The OUT/checkpoints/step_* folders, oldest first."""
    return sorted(p for p in (out / CHECKPOINTS).glob("step_*") if p.is_dir())


def latest_checkpoint(out: Path) -> Path | None:
    """The newest OUT/checkpoints/step_* folder, or None."""
    found = checkpoints(out)
    return found[-1] if found else None


def load_trainer_state(checkpoint: Path) -> dict:
    """A checkpoint's `trainer_state.pt` (tensors and plain values only); unreadable -> `CheckpointError`."""
    path = checkpoint / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (a partial checkpoint)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"{path}: not a readable trainer state (truncated or corrupt?): {err}") from err


@dataclass(frozen=True)
class Resumed:
    """The checkpoint a run continues from.

    Attributes:
        path: its folder.
        weights: each safetensors file of it (path relative to the folder) -> its tensors, all finite.
        trainer_state: its `trainer_state.pt`.
        recorded: its `run_settings.json` ({"settings": ..., "free": ...}), None in a checkpoint older than that file.
    """

    path: Path
    weights: dict[str, dict[str, Tensor]]
    trainer_state: dict
    recorded: dict | None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class RunFolder:
    """One training run's output folder and its checkpoint rules (see the module docstring).

    Args:
        out: the run's folder (checkpoints go to OUT/checkpoints/step_N).
        command: the command's name, for messages (e.g. "bootstrap").
        settings: argument name -> value (JSON types) for every setting that decides the weights; a resumed run must
            match its checkpoint's.
        free: the same for settings that cannot change the weights; they may change on resume, and are stated.
        weight_files: glob patterns, relative to a checkpoint folder, of the safetensors files a checkpoint must hold
            (each matches at least one file; every file matched is read whole and finite on resume).
    """

    out: Path
    command: str
    settings: dict[str, Any]
    free: dict[str, Any]
    weight_files: Sequence[str]

    @classmethod
    def from_settings(
        cls,
        settings: Any,
        command: str,
        free: Sequence[str],
        weight_files: Sequence[str],
        specs: Sequence[str] = (),
    ) -> RunFolder:
        """The folder `settings.out` with the run's settings: every field but `out` and `resume`; those named in `free`
        may change on resume. A path (a `Path` field, or the local file or folder inside a string field named in
        `specs`, e.g. `open_clip:NAME@PATH`) is recorded absolute and relative to OUT, and matches if either does: a
        run moved or copied together with its inputs still resumes.

        Args:
            settings: the run's settings: a settings dataclass instance (e.g. `bootstrap.train.BootstrapSettings`) or an
                `argparse.Namespace`, whose field names are the command's option names (`lr` is `--lr`).
        """
        values = {}
        for key, value in vars(settings).items():
            if isinstance(value, Path) or (key in specs and isinstance(value, str)):
                value = path_setting(value, settings.out)
            if key not in ("out", "resume"):
                values[key] = value
        return cls(settings.out, command, values, {k: values.pop(k) for k in free}, weight_files)

    def start(self, resume: bool) -> Resumed | None:
        """The checkpoint to continue from (with `resume`), or None for a new run, after the checks: a new run into a
        folder with checkpoints, no usable checkpoint to resume, or a changed setting raise one clear error."""
        self._remove_stale_temporaries()
        found = checkpoints(self.out)
        if not resume:
            if found:
                raise ValueError(
                    f"{self.out} already holds checkpoints of a run (newest {found[-1].name}): pass --resume to "
                    "continue it, or choose another --out (nothing was changed)"
                )
            return None
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.out / CHECKPOINTS}")
        skipped = []
        for path in reversed(found):
            try:
                resumed = self._read(path)
            except CheckpointError as err:
                skipped.append(f"{path.name}: {err}")
                logger.warning("%s: skipping damaged checkpoint %s: %s", self.command, path, err)
                continue
            self._check_settings(resumed)
            return resumed
        raise CheckpointError(f"--resume: no usable checkpoint in {self.out / CHECKPOINTS}: " + "; ".join(skipped))

    def save(
        self, step: int, write_weights: Callable[[Path], None], weights: Mapping[str, Tensor], state: dict
    ) -> Path:
        """Write OUT/checkpoints/step_N atomically, after checking that every weight is finite.

        Args:
            write_weights: writes the weights into the folder it is given (e.g. `model.save_pretrained`).
            weights: the tensors `write_weights` writes, checked finite first (non-finite -> `DivergenceError`).
            state: tensors and plain values (optimizer and scheduler state, counters, RNG state), `trainer_state.pt`.
        """
        self.check_weights(weights, step)
        final = self.out / CHECKPOINTS / f"step_{step:08d}"
        with atomic_dir(final) as tmp:
            write_weights(tmp)
            torch.save(state, tmp / TRAINER_STATE)
            (tmp / SETTINGS_FILE).write_text(json.dumps({"settings": self.settings, "free": self.free}, indent=1))
        return final

    def last_good(self) -> str:
        newest = latest_checkpoint(self.out)
        return f"the last good checkpoint is {newest}" if newest else "no checkpoint was written"

    def diverged(self, what: str) -> DivergenceError:
        """The error for a run that met a non-finite value; `what` says which, in which step, and what was skipped."""
        return DivergenceError(
            f"{self.command}: {what} ({self.last_good()}); with the same settings --resume diverges again: lower --lr "
            "(or lengthen the warm-up) and start again with another --out"
        )

    def check_loss(self, loss: Tensor | float, step: int, agree: Callable[[bool], bool] | None = None) -> float:
        """The loss as a float, or `DivergenceError` if it is not finite; call it before `backward()`.

        Args:
            step: the step being computed, 1-based (the one that would write step_N).
            agree: under data parallelism, maps this rank's "finite" to "finite on every rank", so that every rank
                stops in the same step and none waits for a gradient all-reduce that never comes.
        """
        value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        finite = math.isfinite(value) if agree is None else agree(math.isfinite(value))
        if not finite:
            whose = f"the loss became {value}" if not math.isfinite(value) else "another rank's loss became non-finite"
            raise self.diverged(f"{whose} in step {step}; stopped before its backward pass")
        return value

    def check_grad_norm(self, norm: Tensor | float, step: int) -> None:
        """`DivergenceError` if the gradient norm (e.g. `clip_grad_norm_`'s) is not finite; call it before the
        optimizer step."""
        if not math.isfinite(float(norm)):
            raise self.diverged(f"the gradient norm became {float(norm)} in step {step}; stopped before the update")

    def check_weights(self, weights: Mapping[str, Tensor], step: int) -> None:
        """`DivergenceError` naming the tensors of `weights` (after step `step`) that are not finite."""
        bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            shown = ", ".join(bad[:5]) + (f", ... ({len(bad) - 5} more)" if len(bad) > 5 else "")
            raise self.diverged(f"the weights after step {step} are not finite ({shown}); they were not saved")

    def _read(self, path: Path) -> Resumed:
        weights: dict[str, dict[str, Tensor]] = {}
        for pattern in self.weight_files:
            files = sorted(path.glob(pattern))
            if not files:
                raise CheckpointError(f"{path / pattern} is missing (a partial checkpoint)")
            for file in files:
                weights[str(file.relative_to(path))] = load_safetensors(file)
        state = load_trainer_state(path)
        if not isinstance(state, dict) or not isinstance(state.get("state"), dict) or "step" not in state["state"]:
            raise CheckpointError(f"{path / TRAINER_STATE} holds no training state")
        recorded = None
        if (path / SETTINGS_FILE).is_file():
            try:
                recorded = read_json(path / SETTINGS_FILE)
            except ValueError as err:
                raise CheckpointError(str(err)) from err
        return Resumed(path, weights, state, recorded)

    def _check_settings(self, resumed: Resumed) -> None:
        if resumed.recorded is None:
            logger.warning(
                "%s: %s records no settings (an older checkpoint); resuming without checking them",
                self.command,
                resumed.path,
            )
            return
        saved, path = resumed.recorded, resumed.path
        before, free_before = saved.get("settings", {}), saved.get("free", {})
        # a setting the checkpoint does not record (a flag added since) is not compared
        changed = [f"{_flag(k)} {_shown(before[k])} -> {_shown(v)}" for k, v in _plain(self.settings).items()
                   if k in before and not _same(before[k], v)]  # fmt: skip
        if changed:
            raise ValueError(
                f"--resume: {path} was trained with other settings: {'; '.join(changed)}. Resume with the same "
                "settings, or start a new run with another --out"
            )
        stated = [f"{_flag(k)} {_shown(free_before[k])} -> {_shown(v)}" for k, v in _plain(self.free).items()
                  if k in free_before and not _same(free_before[k], v)]  # fmt: skip
        if stated:
            logger.warning(
                "%s: resuming with changed settings that do not change the weights: %s", self.command, "; ".join(stated)
            )

    def _remove_stale_temporaries(self) -> None:
        # what an interrupted `atomic_dir` leaves (.step_N.XXXX.tmp, .step_N.old); one run writes a folder at a time
        for stale in (self.out / CHECKPOINTS).glob(".step_*"):
            shutil.rmtree(stale, ignore_errors=True)


def path_setting(value: str | Path, out: Path) -> Any:
    """A setting that is or holds a local path (`RunFolder.from_settings`): {"spec", "path", "relative"}, "spec" with
    `{path}` in place of the path; the value itself if it names no existing file or folder."""
    text = str(value)
    for start in [0, *(i + 1 for i, c in enumerate(text) if c in ":@")]:
        if text[start:] and Path(text[start:]).exists():
            path = Path(text[start:]).resolve()
            return {
                "spec": text[:start] + "{path}",
                "path": str(path),
                "relative": os.path.relpath(path, out.resolve()),
            }
    return text if isinstance(value, Path) else value


def _same(before: Any, now: Any) -> bool:
    if isinstance(before, dict) and isinstance(now, dict) and "path" in before and "path" in now:
        return before.get("spec") == now.get("spec") and (
            before["path"] == now["path"] or before.get("relative") == now.get("relative")
        )
    return before == now


def _shown(value: Any) -> str:
    return (
        repr(value.get("spec", "{path}").replace("{path}", value["path"])) if isinstance(value, dict) else repr(value)
    )


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """As the JSON file reads back (tuples become lists)."""
    return json.loads(json.dumps(values))


@contextmanager
def removed_on_early_failure(out: Path, keep: Sequence[str] = ()) -> Iterator[None]:
    """Remove OUT if this run created it and fails before its first checkpoint, so that nothing is left to block or
    confuse a rerun; the files named in `keep` (e.g. a finished teacher cache, which a rerun reuses) stay."""
    existed = out.exists()
    try:
        yield
    except BaseException:
        if not existed and out.is_dir() and not checkpoints(out):
            for child in out.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                elif child.name not in keep:
                    child.unlink()
            if not any(out.iterdir()):
                out.rmdir()
        raise
