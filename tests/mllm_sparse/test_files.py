import os
import stat

import pytest

from mllm_sparse.files import atomic_dir, atomic_path, write_json


def test_atomic_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "f.txt").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755


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
