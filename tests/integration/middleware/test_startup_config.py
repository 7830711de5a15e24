"""Invalid PREDTRACE_* settings fail the server's startup, under real uvicorn.

``app.add_middleware(PredictionTracingMiddleware)`` reads the environment only
when the server first calls the app: the lifespan startup must fail with the
reason, not leave a server that answers 500 to every request.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

APP = """
from fastapi import FastAPI
from predtrace.middleware import PredictionTracingMiddleware

app = FastAPI()
app.add_middleware(PredictionTracingMiddleware)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
"""


def test_invalid_environment_settings_fail_the_startup_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(APP)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREDTRACE_")}
    env |= {"PREDTRACE_COLLECTOR_URL": "http://127.0.0.1:9", "PREDTRACE_SAMPLE_RATE": "2"}
    args = ["-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", "0"]
    done = subprocess.run(
        [sys.executable, *args, "--app-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0, done.stderr
    assert "predtrace: invalid PREDTRACE_* settings" in done.stderr
    assert "sample_rate must be within 0..1, got 2.0" in done.stderr
    assert "Application startup failed" in done.stderr


def test_wrapping_an_app_directly_with_invalid_settings_raises_right_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fastapi import FastAPI  # noqa: PLC0415

    from predtrace.middleware import ConfigError, PredictionTracingMiddleware  # noqa: PLC0415

    monkeypatch.setenv("PREDTRACE_COLLECTOR_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("PREDTRACE_SAMPLE_RATE", "2")
    with pytest.raises(ConfigError, match=r"sample_rate must be within 0\.\.1"):
        PredictionTracingMiddleware(FastAPI())
