"""Real servers for the collector integration tests.

``predtrace collector serve`` as a subprocess (SQLite or PostgreSQL, port 0,
ready file), and one real MLflow tracking server per session.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-c", "from predtrace.cli import main; main()"]


def wait_for(check: Callable[[], bool], what: str, deadline_s: float = 60.0) -> None:
    """Poll ``check`` until true or fail naming ``what`` (no fixed sleeps)."""
    deadline = time.monotonic() + deadline_s
    delay = 0.02
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    pytest.fail(f"timed out waiting for {what}")


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM our process group, then SIGKILL it if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout)


@dataclass
class Served:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture
def serve_collector(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Start ``predtrace collector serve`` subprocesses; all stopped afterwards."""
    started: list[Served] = []

    def _serve(db: str, *extra: str) -> Served:
        ready = tmp_path / f"ready-{len(started)}"
        log = tmp_path / f"collector-{len(started)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    *CLI,
                    "collector",
                    "serve",
                    "--db",
                    db,
                    "--listen",
                    "127.0.0.1:0",
                    "--ready-file",
                    str(ready),
                    *extra,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        served = Served("", process, log)
        started.append(served)
        wait_for(lambda: ready.exists() or process.poll() is not None, "the collector's ready file")
        assert process.poll() is None, log.read_text()
        served.url = "http://" + ready.read_text().splitlines()[0]
        return served

    yield _serve
    for served in started:
        stop(served.process)


def _postgres_url() -> str:
    url = os.environ.get("PREDTRACE_TEST_POSTGRES_URL")
    if url:
        return url
    if os.environ.get("PREDTRACE_SKIP_POSTGRES") == "1":
        pytest.skip("PREDTRACE_SKIP_POSTGRES=1")
    pytest.fail(
        "PREDTRACE_TEST_POSTGRES_URL is not set: run `bash tests/run` (it starts PostgreSQL)"
    )


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database of each kind (PostgreSQL: a schema of its own)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/collector.db"
    return f"{_postgres_url()}?schema=it_{secrets.token_hex(6)}"
