"""LLaVA training keeps the user's work: exact resume after a real kill -9 (full, LoRA, DeepSpeed ZeRO-3), damaged
checkpoints passed over, changed settings refused, no code run from a checkpoint, and a diverging run stopped
before it saves anything non-finite."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_process import communicate_or_kill
from safetensors.torch import load_file
from tiny_vlm import allreduce_buffers_left, common_args, deepspeed_launcher, free_port, save_tiny_vlm

from llava_adapter import checkpoints, train
from mllm_sparse.training import DivergenceError

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def vlm_dir(tokenizer, tmp_path_factory):
    return save_tiny_vlm(tokenizer, tmp_path_factory.mktemp("resume") / "vlm")


@pytest.fixture(scope="module")
def elastic_vlm_dir(tokenizer, tmp_path_factory):
    """A tiny VLM whose tower serves 4, 9 and 15 latent tokens."""
    return save_tiny_vlm(tokenizer, tmp_path_factory.mktemp("resume") / "elastic-vlm", budgets=[4, 9, 15])


@pytest.fixture
def data(image_folder, image_record, text_record, write_data):
    records = [image_record(f"img-{i}", image="abc"[i % 3] + ".png") for i in range(6)] + [text_record("txt-0")]
    return write_data(records)


def run_args(vlm_dir, data, image_folder, out, steps: int, *extra) -> list[str]:
    args = common_args(vlm_dir, data, image_folder, out, "--version", "vicuna_v1", "--learning_rate", "1e-2", *extra)
    args[args.index("--max_steps") + 1] = str(steps)
    args[args.index("--save_strategy") + 1] = "steps"
    return args + ["--save_steps", "2"]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    names = ["model.safetensors", "adapter_model.safetensors", train.NON_LORA_FILE]
    state = {}
    for name in names:
        if (out / name).is_file():
            state.update({f"{name}:{k}": v for k, v in load_file(str(out / name)).items()})
    assert state, f"no weights in {out}"
    return state


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0, msg=key)


def launch(command: list[str], out: Path) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.log", "a")  # noqa: SIM115 - closed with the process
    # Its own process group: the kill reaches a launcher's ranks too.
    return subprocess.Popen(command, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_after_checkpoint(command: list[str], out: Path, step: int, timeout: float = 240) -> None:
    """Start `command`, SIGKILL it once `checkpoint-<step>` is complete (mid-run), and check it died of it."""
    process = launch(command, out)
    marker = out / f"checkpoint-{step}" / checkpoints.COMPLETE_MARKER
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert process.poll() is None, (out.parent / f"{out.name}.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (out / "model.safetensors").exists() and not (out / "adapter_model.safetensors").exists()


def run_to_end(command: list[str], out: Path, timeout: float = 600) -> str:
    process = launch(command, out)
    communicate_or_kill(process, timeout)
    assert process.returncode == 0, (out.parent / f"{out.name}.log").read_text()[-3000:]
    return (out.parent / f"{out.name}.log").read_text()


@pytest.mark.parametrize("mode", ["full-elastic", "lora"])
def test_kill_9_then_the_same_command_ends_with_the_uninterrupted_weights(
    mode, vlm_dir, elastic_vlm_dir, data, image_folder, tmp_path
):
    """Full fine-tuning runs on an elastic tower at two budgets per batch (the smallest and one drawn) and LLaVA's
    batches grouped by length (the draw and the grouped order must resume too); LoRA on a fixed one, in random
    batches."""
    extra = ["--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8"] if mode == "lora" else []
    if mode == "full-elastic":
        vlm_dir, extra = elastic_vlm_dir, ["--budgets", "4", "9", "15", "--budgets_per_step", "2",
                                        "--group_by_modality_length", "True"]  # fmt: skip
    script = [sys.executable, "scripts/train_vlm.py"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_to_end(script + run_args(vlm_dir, data, image_folder, straight, 24, *extra), straight)
    command = script + run_args(vlm_dir, data, image_folder, killed, 24, *extra)
    kill_after_checkpoint(command, killed, 6)
    log = run_to_end(command, killed)  # the same command: resuming is LLaVA's default
    assert "resuming from" in log
    assert_same_weights(straight, killed)
    if mode == "full-elastic":
        before = load_file(str(vlm_dir / "model.safetensors"))
        after = load_file(str(killed / "model.safetensors"))
        assert any(not torch.equal(before[k], after[k]) for k in before)  # training moved the weights


@pytest.mark.deepspeed
def test_deepspeed_zero3_resumes_exactly_after_kill_9(vlm_dir, data, image_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(ENV, "DS_ACCELERATOR", "cpu")
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    ports = []

    def command(out: Path) -> list[str]:
        ports.append(free_port())
        return deepspeed_launcher(ports[-1]) + run_args(
            vlm_dir, data, image_folder, out, 8, "--deepspeed", "scripts/zero3.json"
        )

    run_to_end(command(straight), straight)
    kill_after_checkpoint(command(killed), killed, 4)
    assert "resuming from" in run_to_end(command(killed), killed)
    assert_same_weights(straight, killed)
    # The killed run's ranks released their shared-memory buffers too: nothing stays behind in /dev/shm.
    assert [allreduce_buffers_left(port) for port in ports] == [[], [], []]


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(vlm_dir, data, image_folder, tmp_path, caplog):
    out = tmp_path / "run"
    assert train.main(run_args(vlm_dir, data, image_folder, out, 4)) == 0
    (out / "checkpoint-4" / checkpoints.COMPLETE_MARKER).unlink()  # as if killed while writing it
    (out / "model.safetensors").unlink()
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    assert checkpoints.latest_complete(out) == out / "checkpoint-2"
    assert "passing over" in caplog.text and "checkpoint-4" in caplog.text
    assert train.main(run_args(vlm_dir, data, image_folder, out, 4)) == 0
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_resume_refuses_changed_settings_and_a_finished_folder(vlm_dir, data, image_folder, tmp_path):
    # A finished run without checkpoints is not trained over by accident ...
    done = tmp_path / "done"
    assert train.main(common_args(vlm_dir, data, image_folder, done, "--version", "vicuna_v1")) == 0
    with pytest.raises(ValueError, match="holds a finished run"):
        train.main(common_args(vlm_dir, data, image_folder, done, "--version", "vicuna_v1"))
    # ... and an interrupted one does not resume with another learning rate.
    out = tmp_path / "run"
    assert train.main(run_args(vlm_dir, data, image_folder, out, 2)) == 0
    (out / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"--learning_rate 0\.01 -> 0\.5"):
        train.main(run_args(vlm_dir, data, image_folder, out, 2) + ["--learning_rate", "0.5"])
    with pytest.raises(ValueError, match="--max_steps 2 -> 3"):
        train.main(run_args(vlm_dir, data, image_folder, out, 3))
    # Harmless settings may change.
    assert train.main(run_args(vlm_dir, data, image_folder, out, 2) + ["--logging_steps", "5"]) == 0
    # --overwrite_output_dir starts afresh, deleting the old checkpoints.
    assert train.main(run_args(vlm_dir, data, image_folder, out, 2) + ["--overwrite_output_dir", "True"]) == 0
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        train.main(run_args(vlm_dir, data, image_folder, out, 2) + ["--resume_from_checkpoint", str(out / "nope")])


class Planted:
    """Unpickling this runs code: it creates a file."""

    path = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def plant(target: Path, witness: Path) -> None:
    Planted.path = str(witness)
    target.write_bytes(pickle.dumps({"state": Planted()}))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_a_pickle_planted_in_a_checkpoint_does_not_run(name, vlm_dir, data, image_folder, tmp_path):
    out = tmp_path / "run"
    assert train.main(run_args(vlm_dir, data, image_folder, out, 2)) == 0
    (out / "model.safetensors").unlink()
    witness = tmp_path / "pwned"
    plant(out / "checkpoint-2" / name, witness)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global|weightsunpickler"):
        train.main(run_args(vlm_dir, data, image_folder, out, 2))
    assert not witness.exists()


def test_deepspeed_checkpoint_loads_are_weights_only(tmp_path):
    """DeepSpeed's own loader asks for a full unpickle; inside a training run it gets a weights-only one."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    witness = tmp_path / "pwned"
    plant(tmp_path / "mp_rank_00_model_states.pt", witness)
    script = f"""
import sys
from llava_adapter import checkpoints
checkpoints.force_weights_only_loads()
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
try:
    TorchCheckpointEngine().load({str(tmp_path / "mp_rank_00_model_states.pt")!r})
except Exception as err:
    print("refused:", type(err).__name__)
"""
    result = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=300)
    assert "refused: UnpicklingError" in result.stdout, result.stdout + result.stderr
    assert not witness.exists()
    # The allow-list keeps DeepSpeed's real optimizer states loadable.
    assert TorchCheckpointEngine is not None and checkpoints.deepspeed_safe_globals()


def test_divergence_stops_before_saving_non_finite_weights(vlm_dir, data, image_folder, tmp_path):
    out = tmp_path / "run"
    args = run_args(vlm_dir, data, image_folder, out, 24) + ["--learning_rate", "1e12", "--max_grad_norm", "0"]
    args += ["--save_steps", "1"]
    with pytest.raises(DivergenceError, match=r"at step \d+; stopped before saving it\. Last good checkpoint"):
        train.main(args)
    assert not (out / "model.safetensors").exists()
    for checkpoint in checkpoints.checkpoints(out):
        for key, value in load_file(str(checkpoint / "model.safetensors")).items():
            assert torch.isfinite(value).all(), f"{checkpoint}: {key}"


def test_stage1_divergence_saves_no_projector(vlm_dir, image_folder, image_record, write_data, tmp_path):
    out = tmp_path / "stage1"
    data = write_data([image_record(f"img-{i}", image="abc"[i % 3] + ".png") for i in range(6)], "images.json")
    args = run_args(vlm_dir, data, image_folder, out, 24, "--tune_mm_mlp_adapter", "True")
    args += ["--learning_rate", "1e36", "--max_grad_norm", "0", "--save_strategy", "no"]
    with pytest.raises(DivergenceError):
        train.main(args)
    assert not (out / "mm_projector.safetensors").exists()


def test_an_empty_dataset_is_one_clear_line(vlm_dir, write_data, image_folder, tmp_path):
    empty = write_data([], "empty.json")
    result = subprocess.run(
        [sys.executable, "scripts/train_vlm.py", *run_args(vlm_dir, empty, image_folder, tmp_path / "out", 2)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert f"train_vlm: error: {empty}: no records to train on" in result.stderr
    assert "Traceback" not in result.stderr


def test_training_needs_no_deepspeed_unless_it_runs_under_it(monkeypatch):
    """Without DeepSpeed installed (e.g. a GPU image that lacks it) a plain run still starts: there is no DeepSpeed
    checkpoint to allow classes for."""
    real = checkpoints.importlib.util.find_spec
    monkeypatch.setattr(
        checkpoints.importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a)
    )
    assert checkpoints.deepspeed_safe_globals() == []
    monkeypatch.undo()
    assert len(checkpoints.deepspeed_safe_globals()) == 3
