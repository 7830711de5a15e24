"""End to end through the sidecar, every part a real process on 127.0.0.1.

1. A FastAPI model server with the middleware -> sidecar (gRPC) -> collector.
2. An app using the OpenTelemetry SDK's OTLP exporter -> sidecar OTLP -> collector,
   and every span forwarded to a real OTLP backend (the MLflow tracking server).
3. An OIP v2 gRPC client -> the sidecar's OIP proxy -> the example model server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from predtrace.oip.v2 import grpc_predict_v2_pb2 as pb
from predtrace.oip.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.reliability.sidecar.polling import eventually_sync
from tests.reliability.sidecar.procs import (
    collector_available,
    get_prediction,
    running,
    start_collector,
    start_sidecar,
)

ROOT = Path(__file__).resolve().parents[3]
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not collector_available(), reason="predtrace collector serve missing"),
]


@pytest.fixture
def uvicorn_app(tmp_path: Path) -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(env: dict[str, str]) -> str:
        log = tmp_path / "uvicorn.log"
        args = [sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT / "examples/fastapi_server")]
        args += ["app:app", "--host", "127.0.0.1", "--port", "0"]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
            )
        procs.append(proc)
        found: list[str] = []

        def ready() -> bool:
            match = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", log.read_text())
            if match:
                found.append(match.group(1))
            assert proc.poll() is None, log.read_text()
            return bool(match)

        eventually_sync(ready, 30)
        return f"127.0.0.1:{found[0]}"

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def _infer(address: str, value: float) -> str:
    body = {"inputs": [{"name": "petal_length", "shape": [1], "datatype": "FP32", "data": [value]}]}
    request = urllib.request.Request(
        f"http://{address}/v2/models/iris/infer",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 - loopback
        assert resp.status == 200
        return str(resp.headers["x-prediction-id"])


def test_model_server_with_middleware_to_sidecar_to_collector(
    tmp_path: Path, uvicorn_app: object
) -> None:
    collector = start_collector(tmp_path)
    sidecar = start_sidecar(tmp_path, f"http://{collector.address}", "--producer-id", "pod-7")
    with running(collector, sidecar):
        model_server = uvicorn_app(  # type: ignore[operator]
            {
                "PREDTRACE_SIDECAR_TARGET": sidecar.address,
                "PREDTRACE_FINGERPRINT_KEY": "integration-test-key-of-some-length",
                "PREDTRACE_MODEL_VERSION": "3",
            }
        )
        ids = [_infer(model_server, 1.0 + i / 10) for i in range(10)]
        eventually_sync(lambda: all(get_prediction(collector.address, i) for i in ids), 30)
        row = get_prediction(collector.address, ids[0])
        assert row is not None
        assert row["model"]["name"] == "iris"
        assert row["model"]["version"] == "3"
        assert row["producer"]["id"] == "pod-7"
        assert sidecar.stop() == 0


def _mlflow_trace_ids(url: str) -> set[str]:
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/traces?experiment_ids=0", timeout=10) as r:  # noqa: S310 - loopback
        traces = json.loads(r.read()).get("traces", [])
    return {t["request_id"].removeprefix("tr-") for t in traces}


@pytest.mark.mlflow
def test_otel_sdk_app_to_sidecar_otlp_to_collector_and_to_a_real_otlp_backend(
    tmp_path: Path, mlflow_server: str
) -> None:
    collector = start_collector(tmp_path)
    sidecar = start_sidecar(
        tmp_path,
        f"http://{collector.address}",
        *("--otlp-listen", "127.0.0.1:0", "--otlp-export", f"{mlflow_server}/v1/traces"),
        *("--otlp-export-header", "x-mlflow-experiment-id=0"),
    )
    with running(collector, sidecar):
        provider = TracerProvider(resource=Resource.create({"service.name": "churn-api"}))
        exporter = OTLPSpanExporter(endpoint=sidecar.addresses["otlp-grpc"], insecure=True)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        tracer = provider.get_tracer("integration")
        trace_ids = []
        for i in range(5):
            with tracer.start_as_current_span("predict") as span:
                span.set_attribute("predtrace.prediction.id", f"otel-{i}")
                span.set_attribute("predtrace.model.name", "churn")
                span.set_attribute("predtrace.model.version", "4")
                trace_ids.append(f"{span.get_span_context().trace_id:032x}")
        with tracer.start_as_current_span("healthcheck") as span:
            trace_ids.append(f"{span.get_span_context().trace_id:032x}")
        provider.shutdown()
        ids = [f"otel-{i}" for i in range(5)]
        eventually_sync(lambda: all(get_prediction(collector.address, i) for i in ids), 30)
        row = get_prediction(collector.address, "otel-0")
        assert row is not None and row["model"]["version"] == "4"
        assert row["trace_id"] == trace_ids[0]
        eventually_sync(lambda: set(trace_ids) <= _mlflow_trace_ids(mlflow_server), 60)
        assert sidecar.stop() == 0


def test_oip_client_through_the_proxy_to_the_example_model_server(tmp_path: Path) -> None:
    collector = start_collector(tmp_path)
    ready = tmp_path / "model.ready"
    model = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples/oip_grpc_server/server.py"),
            "--listen",
            "127.0.0.1:0",
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        eventually_sync(ready.exists, 30)
        upstream = ready.read_text().strip()
        sidecar = start_sidecar(
            tmp_path, f"http://{collector.address}", "--oip-proxy", f"127.0.0.1:0={upstream}"
        )
        with running(collector, sidecar):
            with grpc.insecure_channel(sidecar.addresses["oip-proxy"]) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
                request = pb.ModelInferRequest(model_name="churn", id="oip-1")
                tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 3])
                tensor.contents.fp32_contents.extend([12.0, 70.5, 3.0])
                response = stub.ModelInfer(request, timeout=10)
                assert 0.0 < response.outputs[0].contents.fp32_contents[0] < 1.0
                assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
            eventually_sync(lambda: get_prediction(collector.address, "oip-1") is not None, 30)
            row = get_prediction(collector.address, "oip-1")
            assert row is not None
            assert (row["model"]["name"], row["model"]["version"]) == ("churn", "3")
            assert row["protocol"] == "oip-v2-grpc"
            assert sidecar.stop() == 0
    finally:
        model.send_signal(signal.SIGTERM)
        model.wait(20)
