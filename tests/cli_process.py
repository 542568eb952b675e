"""`mllm-sparse` commands in a subprocess, for tests that a crash (a segfault) must fail rather than kill, and for a
real kill -9 in the middle of a run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cli_env() -> dict[str, str]:
    """This checkout first on the path, one thread per process (the same floating-point sums in every run)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def command(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "mllm_sparse_recipes.cli", name, *args]


def run(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `mllm-sparse NAME ARGS...` to its end; its return code, stdout and stderr."""
    return subprocess.run(command(name, *args), env=cli_env(), capture_output=True, text=True, timeout=timeout)


def start(name: str, *args: str, log: Path) -> subprocess.Popen:
    """Start `mllm-sparse NAME ARGS...`, its output going to `log` (a pipe could fill and stall it)."""
    with open(log, "w") as out:
        return subprocess.Popen(command(name, *args), env=cli_env(), stdout=out, stderr=subprocess.STDOUT)


def kill_when(process: subprocess.Popen, path: Path, timeout: float = 120) -> int:
    """SIGKILL `process` as soon as `path` exists; its return code (-9 if the kill, not the end, stopped it)."""
    deadline = time.monotonic() + timeout
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    return process.wait(timeout=60)


def communicate_or_kill(process: subprocess.Popen, timeout: float) -> str | None:
    """`process.communicate()`'s output; past `timeout` its process group (a `start_new_session` process: a launcher's
    ranks too) is killed, so nothing runs on into the next test, and the test fails."""
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0] or ""
        pytest.fail(f"{process.args[0]} ran past {timeout} s:\n{output[-3000:]}")
