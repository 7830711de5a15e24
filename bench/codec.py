"""Benchmark of the msgpack batch codec against OTLP protobuf for the same content.

Prints events/s for encode and decode of a 512-event batch, bytes per event
with and without gzip, and OTLP protobuf bytes per span for spans carrying the
same information as attributes (encoded by the OpenTelemetry SDK's own OTLP
encoder). Ends with one line of JSON.

    python bench/codec.py [--quick]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import time
from collections.abc import Callable

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from predtrace.wire import (
    DeploymentRef,
    EventBatch,
    ModelRef,
    OutputSummary,
    PredictionEvent,
    Status,
    decode_batch,
    encode_batch,
    new_prediction_id,
)

BATCH = 512
DEPLOYMENT = DeploymentRef(
    id="churn-prod-7f9c",
    service="churn-svc",
    namespace="prod",
    pod="churn-svc-7f9c6d5b8-x2x4q",
    node="node-12",
    image_digest="sha256:" + "ab" * 32,
)


def make_events(rng: random.Random) -> list[PredictionEvent]:
    """512 realistic events: ids, model, deployment, fingerprint, output, 4 features."""
    now = time.time_ns()
    return [
        PredictionEvent(
            prediction_id=new_prediction_id(),
            trace_id=rng.randbytes(16),
            span_id=rng.randbytes(8),
            timestamp_unix_nano=now + i * 1_000_000,
            duration_nanos=rng.randint(200_000, 5_000_000),
            model=ModelRef("churn", "7", "champion"),
            deployment=DEPLOYMENT,
            endpoint="/v2/models/churn/infer",
            protocol="oip-v2-rest",
            status=Status.OK,
            status_code="200",
            input_fingerprint=rng.randbytes(32),
            output=OutputSummary(label="churn", score=round(rng.random(), 4)),
            features={f"f{k}": round(rng.uniform(0, 100), 3) for k in range(4)},
            sampled=True,
        )
        for i in range(BATCH)
    ]


def make_otlp_spans(events: list[PredictionEvent]) -> list[ReadableSpan]:
    """The same information as OTLP spans made by the SDK (attributes on a server span)."""
    exporter = InMemorySpanExporter()
    resource = Resource.create(
        {
            "service.name": DEPLOYMENT.service,
            "k8s.namespace.name": DEPLOYMENT.namespace,
            "k8s.pod.name": DEPLOYMENT.pod,
            "k8s.node.name": DEPLOYMENT.node,
            "container.image.id": DEPLOYMENT.image_digest,
        }
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("bench")
    for e in events:
        output = e.output or OutputSummary()
        attributes: dict[str, str | float | bool] = {
            "predtrace.prediction.id": e.prediction_id,
            "predtrace.model.name": e.model.name,
            "predtrace.model.version": e.model.version,
            "predtrace.model.alias": e.model.alias,
            "predtrace.deployment.id": DEPLOYMENT.id,
            "predtrace.inference.protocol": e.protocol,
            "http.route": e.endpoint,
            "http.response.status_code": 200,
            "predtrace.input.fingerprint": e.input_fingerprint.hex(),
            "predtrace.output.label": output.label or "",
            "predtrace.output.score": output.score or 0.0,
            **{f"predtrace.feature.{k}": v for k, v in e.features.items()},
        }
        with tracer.start_as_current_span(
            "predict churn", kind=SpanKind.SERVER, attributes=attributes
        ):
            pass
    provider.shutdown()
    return list(exporter.get_finished_spans())


def best_rate(fn: Callable[[], object], rounds: int) -> float:
    """Events per second of the median of ``rounds`` timed runs of ``fn``."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return BATCH / statistics.median(times)


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a few seconds)")
    args = parser.parse_args()
    rounds = 15 if args.quick else 60
    rng = random.Random(42)
    events = make_events(rng)
    batch = EventBatch("bench-producer", 1, events, rng.randbytes(16), time.time_ns())
    plain = encode_batch(batch)
    packed = encode_batch(batch, compress=True)
    spans = make_otlp_spans(events)
    otlp = encode_spans(spans).SerializeToString()
    otlp_gz = gzip.compress(otlp)

    figures = {
        "encode_events_per_s": best_rate(lambda: encode_batch(batch), rounds),
        "encode_gzip_events_per_s": best_rate(lambda: encode_batch(batch, compress=True), rounds),
        "decode_events_per_s": best_rate(lambda: decode_batch(plain), rounds),
        "decode_gzip_events_per_s": best_rate(lambda: decode_batch(packed), rounds),
        "bytes_per_event": len(plain) / BATCH,
        "bytes_per_event_gzip": len(packed) / BATCH,
        "otlp_bytes_per_span": len(otlp) / BATCH,
        "otlp_bytes_per_span_gzip": len(otlp_gz) / BATCH,
    }
    figures["bytes_ratio_vs_otlp"] = (
        figures["bytes_per_event_gzip"] / figures["otlp_bytes_per_span"]
    )
    figures["bytes_ratio_vs_otlp_gzip"] = (
        figures["bytes_per_event_gzip"] / figures["otlp_bytes_per_span_gzip"]
    )
    print(f"batch of {BATCH} events, median of {rounds} rounds")
    print(f"  encode          {figures['encode_events_per_s']:>12,.0f} events/s")
    print(f"  encode + gzip   {figures['encode_gzip_events_per_s']:>12,.0f} events/s")
    print(f"  decode          {figures['decode_events_per_s']:>12,.0f} events/s")
    print(f"  gunzip + decode {figures['decode_gzip_events_per_s']:>12,.0f} events/s")
    print(f"  msgpack         {figures['bytes_per_event']:>8.1f} bytes/event")
    print(f"  msgpack + gzip  {figures['bytes_per_event_gzip']:>8.1f} bytes/event")
    print(f"  OTLP protobuf   {figures['otlp_bytes_per_span']:>8.1f} bytes/span (same content)")
    print(f"  OTLP + gzip     {figures['otlp_bytes_per_span_gzip']:>8.1f} bytes/span")
    print(
        f"  ratio (msgpack+gzip / OTLP protobuf) = {figures['bytes_ratio_vs_otlp']:.3f}"
        "  (target <= 0.2)"
    )
    print(f"  ratio (msgpack+gzip / OTLP+gzip)     = {figures['bytes_ratio_vs_otlp_gzip']:.3f}")
    print(json.dumps({k: round(v, 3) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
