import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mllm_sparse.files import _umask, atomic_dir, atomic_path, normal_modes, write_json


def test_atomic_files_get_normal_permissions(tmp_path):
    """Also what a library writes owner-only in an atomic folder (safetensors' `save_file`, so `save_pretrained`)."""
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "f.txt").write_text("x")
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
            (tmp / "sub").mkdir()
            save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "deep.safetensors"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755
    for name in ("f.txt", "model.safetensors", "sub/deep.safetensors"):
        assert stat.S_IMODE((tmp_path / "folder" / name).stat().st_mode) == 0o644, name


def test_failed_writes_leave_the_old_file_and_folder(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "f.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "f.txt").write_text("new")
            raise RuntimeError
    assert (tmp_path / "a.json").read_text() == '{"x": 1}'
    assert (tmp_path / "folder" / "f.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "folder"]
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "g.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["g.txt"]


def test_normal_modes_passes_over_a_file_renamed_away_while_it_walks(tmp_path, monkeypatch):
    """Two ranks completing one checkpoint: a rank saw the other's temporary marker, which was renamed before chmod."""
    kept = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, str(kept))
    os.chmod(kept, 0o600)
    vanished = tmp_path / ".checkpoint_complete.json.abc.tmp"
    walk, is_file = Path.rglob, Path.is_file
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: [*walk(self, pattern), vanished])
    monkeypatch.setattr(Path, "is_file", lambda self: self == vanished or is_file(self))
    normal_modes(tmp_path)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o666 & ~_umask()
