"""Shutdown shapes of real uvicorn that must lose no acknowledged prediction.

Each server holds its events in the queue (a 30 s export delay), so only the
shutdown flush can deliver them: what the collector stores afterwards is
what the flush saved.

- ``--timeout-graceful-shutdown``: uvicorn cancels the requests still
  streaming and starts the lifespan shutdown before they have run their last
  step; their events must still go out.
- A plain ASGI app that does not speak lifespan (uvicorn's "lifespan protocol
  appears unsupported"): the middleware answers the lifespan itself.
- ``--lifespan off``: nothing can flush on SIGTERM; the server log says so,
  once, with what to do.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from predtrace.middleware.testing import run_uvicorn

pytestmark = pytest.mark.integration

APP = """
import asyncio
import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from predtrace.middleware import MiddlewareConfig, PredictionTracingMiddleware, instrument_app


async def stream(request):
    await request.body()

    async def lines():
        for _ in range(100):
            yield b"partial answer\\n"
            await asyncio.sleep(0.1)

    return StreamingResponse(lines(), media_type="text/plain")


async def ready(request):
    return PlainTextResponse("ok")


streaming = Starlette(
    routes=[Route("/v1/models/{name}:predict", stream, methods=["POST"]), Route("/", ready)]
)
instrument_app(streaming, MiddlewareConfig.from_env(os.environ))


async def plain_app(scope, receive, send):
    assert scope["type"] == "http", "this app knows no lifespan"
    while (await receive()).get("more_body"):
        pass
    body = b'{"predictions": [1]}' if scope["method"] == "POST" else b"ok"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


plain = PredictionTracingMiddleware(plain_app, MiddlewareConfig.from_env(os.environ))


async def ignoring_app(scope, receive, send):
    if scope["type"] != "http":
        return  # the other way a plain app ignores lifespan
    await plain_app(scope, receive, send)


ignoring = PredictionTracingMiddleware(ignoring_app, MiddlewareConfig.from_env(os.environ))


async def crashing_app(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()  # it speaks lifespan: startup...
        raise RuntimeError("the model file is missing")  # ...and fails without a word
    await plain_app(scope, receive, send)


crashing = PredictionTracingMiddleware(crashing_app, MiddlewareConfig.from_env(os.environ))
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "shutdown_app.py").write_text(APP)
    yield str(tmp_path)


def _env(collector_url: str) -> dict[str, str]:
    # Events wait in the queue: only the shutdown flush sends them.
    return {"PREDTRACE_COLLECTOR_URL": collector_url, "PREDTRACE_EXPORT_DELAY": "30"}


def _stored(collector_url: str, ids: list[str]) -> list[str]:
    with httpx.Client(base_url=collector_url) as collector:
        return [i for i in ids if collector.get(f"/v1/predictions/{i}").status_code == 200]


def test_requests_cancelled_by_a_graceful_shutdown_timeout_still_deliver_their_events(
    collector_url: str, app_dir: str
) -> None:
    ids: list[str] = []
    streaming = threading.Barrier(6)

    def client(url: str) -> None:
        try:
            with (
                httpx.Client(base_url=url, timeout=30) as http,
                http.stream("POST", "/v1/models/m:predict", content=b"{}") as response,
            ):
                ids.append(response.headers["x-prediction-id"])
                lines = response.iter_lines()
                next(lines)  # the answer is streaming
                streaming.wait(10)
                for _ in lines:
                    pass
        except (httpx.HTTPError, threading.BrokenBarrierError):
            pass  # cut off by the shutdown: expected

    with run_uvicorn(
        "shutdown_app:streaming",
        app_dir=app_dir,
        env=_env(collector_url),
        extra_args=["--timeout-graceful-shutdown", "1"],
    ) as server:
        threads = [threading.Thread(target=client, args=(server.url,)) for _ in range(5)]
        for thread in threads:
            thread.start()
        streaming.wait(10)  # five answers on their way, each with its id
        code, log = server.terminate()
        for thread in threads:
            thread.join(10)
    assert code in (0, -15), log
    assert len(ids) == 5
    assert _stored(collector_url, ids) == ids, log


@pytest.mark.parametrize("app", ["plain", "ignoring"], ids=["raising", "returning"])
def test_a_plain_app_without_lifespan_is_flushed_on_sigterm_by_the_middleware(
    collector_url: str, app_dir: str, app: str
) -> None:
    with run_uvicorn(
        f"shutdown_app:{app}",
        app_dir=app_dir,
        env=_env(collector_url),
        extra_args=["--lifespan", "auto"],
    ) as server:
        with httpx.Client(base_url=server.url) as http:
            ids = [
                http.post("/v1/models/m:predict", content=b"{}").headers["x-prediction-id"]
                for _ in range(20)
            ]
        code, log = server.terminate()
    assert code in (0, -15), log
    assert "lifespan protocol appears unsupported" not in log
    assert _stored(collector_url, ids) == ids, log


def test_a_server_without_lifespan_says_once_that_sigterm_will_lose_events(
    collector_url: str, app_dir: str
) -> None:
    with run_uvicorn(
        "shutdown_app:plain",
        app_dir=app_dir,
        env=_env(collector_url),
        extra_args=["--lifespan", "off"],
    ) as server:
        with httpx.Client(base_url=server.url) as http:
            for _ in range(3):
                assert http.post("/v1/models/m:predict", content=b"{}").status_code == 200
        _, log = server.terminate()
    assert log.count("a prediction was served before the app's lifespan started") == 1, log
    assert "instrument the outermost app, with lifespan on" in log


def test_an_app_whose_startup_crashes_still_fails_to_start(
    collector_url: str, app_dir: str
) -> None:
    with (
        pytest.raises(RuntimeError, match=r"uvicorn (did not start|not ready)") as info,
        run_uvicorn("shutdown_app:crashing", app_dir=app_dir, env=_env(collector_url)),
    ):
        pass
    assert "Application startup failed" in str(info.value)
