"""`mllm-sparse bootstrap` keeps the user's work: divergence stops cleanly, resume is exact after a real kill -9 and
refuses changed settings, a damaged newest checkpoint falls back, a stale teacher cache is rebuilt, absurd numbers get
one line."""

import logging
import os
import shutil
import signal
import socket
import sys

import cli_process
import open_clip
import pytest
import torch
from bootstrap_world import bootstrap_args
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

import bootstrap.train as train_module
from bootstrap.data import TwoViewImages, list_images
from bootstrap.targets import CACHE_NAME, TeacherTargets
from bootstrap.teachers import load_teacher
from mllm_sparse.checkpoint import load_safetensors
from mllm_sparse.training import DivergenceError
from mllm_sparse_recipes.cli import main as cli_main
from mllm_sparse_recipes.commands.bootstrap import main as bootstrap_main


def steps_in(out):
    return sorted(p.name for p in (out / "checkpoints").glob("step_*"))


def assert_same_weights(a, b):
    """Bit-identical: the same ops on the same data in the same order, one thread, give the same floats."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def test_a_diverging_run_stops_with_one_line_and_its_resume_does_not_crash(setup, tmp_path):
    """--lr 3 turns the loss NaN in step 3 on this world; grid_sample's backward on a NaN grid is a segfault on CPU,
    so the run is a subprocess: a crash fails the test instead of pytest."""
    out = tmp_path / "div"
    args = bootstrap_args(setup, out, "--steps", "8", "--save-every", "1", "--lr", "3")
    first = cli_process.run("bootstrap", *args)
    assert first.returncode == 2, first.stderr[-2000:]
    assert "Traceback" not in first.stderr
    (line,) = error_lines(first.stderr)
    assert "the loss became nan in step 3; stopped before its backward pass" in line
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step_00000002'}" in line
    assert steps_in(out) == ["step_00000001", "step_00000002"] and not (out / "model.safetensors").exists()
    for name in steps_in(out):  # every checkpoint written is finite (load_safetensors refuses NaN)
        load_safetensors(out / "checkpoints" / name / "model.safetensors")
    again = cli_process.run("bootstrap", *args, "--resume")
    assert again.returncode == 2, again.stderr[-2000:]
    assert "the loss became nan in step 3" in error_lines(again.stderr)[0]


@pytest.fixture
def one_thread():
    """In-process runs on one thread, as the subprocesses (`cli_process.cli_env`): the same floating-point sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_kill_9_then_resume_matches_an_uninterrupted_run(setup, tmp_path, one_thread):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    extra = ("--steps", "12", "--save-every", "1", "--cache-teacher")
    victim = cli_process.start("bootstrap", *bootstrap_args(setup, killed, *extra), log=tmp_path / "kill.log")
    code = cli_process.kill_when(victim, killed / "checkpoints" / "step_00000002")
    assert code == -signal.SIGKILL, (tmp_path / "kill.log").read_text()[-2000:]
    assert not (killed / "model.safetensors").exists() and "step_00000012" not in steps_in(killed)
    assert cli_main(["bootstrap", *bootstrap_args(setup, straight, *extra)]) == 0  # the same command, uninterrupted
    resumed = cli_process.run("bootstrap", *bootstrap_args(setup, killed, *extra, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr  # logged
    assert_same_weights(straight, killed)


def test_resume_refuses_changed_settings_and_a_rerun_refuses_to_overwrite(setup, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    assert cli_main(["bootstrap", *bootstrap_args(setup, out, "--steps", "2", "--save-every", "1")]) == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()
    changed = bootstrap_args(setup, out, "--steps", "2", "--resume", "--lr", "0.5", "--seed", "3")
    assert cli_main(["bootstrap", *changed]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "was trained with other settings: --lr 0.003 -> 0.5; --seed 0 -> 3" in line
    assert cli_main(["bootstrap", *bootstrap_args(setup, out, "--steps", "2")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "already holds checkpoints of a run (newest step_00000002): pass --resume" in line
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before  # nothing overwritten
    # settings that cannot change the weights may change, and are stated
    free = bootstrap_args(setup, out, "--steps", "2", "--resume", "--eval-every", "1", "--save-every", "2")
    assert cli_main(["bootstrap", *free]) == 0
    assert "changed settings that do not change the weights: --eval-every 0 -> 1; --save-every 1 -> 2" in caplog.text


def damage(path, how):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "non-finite":
        state = load_file(path)
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key] = torch.full_like(state[key], float("nan"))
        save_file(state, path)
    else:  # partial: a folder whose trainer state never arrived
        (path.parent / "trainer_state.pt").unlink()


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_good_one(setup, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="bootstrap")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ("--steps", "3", "--save-every", "1")
    assert cli_main(["bootstrap", *bootstrap_args(setup, straight, *args)]) == 0
    shutil.copytree(straight, resumed)
    # the damaged one is the last: code that resumed from a NaN one would take no backward pass (a segfault in pytest)
    for how in ("truncated", "non-finite", "partial"):
        damage(resumed / "checkpoints" / "step_00000003" / "model.safetensors", how)
        (resumed / "model.safetensors").unlink()
        capsys.readouterr()
        caplog.clear()
        assert cli_main(["bootstrap", *bootstrap_args(setup, resumed, *args, "--resume")]) == 0, how
        assert "skipping damaged checkpoint" in caplog.text and "step_00000003" in caplog.text, how
        assert f"resumed from {resumed / 'checkpoints' / 'step_00000002'} at step 2" in caplog.text, how
        assert_same_weights(straight, resumed)


def test_a_resume_with_every_checkpoint_damaged_says_so_in_one_line(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["bootstrap", *bootstrap_args(setup, out, "--steps", "1")]) == 0
    damage(out / "checkpoints" / "step_00000001" / "model.safetensors", "truncated")
    assert cli_main(["bootstrap", *bootstrap_args(setup, out, "--steps", "1", "--resume")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert "error: --resume: no usable checkpoint in" in line and "step_00000001" in line and "truncated" in line


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--image-size", "-5", "--image-size must be >= 1, got -5"),
        ("--num-sampling-points", "0", "--num-sampling-points must be >= 1, got 0"),
        ("--steps", "0", "--steps must be >= 1, got 0"),
        ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
        ("--grad-accum", "0", "--grad-accum must be >= 1, got 0"),
        ("--epochs", "-1", "--epochs must be a finite number > 0, got -1.0"),
        ("--lr", "nan", "--lr must be a finite number > 0, got nan"),
        ("--clip-grad", "0", "--clip-grad must be a finite number > 0, got 0.0"),
        ("--region-boxes", "0", "--region-boxes must be >= 1, got 0"),
        ("--val-fraction", "1", "--val-fraction must be in [0, 1), got 1.0"),
        ("--save-every", "-1", "--save-every must be >= 0, got -1"),
    ],
)
def test_absurd_numbers_get_one_line(setup, tmp_path, capsys, flag, value, message):
    args = bootstrap_args(setup, tmp_path / "x", "--steps", "1")
    if flag in ("--steps", "--epochs"):
        args = bootstrap_args(setup, tmp_path / "x")
    assert cli_main(["bootstrap", *args, flag, value]) == 2
    assert capsys.readouterr().err.strip() == f"mllm-sparse bootstrap: error: {message}"
    assert not (tmp_path / "x").exists()


def test_non_finite_gradients_stop_the_run_before_the_update(setup, tmp_path, monkeypatch):
    real, calls = train_module.alignment_loss, []

    def poisoned(model, *args, **kwargs):
        loss = real(model, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # step 2: the loss is finite, one gradient is NaN
            weight = next(p for p in model.parameters() if p.requires_grad)
            loss = loss + (weight * torch.tensor(float("nan"))).sum().where(torch.tensor(False), torch.tensor(0.0))
        return loss

    monkeypatch.setattr(train_module, "alignment_loss", poisoned)
    out = tmp_path / "run"
    # 2 steps: code without the check would take no backward pass through the NaN weights (a segfault in pytest)
    with pytest.raises(DivergenceError) as err:
        bootstrap_main(bootstrap_args(setup, out, "--steps", "2", "--save-every", "1"))
    assert "the gradient norm became nan in step 2; stopped before the update" in str(err.value)
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step_00000001'}" in str(err.value)
    assert steps_in(out) == ["step_00000001"]
    load_safetensors(out / "checkpoints" / "step_00000001" / "model.safetensors")


def test_non_finite_weights_are_never_saved(setup, tmp_path, monkeypatch):
    real_step, calls = torch.optim.AdamW.step, []

    def overflowing_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # as an update that overflows float32 would leave it
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    out = tmp_path / "run"
    with pytest.raises(DivergenceError, match=r"the weights after step 2 are not finite \(.+\); they were not saved"):
        bootstrap_main(bootstrap_args(setup, out, "--steps", "2", "--save-every", "1"))  # 2: as above
    assert steps_in(out) == ["step_00000001"] and not (out / "model.safetensors").exists()


def test_a_first_step_failure_leaves_nothing_that_blocks_a_rerun(setup, tmp_path, caplog):
    out = tmp_path / "run"
    bad = bootstrap_args(setup, out, "--steps", "1", "--token-loss-weight", "1", "--token-loss-layer", "0")
    with pytest.raises(ValueError, match="token loss: student unit 0 width"):
        bootstrap_main(bad)
    assert not out.exists()
    with pytest.raises(ValueError, match="token loss: student unit 0 width"):
        bootstrap_main([*bad, "--cache-teacher"])
    assert sorted(p.name for p in out.iterdir()) == [CACHE_NAME]  # the finished cache stays, to be reused
    caplog.set_level(logging.INFO, logger="bootstrap")
    assert bootstrap_main(bootstrap_args(setup, out, "--steps", "1", "--token-loss-weight", "1",
                                         "--cache-teacher")) == 0  # fmt: skip
    assert "reused" in caplog.text


def test_torchrun_ranks_agree_to_stop_when_one_rank_sees_a_nan_loss(setup, tmp_path):
    """Rank 1 alone gets a NaN loss in step 2; both ranks stop with the error, none waits for the other."""
    script = tmp_path / "poisoned_rank.py"
    script.write_text(
        "import os, sys, torch\n"
        "import bootstrap.train as t\n"
        "real, calls = t.alignment_loss, []\n"
        "def loss(*a, **k):\n"
        "    calls.append(1)\n"
        "    value = real(*a, **k)\n"
        "    return value * float('nan') if os.environ['RANK'] == '1' and len(calls) == 2 else value\n"
        "t.alignment_loss = loss\n"
        "from mllm_sparse_recipes.cli import main\n"
        "sys.exit(main(['bootstrap', *sys.argv[1:]]))\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    out = tmp_path / "two"
    args = bootstrap_args(setup, out, "--steps", "3", "--save-every", "1")
    import subprocess

    run = subprocess.run(
        [*launch, str(script), *args], env=cli_process.cli_env(), capture_output=True, text=True, timeout=240
    )
    assert run.returncode != 0
    lines = error_lines(run.stdout + run.stderr)
    assert sum("the loss became nan in step 2" in line for line in lines) == 1, run.stderr[-3000:]
    assert sum("another rank's loss became non-finite in step 2" in line for line in lines) == 1, run.stderr[-3000:]
    assert steps_in(out) == ["step_00000001"]


# The teacher cache.


@pytest.fixture(scope="module")
def other_teacher(setup, tmp_path_factory):
    """A second teacher of the same architecture, other weights."""
    path = tmp_path_factory.mktemp("other") / "teacher.safetensors"
    torch.manual_seed(1)
    save_file(open_clip.create_model("synth-vit-test-16").state_dict(), path)
    return f"open_clip:synth-vit-test-16@{path}"


def teacher_embeddings(spec, paths):
    teacher = load_teacher(spec)
    data = TwoViewImages(paths, 64, teacher.arch.image_size, teacher.arch.mean, teacher.arch.std)
    with torch.no_grad():
        return teacher.encode_image(torch.stack([data[i][2] for i in range(len(data))])).float()


def test_a_cache_of_another_teacher_is_rebuilt_not_reused(setup, other_teacher, tmp_path, caplog):
    root, spec = setup
    first, second = tmp_path / "first", tmp_path / "second"
    assert bootstrap_main(bootstrap_args(setup, first, "--steps", "1", "--cache-teacher")) == 0
    second.mkdir()
    shutil.copy(first / CACHE_NAME, second / CACHE_NAME)
    caplog.clear()
    args = bootstrap_args((root, other_teacher), second, "--steps", "1", "--cache-teacher")
    assert bootstrap_main(args) == 0
    err = caplog.text
    assert f"computed from other inputs: teacher {spec!r} -> {other_teacher!r}; rebuilding it" in err
    cached = load_file(second / CACHE_NAME)["embeds"]
    torch.testing.assert_close(cached, teacher_embeddings(other_teacher, list_images(root / "world", "train")))


def test_a_cache_of_fewer_images_is_rebuilt(setup, tmp_path, caplog):
    root, _ = setup
    few = tmp_path / "few_images"
    few.mkdir()
    for path in list_images(root / "world", "train")[:8]:
        shutil.copy2(path, few / path.name)
    small, large = tmp_path / "small", tmp_path / "large"
    small_args = bootstrap_args(setup, small, "--steps", "1", "--cache-teacher", "--val-fraction", "0")
    small_args[small_args.index("--data") + 1] = str(few)
    assert bootstrap_main(small_args) == 0
    large.mkdir()
    os.link(small / CACHE_NAME, large / CACHE_NAME)
    caplog.clear()
    assert bootstrap_main(bootstrap_args(setup, large, "--steps", "1", "--cache-teacher")) == 0
    assert "computed from other inputs: images 8 -> 24; rebuilding it" in caplog.text
    assert load_file(large / CACHE_NAME)["embeds"].shape[0] == 24
    assert load_file(small / CACHE_NAME)["embeds"].shape[0] == 8  # the rebuild replaced the link, not its file


def test_the_cache_records_its_sources_and_is_reused_through_a_hard_link_or_rebuilt_when_damaged(
    setup, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="bootstrap")
    root, spec = setup
    teacher = load_teacher(spec)
    data = TwoViewImages(list_images(root / "world", "train"), 64, 64, teacher.arch.mean, teacher.arch.std)
    loader = DataLoader(data, batch_size=8)
    first = tmp_path / "a" / CACHE_NAME
    TeacherTargets(teacher, False, lambda: torch.autocast("cpu", enabled=False)).build_cache(loader, first, "cpu")
    with safe_open(str(first), framework="pt") as f:
        recorded = f.metadata()
    assert recorded["teacher"] == spec and recorded["images"] == "24" and recorded["patches"] == "no"
    assert recorded["image_size"] == "64" and len(recorded["teacher_weights"]) == 64

    def build(path, need_patches=False):
        targets = TeacherTargets(teacher, need_patches, lambda: torch.autocast("cpu", enabled=False))
        targets.build_cache(loader, path, "cpu")
        return targets

    # shared as `mllm-sparse ablate` shares it: a hard link, reused as it is
    shared = tmp_path / "b" / CACHE_NAME
    shared.parent.mkdir()
    os.link(first, shared)
    caplog.clear()
    build(shared)
    assert "reused" in caplog.text and os.stat(shared).st_ino == os.stat(first).st_ino
    # a term that needs patch tokens: rebuilt with them
    caplog.clear()
    targets = build(shared, need_patches=True)
    assert "it holds no patch tokens, which the token or region term needs; rebuilding it" in caplog.text
    assert set(targets.cache) == {"embeds", "patches"} and os.stat(shared).st_ino != os.stat(first).st_ino
    # one with patch tokens serves a run that needs none
    caplog.clear()
    build(shared)
    assert "reused" in caplog.text
    # truncated: rebuilt, with one line saying so
    shared.write_bytes(shared.read_bytes()[:100])
    caplog.clear()
    targets = build(shared)
    assert "unreadable (truncated or corrupt?)" in caplog.text
    torch.testing.assert_close(load_file(shared)["embeds"], load_file(first)["embeds"])
    assert targets.cache["embeds"].shape == (24, teacher.arch.proj_dim)


def test_a_cache_copied_together_with_its_images_is_reused(setup, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bootstrap")
    root, spec = setup
    teacher = load_teacher(spec)
    shutil.copytree(root / "world", tmp_path / "x" / "world")  # copy2: sizes and modification times kept

    def build(base):
        data = TwoViewImages(list_images(base / "world", "train"), 64, 64, teacher.arch.mean, teacher.arch.std)
        targets = TeacherTargets(teacher, False, lambda: torch.autocast("cpu", enabled=False))
        targets.build_cache(DataLoader(data, batch_size=8), base / "run" / CACHE_NAME, "cpu")

    build(tmp_path / "x")
    shutil.copytree(tmp_path / "x", tmp_path / "y")
    caplog.clear()
    build(tmp_path / "y")
    assert "reused" in caplog.text
