"""Servers shared by every integration suite: one real MLflow tracking server per session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:  # noqa: S310 - loopback
            return bool(resp.status == 200)
    except OSError:
        return False


def _stop_group(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM the server's process group (mlflow starts workers), then SIGKILL."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (SQLite backend) on 127.0.0.1; its base URL.

    `bash tests/run` installs MLflow in its own venv and exports
    PREDTRACE_TEST_MLFLOW; without it the tests fail, unless
    PREDTRACE_SKIP_MLFLOW=1 says to skip them on purpose.
    """
    executable = os.environ.get("PREDTRACE_TEST_MLFLOW")
    if not executable:
        if os.environ.get("PREDTRACE_SKIP_MLFLOW") == "1":
            pytest.skip("PREDTRACE_SKIP_MLFLOW=1")
        pytest.fail("PREDTRACE_TEST_MLFLOW is not set: run `bash tests/run` (it installs MLflow)")
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log_path = root / "mlflow.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                executable,
                "server",
                "--backend-store-uri",
                f"sqlite:///{root}/mlflow.db",
                "--default-artifact-root",
                str(root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"MLflow did not start:\n{_tail(log_path)}")
            time.sleep(0.2)
        yield url
    finally:
        _stop_group(process)


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:]


@pytest.fixture
def collector_url(tmp_path: Path) -> Iterator[str]:
    """A real `predtrace collector serve` on SQLite at 127.0.0.1:<free port>; its base URL."""
    ready, log_path = tmp_path / "collector.ready", tmp_path / "collector.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "predtrace.cli", "collector", "serve",
             "--db", f"sqlite:///{tmp_path}/collector.db", "--listen", "127.0.0.1:0",
             "--ready-file", str(ready)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (ready.exists() and ready.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the collector did not start:\n{_tail(log_path)}")
            time.sleep(0.05)
        yield "http://" + ready.read_text().splitlines()[0]
    finally:
        _stop_group(process)
