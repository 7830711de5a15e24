"""`predtrace demo` end to end, as a newcomer runs it: real collector, real uvicorn."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DEMO = [sys.executable, "-m", "predtrace.cli", "demo"]


def _run(*args: str, timeout: float = 90, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **extra_env}
    return subprocess.run(
        [*DEMO, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def test_demo_stores_every_prediction_and_prints_the_pivot(tmp_path: Path) -> None:
    result = _run("--predictions", "40", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout

    trace_id = re.search(r"riskiest had trace id\s+([0-9a-f]{32})", out)
    assert trace_id, out
    # The pivot names every hop: deployment, image, model version, run, commit, dataset.
    for hop in ("churn-demo", "churn/1", "run-", "sha256:", "train_accuracy"):
        assert hop in out, f"{hop!r} missing from the pivot:\n{out}"
    assert f"predtrace trace {trace_id.group(1)}" in out
    # Its collector has stopped: its URL is no use to the next run.
    assert "PREDTRACE_COLLECTOR_URL=<the URL that run prints>" in out

    # Every prediction reached the store, the chosen trace among them.
    with sqlite3.connect(tmp_path / "demo.db") as db:
        (count,) = db.execute("SELECT count(*) FROM predictions").fetchone()
        (hits,) = db.execute(
            "SELECT count(*) FROM predictions WHERE lower(hex(trace_id)) = ?",
            (trace_id.group(1),),
        ).fetchone()
    assert count == 40
    assert hits == 1


def test_the_demo_runs_again_on_its_own_workdir(tmp_path: Path) -> None:
    # The demo's closing hint suggests --workdir; a second run registered the
    # same model version with another (random) run and got a 409.
    for attempt in range(2):
        result = _run("--predictions", "5", "--workdir", str(tmp_path))
        assert result.returncode == 0, (attempt, result.stdout + result.stderr)


def test_demo_keep_running_leaves_a_collector_that_answers(tmp_path: Path) -> None:
    result = _run("--predictions", "5", "--workdir", str(tmp_path), "--keep-running")
    assert result.returncode == 0, result.stdout + result.stderr
    pid = int(re.search(r"kill (\d+)", result.stdout).group(1))  # type: ignore[union-attr]
    url = re.search(r"PREDTRACE_COLLECTOR_URL=(\S+)", result.stdout).group(1)  # type: ignore[union-attr]
    try:
        model = subprocess.run(
            [sys.executable, "-m", "predtrace.cli", "model", "lineage", "churn/1", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={**os.environ, "PREDTRACE_COLLECTOR_URL": url},
        )
        assert model.returncode == 0, model.stdout + model.stderr
        assert '"churn"' in model.stdout
    finally:
        os.kill(pid, signal.SIGTERM)
        _wait_gone(pid)


def _wait_gone(pid: int, timeout: float = 15.0) -> None:
    """The detached collector is not our child: poll until its pid is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (ProcessLookupError, FileNotFoundError):
            return
        if state == "Z":  # exited; waiting for whoever adopted it to reap it
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    pytest.fail(f"the demo's collector (pid {pid}) ignored SIGTERM for {timeout:.0f} s")


def test_demo_rejects_a_nonsense_count() -> None:
    result = _run("--predictions", "0")
    assert result.returncode == 2
    assert "at least 1" in result.stderr


def test_the_demo_runs_on_a_terminal_that_cannot_print_its_symbols(tmp_path: Path) -> None:
    result = _run("--predictions", "3", "--workdir", str(tmp_path), PYTHONIOENCODING="ascii")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "predtrace trace" in result.stdout


def test_a_workdir_it_cannot_create_is_named_not_a_traceback(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = _run("--workdir", str(blocker / "demo"))
    assert result.returncode == 1
    assert f"cannot use --workdir {blocker / 'demo'}: Not a directory" in result.stderr
    assert "Traceback" not in result.stderr
