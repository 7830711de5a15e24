"""SidecarGrpcExporter against a real gRPC server implementing predtrace.v1.Sidecar.

Status codes become the pipeline's errors at this boundary (DESIGN §4):
UNAVAILABLE / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED retry (honouring the
server's pushback), INVALID_ARGUMENT and the rest are permanent. RELIABILITY
rows 3, 4, 5 for sidecar mode.
"""

from __future__ import annotations

import socket

import grpc
import pytest

from predtrace.middleware import MiddlewareConfig, SidecarGrpcExporter, instrument_app
from predtrace.middleware.testing import RecordingSidecar, call_asgi, serve_sidecar
from predtrace.sidecar.pipeline import (
    OutgoingBatch,
    PermanentExportError,
    QueueConfig,
    RetryableExportError,
    RetryPolicy,
)
from predtrace.wire import ModelRef, OutputSummary, PredictionEvent, event_from_proto

pytestmark = pytest.mark.integration


def _events(n: int) -> list[PredictionEvent]:
    return [
        PredictionEvent(
            prediction_id=f"p{i}",
            trace_id=bytes(range(16)),
            span_id=bytes(range(8)),
            model=ModelRef("iris", "3"),
            output=OutputSummary(label="cat", score=0.5),
            features={"age": 41.0},
            sampled=True,
        )
        for i in range(n)
    ]


def test_batch_arrives_intact_and_accepted_count_is_returned() -> None:
    with serve_sidecar() as sidecar:
        exporter = SidecarGrpcExporter(sidecar.target)
        try:
            result = exporter.export(OutgoingBatch(_events(3)))
        finally:
            exporter.shutdown(1)
    assert result.accepted == 3 and result.rejected == ()
    assert [event_from_proto(e) for e in sidecar.events] == _events(3)


def test_batches_go_packed_and_a_sidecar_that_ignores_packed_events_gets_protobuf() -> None:
    with serve_sidecar() as sidecar:
        exporter = SidecarGrpcExporter(sidecar.target)
        try:
            exporter.export(OutgoingBatch(_events(3)))
        finally:
            exporter.shutdown(1)
    assert sidecar.packed_calls == 1
    old = RecordingSidecar(reads_packed=False)  # from before packed_events
    with serve_sidecar(old) as sidecar:
        exporter = SidecarGrpcExporter(sidecar.target)
        try:
            first = exporter.export(OutgoingBatch(_events(3)))
            second = exporter.export(OutgoingBatch(_events(2)))
        finally:
            exporter.shutdown(1)
    assert (first.accepted, second.accepted) == (3, 2)
    assert sidecar.prediction_ids == ["p0", "p1", "p2", "p0", "p1"]
    assert sidecar.calls == 3, "one packed try, then protobuf for good"


def test_a_batch_the_sidecar_accepts_none_of_stays_packed_not_sent_twice() -> None:
    everyone = RecordingSidecar(reject_ids=frozenset({"p0", "p1"}))
    with serve_sidecar(everyone) as sidecar:
        exporter = SidecarGrpcExporter(sidecar.target)
        try:
            result = exporter.export(OutgoingBatch(_events(2)))
            exporter.export(OutgoingBatch(_events(2)))
        finally:
            exporter.shutdown(1)
    assert result.accepted == 0 and [r.index for r in result.rejected] == [0, 1]
    assert (sidecar.calls, sidecar.packed_calls) == (2, 2)


def test_rejected_events_are_reported_with_index_and_id() -> None:
    with serve_sidecar(RecordingSidecar(reject_ids=frozenset({"p1"}))) as sidecar:
        exporter = SidecarGrpcExporter(sidecar.target)
        try:
            result = exporter.export(OutgoingBatch(_events(3)))
        finally:
            exporter.shutdown(1)
    assert result.accepted == 2
    assert [(r.index, r.prediction_id) for r in result.rejected] == [(1, "p1")]


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
    ],
)
def test_transient_codes_are_retryable(code: grpc.StatusCode) -> None:
    with serve_sidecar(RecordingSidecar(script=[code])) as sidecar:
        exporter = SidecarGrpcExporter(sidecar.target)
        try:
            with pytest.raises(RetryableExportError, match=code.name):
                exporter.export(OutgoingBatch(_events(1)))
        finally:
            exporter.shutdown(1)


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
    ],
)
def test_other_codes_are_permanent(code: grpc.StatusCode) -> None:
    with serve_sidecar(RecordingSidecar(script=[code])) as sidecar:
        exporter = SidecarGrpcExporter(sidecar.target)
        try:
            with pytest.raises(PermanentExportError, match=code.name):
                exporter.export(OutgoingBatch(_events(1)))
        finally:
            exporter.shutdown(1)


def test_server_pushback_becomes_retry_after() -> None:
    script = [(grpc.StatusCode.RESOURCE_EXHAUSTED, (("grpc-retry-pushback-ms", "2500"),))]
    with serve_sidecar(RecordingSidecar(script=script)) as sidecar:  # type: ignore[arg-type]
        exporter = SidecarGrpcExporter(sidecar.target)
        try:
            with pytest.raises(RetryableExportError) as caught:
                exporter.export(OutgoingBatch(_events(1)))
        finally:
            exporter.shutdown(1)
    assert caught.value.retry_after == 2.5


def test_nobody_listening_is_retryable_not_a_crash() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exporter = SidecarGrpcExporter(f"127.0.0.1:{port}", timeout=2.0)
    try:
        with pytest.raises(RetryableExportError, match="UNAVAILABLE"):
            exporter.export(OutgoingBatch(_events(1)))
    finally:
        exporter.shutdown(1)


def test_unreadable_tls_file_fails_at_startup_naming_the_path(tmp_path: object) -> None:
    from predtrace.middleware import ConfigError  # noqa: PLC0415

    with pytest.raises(ConfigError, match=r"missing\.pem"):
        SidecarGrpcExporter("127.0.0.1:1", tls_ca=f"{tmp_path}/missing.pem")


async def test_middleware_in_sidecar_mode_delivers_every_event_after_a_transient_outage() -> None:
    from fastapi import FastAPI  # noqa: PLC0415

    app = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False})

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, body: dict[str, object]) -> dict[str, object]:
        return {"model_name": name, "model_version": "1", "outputs": []}

    with serve_sidecar(RecordingSidecar(script=[grpc.StatusCode.UNAVAILABLE])) as sidecar:
        retry = RetryPolicy(initial_backoff=0.01, max_backoff=0.05)
        runtime = instrument_app(
            app,
            MiddlewareConfig(
                sidecar_target=sidecar.target,
                queue=QueueConfig(max_batch_size=5, schedule_delay=0.05, retry=retry),
            ),
        )
        try:
            ids = []
            for i in range(12):
                body = f'{{"id": "req-{i}", "inputs": []}}'.encode()
                response = await call_asgi(app, "POST", "/v2/models/iris/infer", body)
                ids.append(response.header("x-prediction-id"))
            assert runtime.force_flush(10)
        finally:
            runtime.shutdown(5)
    assert sorted(sidecar.prediction_ids) == sorted(ids) == sorted(f"req-{i}" for i in range(12))
    stats = runtime.stats()
    assert stats["exported"] == 12 and stats["retried"] >= 1 and stats["dropped"] == 0
