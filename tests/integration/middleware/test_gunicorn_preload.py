"""gunicorn --preload with uvicorn workers: forked workers never share ids, lose no event.

The app (and so predtrace's runtime and id generator) is imported once in the
gunicorn master, then forked into two workers. Every prediction answered must
have a distinct id, and every one must reach the real collector, also across
the SIGTERM that stops gunicorn.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "fastapi_server"
CLI = [sys.executable, "-m", "predtrace.cli"]
REQUESTS = 120


def _wait_for_line(path: Path, pattern: str, process: subprocess.Popen[bytes]) -> re.Match[str]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = re.search(pattern, path.read_text(errors="replace"))
        if found:
            return found
        if process.poll() is not None:
            break
        time.sleep(0.05)
    pytest.fail(f"no {pattern!r} in {path.name}:\n{path.read_text(errors='replace')[-3000:]}")


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            return process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    return process.returncode


def test_preloaded_workers_get_distinct_ids_and_every_event_arrives(
    tmp_path: Path, collector_url: str
) -> None:
    gunicorn: subprocess.Popen[bytes] | None = None
    try:
        env = {
            **os.environ,
            "PREDTRACE_COLLECTOR_URL": collector_url,
            "PREDTRACE_FINGERPRINT_KEY": "gunicorn-test-key",
            "PREDTRACE_MODEL_VERSION": "3",
            "PREDTRACE_SERVICE_NAME": "iris-gunicorn",
        }
        gunicorn_log = tmp_path / "gunicorn.log"
        with gunicorn_log.open("wb") as out:
            gunicorn = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "app:app", "--chdir", str(EXAMPLE),
                 "--preload", "--workers", "2", "--worker-class", "uvicorn_worker.UvicornWorker",
                 "--bind", "127.0.0.1:0", "--graceful-timeout", "20", "--log-level", "info"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        port = _wait_for_line(gunicorn_log, r"Listening at: http://127\.0\.0\.1:(\d+)", gunicorn)
        url = f"http://127.0.0.1:{port.group(1)}"
        # Both workers up (each logs its lifespan start) before traffic starts.
        deadline = time.monotonic() + 60
        while gunicorn_log.read_text().count("Application startup complete") < 2:
            assert gunicorn.poll() is None, gunicorn_log.read_text()[-3000:]
            assert time.monotonic() < deadline, gunicorn_log.read_text()[-3000:]
            time.sleep(0.05)

        ids: list[str] = []
        body = {
            "inputs": [{"name": "petal_length", "shape": [1], "datatype": "FP32", "data": [4.2]}]
        }
        for _ in range(REQUESTS):
            # A new connection each time, so the kernel spreads them over both workers.
            with httpx.Client(base_url=url, timeout=10) as client:
                response = client.post("/v2/models/iris/infer", json=body)
            assert response.status_code == 200, response.text
            ids.append(response.headers["x-prediction-id"])
        assert len(set(ids)) == REQUESTS, "two workers produced the same prediction id"

        code = _stop(gunicorn)  # SIGTERM: each worker's lifespan shutdown flushes its queue
        assert code == 0, gunicorn_log.read_text()[-3000:]
        workers = set(re.findall(r"Booting worker with pid: (\d+)", gunicorn_log.read_text()))
        assert len(workers) == 2

        stats = subprocess.run(
            [*CLI, "completeness", "-o", "json", "--collector", collector_url],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert stats.returncode in (0, 1), stats.stderr
        assert json.loads(stats.stdout)["predictions"] == REQUESTS
        for prediction_id in (ids[0], ids[-1]):
            found = subprocess.run(
                [*CLI, "trace", prediction_id, "-o", "json", "--collector", collector_url],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            assert prediction_id in found.stdout, found.stderr
    finally:
        if gunicorn is not None:
            _stop(gunicorn)
