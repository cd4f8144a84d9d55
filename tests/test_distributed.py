"""The launcher's torchrun: a worker that failed with one line of its own leaves it at that
line; a worker that died otherwise (killed, crashed) gets one line saying which."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from semires.distributed import AGENT_ENV, LAUNCHER_ENV, launched_worker

from .conftest import REPO

WORKER = """
import os, signal, sys, time
assert int(os.environ["SEMIRES_AGENT_PID"]) == os.getppid()  # torchrun told its workers its pid
if os.environ["RANK"] == "1":
    if sys.argv[1] == "error":
        print("semires burn-in: error: data/split/5.json: split file not found", file=sys.stderr)
        sys.exit(2)
    os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["error", "killed"])
def test_a_failed_worker_is_one_line(tmp_path, how):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("SEMIRES_NPROC", "OMP_NUM_THREADS")}
    proc = subprocess.run(
        [sys.executable, "-m", "semires.distributed", "--standalone", "--nproc-per-node=2", str(script), how],
        cwd=REPO, env={**env, LAUNCHER_ENV: str(os.getpid()), "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = proc.stderr.splitlines()
    if how == "error":
        assert proc.returncode == 2
        assert lines == ["semires burn-in: error: data/split/5.json: split file not found"]
    else:
        assert proc.returncode == 1
        assert len(lines) == 1 and lines[0].startswith("semires: worker 1 (pid "), lines
        assert lines[0].endswith(
            f"ended with signal {signal.SIGKILL.name} (its output is above); the other workers were stopped"
        )


def test_only_a_worker_of_the_launcher_skips_the_lock(monkeypatch):
    monkeypatch.delenv(AGENT_ENV, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not launched_worker()  # a bare torchrun's worker: locks for its machine
    monkeypatch.setenv(AGENT_ENV, "1")
    assert launched_worker()
