"""`predtrace demo --workdir`: one demo per folder, and a folder it cannot write is named."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DEMO = [sys.executable, "-m", "predtrace.cli", "demo"]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [*DEMO, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def test_a_second_demo_on_a_busy_workdir_refuses_at_once(tmp_path: Path) -> None:
    # Holding the lock as a running demo does: the second must not start a
    # collector (nor read, and later stop, the first one's).
    with (tmp_path / "demo.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = _run("--predictions", "1", "--workdir", str(tmp_path), timeout=30)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"another predtrace demo is running in --workdir {tmp_path}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "collector.log").exists()


def test_a_workdir_file_it_cannot_write_is_named_not_a_traceback(tmp_path: Path) -> None:
    # A folder where the log goes stops root too, as a read-only workdir stops others.
    (tmp_path / "collector.log").mkdir()
    result = _run("--predictions", "1", "--workdir", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"cannot use --workdir {tmp_path}: {tmp_path / 'collector.log'}:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_workdir_is_named_not_a_traceback(tmp_path: Path) -> None:
    workdir = tmp_path / "ro"
    workdir.mkdir(mode=0o555)
    result = _run("--workdir", str(workdir))
    assert result.returncode == 1
    assert f"cannot use --workdir {workdir}: Permission denied" in result.stderr
    assert "Traceback" not in result.stderr
