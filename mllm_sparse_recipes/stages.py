"""Running a multi-stage recipe so that it can be stopped and rerun: `mllm-sparse quickstart` and `mllm-sparse
ablate` are sequences of stages, each a library call writing one folder; `guard_settings` keeps a run folder from
being continued with settings that would change what its finished stages made.

A stage counts as done only once its command has returned: `Stages.run` then writes `OUT/.done/NAME` (holding the
seconds it took), so a stage interrupted halfway, whose folder may hold a config without weights, is never taken for
finished. Rerunning the recipe skips the done stages, clears the folder of an unfinished one and runs it again, or,
for a stage that checkpoints (`resumable`), lets it continue from its last checkpoint, unless a stage it reads
(`inputs`) was redone in this run.
"""

from __future__ import annotations

import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mllm_sparse.files import read_json, write_json

DONE_DIR = ".done"


class Stages:
    """The stages of one recipe run whose bookkeeping lives in `out` (`out/.done/NAME`).

    Args:
        out: the run's folder.
        label: how progress lines name the recipe (e.g. "quickstart").
    """

    def __init__(self, out: Path, label: str):
        self.out = out
        self.label = label
        self.ran: set[str] = set()  # the stages run (not skipped as done) in this process

    def marker(self, name: str) -> Path:
        return self.out / DONE_DIR / name

    def is_done(self, name: str) -> bool:
        return self.marker(name).is_file()

    def seconds(self) -> dict[str, float]:
        """{stage: seconds it took} of the done stages, in the order they finished."""
        markers = sorted((self.out / DONE_DIR).glob("*"), key=lambda p: p.stat().st_mtime_ns)
        return {p.name: read_json(p)["seconds"] for p in markers if p.is_file()}

    def run(
        self,
        name: str,
        folder: Path,
        command: Callable[[], Any],
        resumable: bool = False,
        inputs: tuple[str, ...] = (),
    ) -> bool:
        """Run stage `name`, which writes `folder`, unless it is done; True if it ran.

        A non-resumable stage's folder left by an interrupted run is cleared first; a resumable one is kept, for the
        command to continue from its checkpoints, unless one of the stages it reads (`inputs`) ran again in this
        process: its checkpoints were trained from something else. A failure is reported with the stage and its
        folder, then raised.
        """
        if self.is_done(name):
            print(f"[{self.label}] {name}: done earlier ({folder})", flush=True)
            return False
        stale = any(stage in self.ran for stage in inputs)
        if (not resumable or stale) and folder.exists():
            shutil.rmtree(folder)
        print(f"[{self.label}] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            command()
        except BaseException:
            # the whole traceback: the command line only prints a one-line message for errors of bad input
            traceback.print_exc()
            print(
                f"[{self.label}] stage {name} stopped ({folder}); once fixed, the same command continues from here",
                file=sys.stderr,
                flush=True,
            )
            raise
        seconds = round(time.perf_counter() - start, 1)
        self.ran.add(name)
        write_json(self.marker(name), {"seconds": seconds})
        print(f"[{self.label}] {name}: {seconds:.0f} s", flush=True)
        return True


def changes(before: dict[str, Any], wanted: dict[str, Any], reason: Callable[[str], str] = lambda key: "") -> str:
    """The keys of `wanted` whose value differs from `before`'s, as "key old -> new (reason); ..." ("" where none
    does)."""
    listed = []
    for key, value in wanted.items():
        if before.get(key) != value:
            why = reason(key)
            listed.append(f"{key} {before.get(key)!r} -> {value!r}" + (f" ({why})" if why else ""))
    return "; ".join(listed)


def guard_settings(
    path: Path,
    settings: dict[str, Any],
    label: str,
    blocked: Callable[[str], str | None] = lambda key: "",
    stage_folders: Iterable[Path] = (),
) -> dict[str, Any] | None:
    """The one guard of a recipe's run folder: the settings a run was made with (`path`, JSON) against those of the
    command that continues it. A change for which `blocked(key)` gives a reason (a string; None: the change is
    allowed, e.g. it decides only stages not run yet) is refused in one line naming each such setting, old -> new.
    A folder with no recorded settings is refused if it holds any of `stage_folders` (made by something else).
    Nothing is written; returns the recorded settings (None for a new run).
    """
    out = path.parent
    if not path.is_file():
        foreign = [folder.name for folder in stage_folders if folder.exists()]
        if foreign:
            raise ValueError(
                f"{out} already holds {', '.join(foreign)} but no {path.name}: not a {label} folder, or one made by "
                "another version. Use a new --out."
            )
        return None
    before = read_json(path)
    refused = {key: value for key, value in settings.items() if before.get(key) != value and blocked(key) is not None}
    if listed := changes(before, refused, lambda key: blocked(key) or ""):
        raise ValueError(
            f"{out} was made with other settings ({label}): {listed}. Use another --out, or the same settings to "
            "continue it."
        )
    return before
