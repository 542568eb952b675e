"""`mllm_sparse.training.RunFolder`: checkpoints on real files, without a model."""

import pytest
import torch
from safetensors.torch import save_file

from mllm_sparse.checkpoint import CheckpointError
from mllm_sparse.training import SETTINGS_FILE, DivergenceError, RunFolder, checkpoints, removed_on_early_failure


def folder(out, **settings):
    return RunFolder(out, "demo", {"lr": 0.1, **settings}, {"workers": 0}, ["w.safetensors"])


def save(run, step, value=1.0):
    weights = {"w": torch.full((2,), value)}
    return run.save(step, lambda tmp: save_file(weights, tmp / "w.safetensors"), weights, {"state": {"step": step}})


def test_a_checkpoint_holds_weights_state_and_settings_and_resumes(tmp_path):
    run = folder(tmp_path)
    assert run.start(resume=False) is None
    path = save(run, 1)
    assert sorted(p.name for p in path.iterdir()) == [SETTINGS_FILE, "trainer_state.pt", "w.safetensors"]
    resumed = folder(tmp_path).start(resume=True)
    assert resumed.path == path and resumed.trainer_state["state"]["step"] == 1
    torch.testing.assert_close(resumed.weights["w.safetensors"]["w"], torch.ones(2))


def test_non_finite_weights_are_not_written(tmp_path):
    run = folder(tmp_path)
    save(run, 1)
    with pytest.raises(DivergenceError, match=r"weights after step 2 are not finite \(w\); they were not saved"):
        save(run, 2, float("nan"))
    assert [p.name for p in checkpoints(tmp_path)] == ["step_00000001"]


def test_leftovers_of_an_interrupted_save_are_removed_and_never_resumed(tmp_path):
    run = folder(tmp_path)
    save(run, 1)
    stale = tmp_path / "checkpoints" / ".step_00000002.abc.tmp"
    stale.mkdir()
    (stale / "w.safetensors").write_bytes(b"half")
    assert folder(tmp_path).start(resume=True).path.name == "step_00000001"
    assert not stale.exists()


def test_a_malformed_settings_file_makes_a_checkpoint_damaged(tmp_path, caplog):
    run = folder(tmp_path)
    save(run, 1)
    (save(run, 2).joinpath(SETTINGS_FILE)).write_text("{")
    assert folder(tmp_path).start(resume=True).path.name == "step_00000001"
    assert "skipping damaged checkpoint" in caplog.text


def test_an_older_checkpoint_without_settings_resumes_with_a_message(tmp_path, caplog):
    run = folder(tmp_path)
    (save(run, 1) / SETTINGS_FILE).unlink()
    assert folder(tmp_path, lr=0.5).start(resume=True) is not None
    assert "records no settings" in caplog.text


def test_a_setting_added_since_the_checkpoint_is_not_compared(tmp_path):
    save(folder(tmp_path), 1)
    assert folder(tmp_path, new_flag=3).start(resume=True) is not None
    with pytest.raises(ValueError, match=r"--lr 0\.1 -> 0\.5"):
        folder(tmp_path, lr=0.5).start(resume=True)


def test_no_usable_checkpoint_is_one_error_naming_each(tmp_path):
    run = folder(tmp_path)
    for step in (1, 2):
        (save(run, step) / "w.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*step_00000002: .*; step_00000001: "):
        folder(tmp_path).start(resume=True)


def test_an_early_failure_removes_the_folder_it_created_but_keeps_a_finished_cache(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError), removed_on_early_failure(out, keep=["cache"]):
        (out / "sub").mkdir(parents=True)
        (out / "cache").write_text("kept")
        (out / "junk").write_text("x")
        raise RuntimeError
    assert sorted(p.name for p in out.iterdir()) == ["cache"]
    with pytest.raises(RuntimeError), removed_on_early_failure(tmp_path / "other"):
        (tmp_path / "other").mkdir()
        raise RuntimeError
    assert not (tmp_path / "other").exists()
    existing = tmp_path / "existing"  # a folder the run did not create is left alone
    existing.mkdir()
    (existing / "mine").write_text("x")
    with pytest.raises(RuntimeError), removed_on_early_failure(existing):
        raise RuntimeError
    assert (existing / "mine").exists()


def test_a_run_moved_with_its_inputs_resumes_and_other_inputs_are_refused(tmp_path):
    import argparse
    import shutil

    (tmp_path / "a" / "data").mkdir(parents=True)
    (tmp_path / "a" / "teacher.bin").write_text("t")
    (tmp_path / "elsewhere").mkdir()

    def run_of(root, data, teacher):
        args = argparse.Namespace(out=root / "run", data=data, teacher=f"kind:name@{teacher}", resume=True)
        return RunFolder.from_settings(args, "demo", [], ["w.safetensors"], specs=["teacher"])

    a = tmp_path / "a"
    run = run_of(a, a / "data", a / "teacher.bin")
    assert run.settings["teacher"]["spec"] == "kind:name@{path}"
    save(run, 1)
    shutil.copytree(a, tmp_path / "b")
    b = tmp_path / "b"
    assert run_of(b, b / "data", b / "teacher.bin").start(resume=True) is not None  # moved together
    assert run_of(b, a / "data", a / "teacher.bin").start(resume=True) is not None  # the same absolute inputs
    with pytest.raises(ValueError, match=rf"--data '{a / 'data'}' -> '{tmp_path / 'elsewhere'}'"):
        run_of(a, tmp_path / "elsewhere", a / "teacher.bin").start(resume=True)


def test_a_settings_dataclass_records_what_its_namespace_records(tmp_path):
    """Commands hand their library a settings dataclass; the run records the same settings as from the parsed
    arguments, paths included."""
    import argparse
    from dataclasses import dataclass
    from pathlib import Path

    @dataclass
    class Settings:
        out: Path
        data: Path
        lr: float = 0.1
        workers: int = 0
        resume: bool = False

    (tmp_path / "data").mkdir()
    settings = Settings(tmp_path / "run", tmp_path / "data")
    a = RunFolder.from_settings(settings, "demo", ["workers"], ["w.safetensors"])
    b = RunFolder.from_settings(argparse.Namespace(**vars(settings)), "demo", ["workers"], ["w.safetensors"])
    assert (a.settings, a.free, a.out) == (b.settings, b.free, b.out)
    assert (
        set(a.settings) == {"data", "lr"} and a.settings["data"]["relative"] == "../data" and a.free == {"workers": 0}
    )
