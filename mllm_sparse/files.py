"""File I/O shared by every stage: atomic, durable writes and JSON reads whose errors name the file and the line."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_modes(folder: str | Path) -> None:
    """Give every file under `folder` the mode a plain `open(path, "w")` would (readable as the umask allows): some
    writers we call, such as safetensors' `save_file` (and so `save_pretrained`), leave owner-only files."""
    mode = 0o666 & ~_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(FileNotFoundError):  # another process's temporary file, renamed meanwhile
                os.chmod(path, mode)


def fsync_path(path: str | Path) -> None:
    """Flush a file, or a folder's entries (and, recursively, its files), to disk."""
    path = Path(path)
    if path.is_dir():
        for child in path.iterdir():
            if child.is_file() or child.is_dir():
                fsync_path(child)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is flushed to disk and renamed onto `path`, on failure
    removed.

    A reader never sees a half-written file, and an interrupted write (even a power cut) leaves the previous file
    intact. The file gets the permissions a plain `open(path, "w")` would give (mkstemp's are owner-only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it is flushed and takes `path`'s place in one rename.

    For folders written by `save_pretrained`: a reader sees the old folder or the whole new one, never a mix. An
    existing folder at `path` is replaced (it is renamed aside first, so a crash leaves one of the two whole).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    old = path.parent / f".{path.name}.old"
    try:
        yield tmp
        normal_modes(tmp)
        fsync_path(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_path(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data))


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_json(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Missing file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"Malformed JSON in {path}: {err}") from err


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Missing file: {path}")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"Malformed JSON in {path} line {number}: {err}") from err
    return rows


def paths_as_paths(settings: Any) -> None:
    """Make each field of a settings dataclass that is annotated as a path (`Path`, `Path | None`) and holds a string
    a `Path`: typed callers may pass either, and the run records and uses paths."""
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if isinstance(value, str) and "Path" in str(field.type):
            setattr(settings, field.name, Path(value))
