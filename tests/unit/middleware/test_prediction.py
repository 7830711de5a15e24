"""One prediction through the middleware: what the request and response give the event.

Bodies a client may send (odd tensor names, unusable ids, names in the path),
responses compressed inside the middleware, FastAPI's own telemetry, and
``current_prediction()`` after the response. Driven with ``call_asgi``.
"""

from __future__ import annotations

import gc
import gzip
import json
import os
import weakref
import zlib
from typing import Any

import pytest
from fastapi import BackgroundTasks, FastAPI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from predtrace.middleware import _prediction, current_prediction
from predtrace.middleware.testing import call_asgi
from predtrace.sidecar.testing import InMemoryExporter
from predtrace.wire import Status

from .conftest import TELEMETRY_OFF, Instrument, fastapi_app

Tracing = tuple[TracerProvider, InMemorySpanExporter]
JSON = [("content-type", "application/json")]
ANSWER = {
    "model_name": "churn",
    "model_version": "7",
    "outputs": [{"name": "score", "shape": [1], "datatype": "FP32", "data": [0.9]}],
    "pad": "p" * 600,  # over GZipMiddleware's minimum size
}


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _telemetry(tracing: Tracing) -> dict[str, Any]:
    return {"tracer_provider": tracing[0], "metrics": False, "logs": False}


def _errors(stats: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in stats.items() if k.startswith("error.")}


@pytest.mark.parametrize("telemetry", [False, True], ids=["body-read", "fastapi-telemetry"])
@pytest.mark.parametrize("name", [["x"], {"x": 1}], ids=["list", "object"])
async def test_a_tensor_name_that_is_not_a_string_costs_no_event_span_or_id(
    telemetry: bool,
    name: object,
    instrument: Instrument,
    tracing: Tracing,
    events: InMemoryExporter,
) -> None:
    app = fastapi_app(telemetry=_telemetry(tracing) if telemetry else None)
    runtime = instrument(app, feature_allowlist=frozenset({"x"}))
    body = {"inputs": [{"name": name, "data": [1.0]}, {"name": "x", "data": [2.0]}]}
    response = await call_asgi(app, "POST", "/v2/models/iris/infer", _json(body), JSON)
    assert response.status == 200
    pid = response.header("x-prediction-id")
    assert pid is not None
    runtime.force_flush(5)
    (event,) = events.events
    assert (event.prediction_id, event.status, event.features) == (pid, Status.OK, {"x": 2.0})
    traced = [
        span
        for span in tracing[1].get_finished_spans()
        if span.attributes and span.attributes.get("predtrace.prediction.id") == pid
    ]
    assert len(traced) == 1  # the server span carries the prediction
    assert _errors(runtime.stats()) == {}


def _gzip_app() -> Starlette:
    async def infer(request: Request) -> Response:
        await request.body()
        return JSONResponse(ANSWER)

    return Starlette(
        routes=[Route("/v2/models/{name}/infer", infer, methods=["POST"])],
        middleware=[Middleware(GZipMiddleware)],
    )


@pytest.mark.parametrize("sample_rate", [0.0, 1.0])
async def test_a_gzip_response_still_gives_the_served_version_and_the_output(
    sample_rate: float, instrument: Instrument, tracing: Tracing, events: InMemoryExporter
) -> None:
    app = _gzip_app()
    runtime = instrument(app, model_name="churn", model_version="3", sample_rate=sample_rate)
    headers = [*JSON, ("accept-encoding", "gzip")]
    response = await call_asgi(app, "POST", "/v2/models/churn/infer", _json({}), headers)
    assert response.header("content-encoding") == "gzip"
    assert json.loads(gzip.decompress(response.body)) == ANSWER  # streamed on untouched
    runtime.force_flush(5)
    (event,) = events.events
    assert event.model.version == "7"  # what served, not the configured "3"
    (span,) = tracing[1].get_finished_spans()
    assert span.attributes is not None and span.attributes["predtrace.model.version"] == "7"
    if sample_rate:
        assert event.output is not None and event.output.score == pytest.approx(0.9)


def _encoded_app(encoding: bytes, body: bytes) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        headers = [(b"content-type", b"application/json"), (b"content-encoding", encoding)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i in range(0, len(body), 50):  # in chunks: decoded as they pass
            await send({"type": "http.response.body", "body": body[i : i + 50], "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


def _raw_deflate(data: bytes) -> bytes:
    """A raw deflate stream, without the zlib header (what some servers send as "deflate")."""
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize("encode", [zlib.compress, _raw_deflate], ids=["zlib", "raw"])
async def test_a_deflate_response_is_read_too(
    encode: Any, instrument: Instrument, events: InMemoryExporter
) -> None:
    app = Starlette()
    app.mount("/", _encoded_app(b"deflate", encode(_json(ANSWER))))
    runtime = instrument(app, model_name="churn", model_version="3")
    await call_asgi(app, "POST", "/v2/models/churn/infer", _json({}), JSON)
    runtime.force_flush(5)
    (event,) = events.events
    assert event.model.version == "7" and event.output is not None


@pytest.mark.parametrize("encoding", [b"br", b"zstd", b"gzip, br"])
async def test_a_response_in_a_coding_it_cannot_read_is_not_parsed_and_is_counted(
    encoding: bytes, instrument: Instrument, events: InMemoryExporter
) -> None:
    body = os.urandom(2000)  # what a brotli body looks like to a JSON parser
    app = Starlette()
    app.mount("/", _encoded_app(encoding, body))
    runtime = instrument(app, model_name="churn", model_version="3")
    response = await call_asgi(app, "POST", "/v2/models/churn/infer", _json({}), JSON)
    assert response.body == body
    runtime.force_flush(5)
    (event,) = events.events
    assert (event.status, event.model.version, event.output) == (Status.OK, "3", None)
    stats = runtime.stats()
    assert stats["response_encoding_unreadable"] == 1 and _errors(stats) == {}


def _sampling_app(seen: dict[str, bool], tracing: Tracing) -> FastAPI:
    app = FastAPI(telemetry=_telemetry(tracing))

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, body: dict[str, Any]) -> dict[str, Any]:
        p = current_prediction()
        seen[body["id"]] = p.is_sampled
        p.record_output(label="recorded")
        return {"model_name": name, "id": body["id"], "outputs": []}

    return app


async def test_fastapi_telemetry_sampling_follows_the_final_prediction_id(
    instrument: Instrument, tracing: Tracing, events: InMemoryExporter
) -> None:
    # The OIP body id, known only once FastAPI parsed the body, replaces the
    # header id: sampling must be decided by it, for the handler and the event.
    seen: dict[str, bool] = {}
    app = _sampling_app(seen, tracing)
    runtime = instrument(app, sample_rate=0.5)
    threshold = int(0.5 * 2**32)
    for i in range(60):
        body = _json({"id": f"body-{i}", "inputs": []})
        headers = [*JSON, ("x-request-id", f"header-{i}")]
        response = await call_asgi(app, "POST", "/v2/models/m/infer", body, headers)
        assert response.header("x-prediction-id") == f"body-{i}"
    runtime.force_flush(5)
    assert len(events.events) == 60
    for event in events.events:
        expected = zlib.crc32(event.prediction_id.encode()) < threshold
        assert event.sampled == expected == seen[event.prediction_id], event.prediction_id
        assert (event.output is not None) == expected
    assert 10 < sum(seen.values()) < 50


async def test_a_custom_route_captures_allow_listed_features_without_a_fingerprint_key(
    instrument: Instrument, events: InMemoryExporter
) -> None:
    async def score(request: Request) -> Response:
        await request.body()
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/score", score, methods=["POST"])])
    runtime = instrument(
        app, fingerprint_key=None, routes=("POST /score",), feature_allowlist=frozenset({"tenure"})
    )
    await call_asgi(app, "POST", "/score", _json({"tenure": 14.0, "secret": 1.0}), JSON)
    runtime.force_flush(5)
    (event,) = events.events
    assert event.features == {"tenure": 14.0} and event.input_fingerprint == b""


async def test_an_unsampled_custom_route_without_a_key_never_parses_its_body(
    instrument: Instrument, events: InMemoryExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing of the body is kept then (no fingerprint, no features): no parse per request.
    parsed: list[bytes] = []
    real = _prediction.parse_json
    monkeypatch.setattr(_prediction, "parse_json", lambda body: parsed.append(body) or real(body))

    async def score(request: Request) -> Response:
        await request.body()
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/score", score, methods=["POST"])])
    runtime = instrument(
        app,
        fingerprint_key=None,
        routes=("POST /score",),
        feature_allowlist=frozenset({"tenure"}),
        sample_rate=0.0,
    )
    await call_asgi(app, "POST", "/score", _json({"tenure": 14.0}), JSON)
    runtime.force_flush(5)
    (event,) = events.events
    assert (event.features, parsed) == ({}, [])


@pytest.mark.parametrize("telemetry", [False, True], ids=["body-read", "fastapi-telemetry"])
@pytest.mark.parametrize("body_id", ["order 17", "x" * 300, 42, ""])
async def test_an_oip_body_id_that_cannot_be_the_prediction_id_is_replaced_and_counted(
    telemetry: bool, body_id: object, instrument: Instrument, events: InMemoryExporter
) -> None:
    app = fastapi_app(telemetry={**TELEMETRY_OFF} if telemetry else None)
    runtime = instrument(app)
    body = _json({"id": body_id, "inputs": []})
    response = await call_asgi(app, "POST", "/v2/models/iris/infer", body, JSON)
    pid = response.header("x-prediction-id")
    assert response.status == 200 and pid is not None and pid != body_id
    runtime.force_flush(5)
    (event,) = events.events
    assert event.prediction_id == pid
    assert runtime.stats()["invalid_caller_id"] == 1


@pytest.mark.parametrize(
    ("segment", "name"),
    [("a%00b", "ab"), ("a%0Ab%1B", "ab"), ("n" * 70_000, "n" * 256)],
    ids=["nul", "controls", "70k"],
)
async def test_a_model_name_from_the_path_is_cleaned_and_bounded_and_the_event_goes(
    segment: str, name: str, instrument: Instrument, tracing: Tracing, events: InMemoryExporter
) -> None:
    app = fastapi_app()
    runtime = instrument(app)
    path = f"/v2/models/{segment}/infer"
    response = await call_asgi(app, "POST", path, _json({"inputs": []}), JSON)
    assert response.status == 200
    runtime.force_flush(5)
    (event,) = events.events  # not refused downstream as invalid
    assert event.model.name == name
    assert runtime.stats()["dropped"] == 0
    (span,) = tracing[1].get_finished_spans()
    assert span.name == f"predict {name}"


async def test_current_prediction_after_the_response_is_inactive_and_late_calls_are_counted(
    instrument: Instrument, events: InMemoryExporter
) -> None:
    app = FastAPI(telemetry=TELEMETRY_OFF)
    seen: dict[str, bool] = {}

    def after_the_response() -> None:
        p = current_prediction()
        seen["active"] = p.active
        p.set_model(version="99")
        p.record_output(label="late")

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, body: dict[str, Any], tasks: BackgroundTasks) -> dict[str, Any]:
        seen["during"] = current_prediction().active
        tasks.add_task(after_the_response)
        return {"model_name": name, "model_version": "1", "outputs": []}

    runtime = instrument(app)
    await call_asgi(app, "POST", "/v2/models/m/infer", _json({"inputs": []}), JSON)
    runtime.force_flush(5)
    assert seen == {"during": True, "active": False}
    (event,) = events.events
    assert event.model.version == "1" and event.output is None
    assert runtime.stats()["late_context_call"] == 2


@pytest.mark.parametrize("header", ["x-request-id", "ce-id"])
async def test_a_repeated_caller_id_header_gives_the_first_as_the_app_reads_it(
    header: str, instrument: Instrument, events: InMemoryExporter
) -> None:
    seen: list[str | None] = []

    async def score(request: Request) -> Response:
        seen.append(request.headers.get(header))
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/score", score, methods=["POST"])])
    runtime = instrument(app, routes=("POST /score",))
    headers = [*JSON, (header, "req-first"), (header, "req-second")]
    response = await call_asgi(app, "POST", "/score", b"{}", headers)
    runtime.force_flush(5)
    (event,) = events.events
    assert seen == ["req-first"]
    assert response.header("x-prediction-id") == event.prediction_id == "req-first"


class _Tracked(dict[str, object]):
    """A parsed body that can be watched with a weak reference."""


async def test_the_parsed_body_is_not_kept_while_the_app_serves_the_request(
    instrument: Instrument, events: InMemoryExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A MB tensor parsed for the fingerprint would otherwise live as long as
    # the request, beside the app's own copy (twice the memory under load).
    watched: list[weakref.ref[_Tracked]] = []
    real = _prediction.parse_json

    def parse(body: bytes) -> object:
        value = _Tracked(real(body))  # type: ignore[arg-type]  # a JSON object here
        watched.append(weakref.ref(value))
        return value

    monkeypatch.setattr(_prediction, "parse_json", parse)
    alive_in_handler: list[bool] = []

    async def infer(request: Request) -> Response:
        await request.body()
        gc.collect()
        alive_in_handler.append(watched[0]() is not None)
        return JSONResponse({"model_name": "iris", "model_version": "3", "outputs": []})

    app = Starlette(routes=[Route("/v2/models/iris/infer", infer, methods=["POST"])])
    runtime = instrument(app, feature_allowlist=frozenset({"x"}), sample_rate=1.0)
    body = _json({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.5]}]})
    await call_asgi(app, "POST", "/v2/models/iris/infer", body, JSON)
    runtime.force_flush(5)
    (event,) = events.events
    assert event.input_fingerprint and event.features == {"x": 1.5}  # it was used, then let go
    assert alive_in_handler == [False]
