"""RELIABILITY row 20: an exporter, the registry or the tracing SDK fails.

The prediction response stays byte-identical to the same app without
telemetry (the added ``x-prediction-id`` header aside), the failure is
counted, and the log is rate-limited.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracerProvider, Tracer, TracerProvider

from predtrace.middleware import MiddlewareConfig, ResolvedModel, _prediction, instrument_app
from predtrace.middleware.testing import AsgiResponse, call_asgi
from predtrace.sidecar.pipeline import (
    ExportResult,
    OutgoingBatch,
    PermanentExportError,
    QueueConfig,
    RetryableExportError,
    RetryPolicy,
)
from predtrace.sidecar.testing import InMemoryExporter

from .conftest import model_app

REQUESTS = [
    {"id": "a-1", "inputs": [{"name": "x", "shape": [2], "datatype": "FP64", "data": [1, 2]}]},
    {"id": "a-2", "inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [5]}]},
    {"id": "a-3", "inputs": "not a list"},  # the app answers 500/422: still identical
    {"id": "a-4"},
]
HEADERS = [("content-type", "application/json")]
PID = "predtrace.prediction.id"  # the span attribute naming the prediction


class RaisingExporter:
    """An exporter that fails every batch in the given way."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.calls = 0

    def export(self, batch: OutgoingBatch) -> ExportResult:
        self.calls += 1
        raise self.error

    def shutdown(self, timeout: float) -> None:
        raise RuntimeError("shutdown fails too")


class BrokenTracerProvider(TracerProvider):
    """A tracing SDK whose tracer raises on every span."""

    def get_tracer(self, *args: Any, **kwargs: Any) -> Tracer:
        tracer = NoOpTracerProvider().get_tracer("broken")

        def start_span(*a: Any, **k: Any) -> Any:
            raise RuntimeError("sdk bug")

        tracer.start_span = start_span  # type: ignore[method-assign]
        return tracer


class RaisingOnEnd(SpanProcessor):
    """An application's span processor with a bug: ``span.end()`` raises."""

    def on_end(self, span: ReadableSpan) -> None:
        raise RuntimeError("processor bug")


def _provider_with_a_raising_processor() -> SdkTracerProvider:
    provider = SdkTracerProvider()
    provider.add_span_processor(RaisingOnEnd())
    return provider


class RaisingResolver:
    """A registry that is down."""

    def resolve(self, name: str, version: str) -> ResolvedModel | None:
        raise ConnectionError("registry down")


def _comparable(response: AsgiResponse) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    headers = [(k, v) for k, v in response.headers if k != b"x-prediction-id"]
    return response.status, headers, response.body


async def _answers(app: Any) -> list[tuple[int, list[tuple[bytes, bytes]], bytes]]:
    out = []
    for body in REQUESTS:
        try:
            response = await call_asgi(
                app, "POST", "/v2/models/m/infer", json.dumps(body).encode(), HEADERS
            )
        except Exception as exc:  # noqa: BLE001 - the server would answer 500
            out.append((500, [], type(exc).__name__.encode()))
        else:
            out.append(_comparable(response))
    return out


FAILURES = {
    "exporter raises a bug": lambda: {"exporter": RaisingExporter(RuntimeError("bug"))},
    "exporter permanent": lambda: {"exporter": RaisingExporter(PermanentExportError("400"))},
    "exporter retryable": lambda: {
        "exporter": RaisingExporter(RetryableExportError("down")),
        "queue": QueueConfig(retry=RetryPolicy(initial_backoff=0.001, max_attempts=2)),
    },
    "tracing sdk raises": lambda: {
        "exporter": RaisingExporter(RuntimeError("bug")),
        "tracer_provider": BrokenTracerProvider(),
    },
    "span processor raises on end": lambda: {
        "exporter": RaisingExporter(RuntimeError("bug")),
        "tracer_provider": _provider_with_a_raising_processor(),
    },
    "registry down": lambda: {
        "exporter": RaisingExporter(RuntimeError("bug")),
        "resolver": RaisingResolver(),
        "model_name": "m",
    },
}


@pytest.mark.parametrize("failure", FAILURES)
async def test_responses_are_byte_identical_to_telemetry_off(
    failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    expected = await _answers(model_app())
    app = model_app()
    settings = {"fingerprint_key": "reliability-key-01", "sample_rate": 1.0, **FAILURES[failure]()}
    runtime = instrument_app(app, MiddlewareConfig(**settings))
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                assert await _answers(app) == expected
            runtime.force_flush(5)
    finally:
        runtime.shutdown(2)
    stats = runtime.stats()
    assert stats["enqueued"] == len(REQUESTS) * 3  # one event per prediction, failures included
    assert stats["dropped"] == stats["enqueued"]  # and every one counted as dropped
    if failure == "tracing sdk raises":
        assert stats["error.span"] == len(REQUESTS) * 3
    if failure == "span processor raises on end":
        assert stats["error.span_end"] == len(REQUESTS) * 3
    # The same failure is logged once, not once per batch or request.
    messages = [r.getMessage() for r in caplog.records]
    assert all(messages.count(m) == 1 for m in set(messages) if "raised" in m or "error in" in m)


@pytest.mark.parametrize("telemetry", [False, True], ids=["body-read", "fastapi-telemetry"])
async def test_a_bug_in_feature_extraction_costs_the_features_only(
    telemetry: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A request shape nobody foresaw must not cost the event, the span or the id.
    def broken(*args: object) -> dict[str, float]:
        raise RuntimeError("feature extraction bug")

    monkeypatch.setattr(_prediction, "request_features", broken)
    spans = InMemorySpanExporter()
    provider = SdkTracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    settings = {"tracer_provider": provider, "metrics": False, "logs": False}
    app = model_app(settings if telemetry else None)
    events = InMemoryExporter()
    config = MiddlewareConfig(
        exporter=events,
        tracer_provider=provider,
        sample_rate=1.0,
        feature_allowlist=frozenset({"x"}),
        flush_tracer_provider=False,
    )
    runtime = instrument_app(app, config)
    try:
        body = json.dumps(REQUESTS[0]).encode()
        response = await call_asgi(app, "POST", "/v2/models/m/infer", body, HEADERS)
        runtime.force_flush(5)
    finally:
        runtime.shutdown(2)
    assert response.status == 200 and response.header("x-prediction-id") == "a-1"
    (event,) = events.events
    assert (event.prediction_id, event.features) == ("a-1", {})
    assert event.output is not None  # the rest of the event is whole
    traced = [s for s in spans.get_finished_spans() if s.attributes and s.attributes.get(PID)]
    assert [s.attributes.get(PID) for s in traced if s.attributes] == ["a-1"]
    assert runtime.stats()["error.features"] == 1
