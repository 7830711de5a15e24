"""RELIABILITY row 33: PII in inputs, features, attributes, headers and errors.

With empty allow-lists nothing but the keyed fingerprint is derived from the
input: the raw values are never in the exported batch bytes (direct mode, to
a real HTTP collector), in the spans, or in the logs.
"""

from __future__ import annotations

import gzip
import json
import logging
from typing import Any

import pytest
from fastapi import FastAPI
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from predtrace.middleware import MiddlewareConfig, current_prediction, instrument_app
from predtrace.middleware.testing import call_asgi, serve_collector
from predtrace.sidecar.pipeline import QueueConfig

from .conftest import TELEMETRY_OFF

PII = ["Alice Example", "alice@example.com", "078-05-1120", "4111111111111111", "ssn_number"]


def _pii_app() -> FastAPI:
    app = FastAPI(telemetry=TELEMETRY_OFF)

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, body: dict[str, Any]) -> dict[str, Any]:
        p = current_prediction()
        p.record_features({"ssn_number": 78051120.0, "age": 41.0})
        p.set_attribute("email", "alice@example.com")
        p.set_model(name=name, version="1")
        if name == "crash":
            raise ValueError(f"cannot score Alice Example / {body['inputs'][1]['data'][0]}")
        return {"model_name": name, "outputs": [{"name": "score", "data": [0.1]}]}

    return app


BODY = {
    "inputs": [
        {"name": "name", "shape": [1], "datatype": "BYTES", "data": ["Alice Example"]},
        {"name": "ssn_number", "shape": [1], "datatype": "BYTES", "data": ["078-05-1120"]},
        {"name": "card", "shape": [1], "datatype": "BYTES", "data": ["4111111111111111"]},
        {"name": "age", "shape": [1], "datatype": "FP32", "data": [41]},
    ]
}
HEADERS = [
    ("content-type", "application/json"),
    ("authorization", "Bearer alice@example.com"),
    ("x-user", "Alice Example"),
]


async def test_no_raw_input_leaves_the_process(caplog: pytest.LogCaptureFixture) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    app = _pii_app()
    with serve_collector() as collector, caplog.at_level(logging.DEBUG):
        runtime = instrument_app(
            app,
            MiddlewareConfig(
                collector_url=collector.url,
                fingerprint_key="pii-test-key-0123",
                sample_rate=1.0,
                tracer_provider=provider,
                flush_tracer_provider=False,
                queue=QueueConfig(schedule_delay=0.05),
            ),
        )
        try:
            body = json.dumps(BODY).encode()
            await call_asgi(app, "POST", "/v2/models/score/infer", body, HEADERS)
            # The server answers 500; the exception message never reaches telemetry.
            with pytest.raises(ValueError, match="Alice"):
                await call_asgi(app, "POST", "/v2/models/crash/infer", body, HEADERS)
            assert runtime.force_flush(10)
        finally:
            runtime.shutdown(5)
        exported = b"".join(
            gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body for body in collector.bodies
        )
    assert len(collector.prediction_ids) == 2
    span_bytes = encode_spans(spans.get_finished_spans()).SerializeToString()
    for secret in PII:
        assert secret.encode() not in exported, secret
        assert secret.encode() not in span_bytes, secret
        assert secret not in caplog.text, secret
    assert b"age" not in exported  # not allow-listed either: no feature at all
    assert b"score" in exported or b"crash" in exported  # the model names did go out
