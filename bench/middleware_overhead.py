"""Overhead of the predtrace middleware against OpenTelemetry's own FastAPI instrumentation.

In-process mode (default) drives the same FastAPI predict app (OIP v2 ``infer``,
pydantic body) through the raw ASGI interface, no network, and prints the
median µs/request of several interleaved runs for: bare; FastAPIInstrumentor;
FastAPI's built-in telemetry; a minimal one-span SDK middleware (the floor);
predtrace alone; predtrace on top of each of the two. Every span goes through
a BatchSpanProcessor whose exporter encodes OTLP protobuf and discards it, and
predtrace's events through its queue to an exporter that encodes the msgpack
batch (gzip'd, as sent to the collector) and discards it; each run includes
flushing both, so the export work is charged to the variant that caused it.

HTTP mode (``--http``) runs each variant under uvicorn on 127.0.0.1 with
``wrk`` (or a built-in aiohttp load generator) at 1 and 32 connections and
prints requests/s and p50/p99, then counts what is lost when uvicorn gets
SIGTERM right after 1,000 requests (stock OpenTelemetry set-up vs predtrace).
Spans and events go over HTTP to a recording collector in this process.

    python bench/middleware_overhead.py [--quick] [--http]

Ends with one line of JSON (name -> number).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mw_app import FloorMiddleware, make_app

from predtrace.middleware import MiddlewareConfig, PredictionRuntime, instrument_app
from predtrace.middleware.testing import (
    RecordingCollector,
    run_uvicorn,
    serve_collector,
)
from predtrace.sidecar.pipeline import ExportResult, OutgoingBatch, QueueConfig
from predtrace.wire import EventBatch, encode_events_payload, gzip_bytes

BENCH_DIR = str(Path(__file__).resolve().parent)
BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
).encode()
PATH = "/v2/models/iris/infer"
KEY = "bench-fingerprint-key-0123456789"


# -- in-process ---------------------------------------------------------------


class OtlpEncodingExporter(SpanExporter):
    """Encodes spans to OTLP protobuf, as the OTLP exporter would, then drops them."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        encode_spans(spans).SerializeToString()
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


class EncodingEventExporter:
    """Encodes each batch as the collector exporter does (msgpack, gzip), then drops it."""

    def __init__(self) -> None:
        self.events = 0
        self.seq = 0

    def export(self, batch: OutgoingBatch) -> ExportResult:
        self.seq += 1
        gzip_bytes(encode_events_payload(EventBatch("bench", self.seq, batch.events)))
        self.events += len(batch.events)
        return ExportResult(len(batch.events))

    def shutdown(self, timeout: float) -> None:
        """Nothing to release."""


class InProcess:
    """The variants of the in-process comparison, sharing one SDK TracerProvider."""

    def __init__(self) -> None:
        self.provider = TracerProvider()
        self.spans = OtlpEncodingExporter()
        # A queue larger than one run, so no span is dropped (a drop would look cheap).
        self.provider.add_span_processor(BatchSpanProcessor(self.spans, max_queue_size=65536))
        self.runtimes: dict[str, PredictionRuntime] = {}
        self.apps: dict[str, Any] = {}
        self._build()

    def _predtrace(self, name: str, app: Any) -> Any:
        config = MiddlewareConfig(
            exporter=EncodingEventExporter(),
            tracer_provider=self.provider,
            fingerprint_key=KEY,
            model_version="3",
            flush_tracer_provider=False,
            queue=QueueConfig(max_queue_size=65536),
        )
        runtime = instrument_app(app, config)
        runtime.start()  # what the app's lifespan startup does (driven here without one)
        self.runtimes[name] = runtime
        return app

    def _build(self) -> None:
        builtin = {"tracer_provider": self.provider, "metrics": False, "logs": False}
        self.apps["bare"] = make_app()
        self.apps["fastapi_instrumentor"] = make_app()
        FastAPIInstrumentor.instrument_app(
            self.apps["fastapi_instrumentor"], tracer_provider=self.provider
        )
        self.apps["fastapi_builtin"] = make_app(builtin)
        floor = make_app()
        floor.add_middleware(FloorMiddleware, tracer=self.provider.get_tracer("floor"))
        self.apps["floor"] = floor
        self.apps["predtrace"] = self._predtrace("predtrace", make_app())
        both = self._predtrace("predtrace+instrumentor", make_app())
        FastAPIInstrumentor.instrument_app(both, tracer_provider=self.provider)
        self.apps["predtrace+instrumentor"] = both
        self.apps["predtrace+builtin"] = self._predtrace("predtrace+builtin", make_app(builtin))

    async def run(self, name: str, requests: int) -> float:
        """µs/request for ``requests`` requests, including flushing the exports they caused."""
        app = self.apps[name]
        message = {"type": "http.request", "body": BODY, "more_body": False}
        headers = [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
        ]

        async def receive() -> dict[str, Any]:
            return message

        async def send(_: Any) -> None:
            return None

        start = time.perf_counter()
        for _ in range(requests):
            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": PATH,
                "raw_path": PATH.encode(),
                "query_string": b"",
                "root_path": "",
                "headers": headers,
                "client": ("127.0.0.1", 50000),
                "server": ("127.0.0.1", 8000),
            }
            await app(scope, receive, send)
        self.provider.force_flush()
        if name in self.runtimes:
            self.runtimes[name].force_flush(30)
        return (time.perf_counter() - start) / requests * 1e6

    def close(self) -> None:
        """Stop the pipelines and the span processor."""
        for runtime in self.runtimes.values():
            runtime.shutdown(5)
        self.provider.shutdown()


async def in_process(quick: bool) -> dict[str, float]:
    """Median µs/request of each variant over interleaved rounds."""
    bench = InProcess()
    rounds, requests = (3, 600) if quick else (7, 2000)
    names = list(bench.apps)
    for name in names:  # warm-up: imports, caches, first-request work
        await bench.run(name, 200)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no position bias
        for name in order:
            samples[name].append(await bench.run(name, requests))
    bench.close()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(f"in-process, raw ASGI: median µs/request of {rounds} interleaved runs of {requests}")
    for name, value in medians.items():
        extra = "" if name == "bare" else f"   (+{value - medians['bare']:.1f})"
        print(f"  {name:24s} {value:8.1f}{extra}")
    return medians


def in_process_ratios(m: dict[str, float]) -> dict[str, float]:
    """The three target ratios (and the built-in telemetry one)."""
    bare = m["bare"]
    ours = m["predtrace"] - bare
    ratios = {
        "vs_fastapi_instrumentor": ours / (m["fastapi_instrumentor"] - bare),
        "vs_floor": ours / (m["floor"] - bare),
        "on_top_of_instrumentor": (m["predtrace+instrumentor"] - m["fastapi_instrumentor"])
        / m["fastapi_instrumentor"],
        "on_top_of_builtin": (m["predtrace+builtin"] - m["fastapi_builtin"]) / m["fastapi_builtin"],
    }
    targets = {
        "vs_fastapi_instrumentor": "(predtrace - bare) / (instrumentor - bare), target <= 0.25",
        "vs_floor": "(predtrace - bare) / (one-span floor - bare), target <= 1.25",
        "on_top_of_instrumentor": "(both - instrumentor) / instrumentor, target <= 0.05",
        "on_top_of_builtin": "(both - FastAPI telemetry) / FastAPI telemetry",
    }
    for key, value in ratios.items():
        print(f"  {key:24s} {value:8.3f}   {targets[key]}")
    return ratios


# -- HTTP ---------------------------------------------------------------------

_LUA = """wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    """A wrk duration (``812.00us``, ``1.20ms``, ``1.01s``) in milliseconds."""
    found = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if found is None:
        print(f"  (unreadable wrk latency {text!r})")
        return float("nan")
    return float(found.group(1)) * _UNITS[found.group(2)]


def load_wrk(url: str, connections: int, seconds: float) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) measured by wrk."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_LUA.format(body=BODY.decode()))
    threads = 1 if connections == 1 else 2
    try:
        out = subprocess.run(
            [
                "wrk",
                f"-t{threads}",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                script.name,
                url + PATH,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 30,
        ).stdout
    finally:
        os.unlink(script.name)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE)
    if rps is None or p50 is None or p99 is None:
        raise RuntimeError(f"unreadable wrk output:\n{out}")
    return float(rps.group(1)), _ms(p50.group(1)), _ms(p99.group(1))


def load_aiohttp(url: str, connections: int, seconds: float) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) from a small aiohttp client pool (when wrk is missing)."""
    import aiohttp  # noqa: PLC0415

    async def run() -> list[float]:
        latencies: list[float] = []
        deadline = time.monotonic() + seconds
        connector = aiohttp.TCPConnector(limit=connections)
        headers = {"content-type": "application/json"}
        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker() -> None:
                while time.monotonic() < deadline:
                    t0 = time.perf_counter()
                    async with session.post(url + PATH, data=BODY, headers=headers) as resp:
                        await resp.read()
                    latencies.append((time.perf_counter() - t0) * 1e3)

            await asyncio.gather(*(worker() for _ in range(connections)))
        return latencies

    latencies = sorted(asyncio.run(run()))
    return (
        len(latencies) / seconds,
        latencies[len(latencies) // 2],
        latencies[int(len(latencies) * 0.99)],
    )


def _env(variant: str, sink: str) -> dict[str, str]:
    env = {"BENCH_VARIANT": variant, "BENCH_SINK": sink, "OTEL_SERVICE_NAME": "bench"}
    if variant.startswith("predtrace"):
        env |= {
            "PREDTRACE_COLLECTOR_URL": sink,
            "PREDTRACE_FINGERPRINT_KEY": KEY,
            "PREDTRACE_MODEL_VERSION": "3",
        }
    return env


def http_throughput(quick: bool) -> dict[str, float]:
    """Requests/s and latency of each variant under uvicorn at 1 and 32 connections.

    Every variant's server runs for the whole measurement (idle while another
    is loaded) and the variants take turns, round after round, in rotating
    order: a slow spell of the machine hits them all alike. Each figure is
    the median over the rounds.
    """
    load: Callable[[str, int, float], tuple[float, float, float]] = (
        load_wrk if shutil.which("wrk") else load_aiohttp
    )
    rounds, seconds = (2, 1.5) if quick else (3, 5.0)
    variants = ("bare", "otel", "floor", "predtrace", "predtrace_events_only")
    samples: dict[str, list[tuple[float, float, float]]] = {}
    print(
        f"HTTP, uvicorn + {load.__name__.removeprefix('load_')}, "
        f"median of {rounds} interleaved runs of {seconds:g}s per point"
    )
    with contextlib.ExitStack() as stack:
        servers = {}
        for variant in variants:
            sink = stack.enter_context(serve_collector())
            servers[variant] = stack.enter_context(
                run_uvicorn(
                    "_mw_app:app",
                    app_dir=BENCH_DIR,
                    env=_env(variant, sink.url),
                    ready_path="/health",
                )
            )
        for server in servers.values():
            for connections in (1, 32):
                load(server.url, connections, 1.0)  # warm-up
        for r in range(rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for variant in order:
                for connections in (1, 32):
                    key = f"{variant}_c{connections}"
                    samples.setdefault(key, []).append(
                        load(servers[variant].url, connections, seconds)
                    )
        for server in servers.values():
            server.terminate()
    figures: dict[str, float] = {}
    for variant in variants:
        for connections in (1, 32):
            runs = samples[f"{variant}_c{connections}"]
            rps, p50, p99 = (statistics.median(run[i] for run in runs) for i in range(3))
            figures[f"http_{variant}_c{connections}_rps"] = rps
            figures[f"http_{variant}_c{connections}_p50_ms"] = p50
            figures[f"http_{variant}_c{connections}_p99_ms"] = p99
            print(
                f"  {variant:22s} c={connections:<3d} {rps:9.0f} req/s   "
                f"p50 {p50:7.2f} ms   p99 {p99:7.2f} ms"
            )
    for connections in (1, 32):
        bare = figures[f"http_bare_c{connections}_rps"]
        for variant in variants[1:]:
            ratio = figures[f"http_{variant}_c{connections}_rps"] / bare
            figures[f"http_{variant}_vs_bare_c{connections}"] = ratio
        print(
            f"  c={connections:<3d} requests/s vs bare: stock OTel "
            f"{figures[f'http_otel_vs_bare_c{connections}']:.2f}x, one-span floor "
            f"{figures[f'http_floor_vs_bare_c{connections}']:.2f}x, predtrace "
            f"{figures[f'http_predtrace_vs_bare_c{connections}']:.2f}x (target >= 0.8x), "
            "predtrace without span export "
            f"{figures[f'http_predtrace_events_only_vs_bare_c{connections}']:.2f}x"
        )
    return figures


def sigterm_loss(requests: int = 1000) -> dict[str, float]:
    """Spans and events lost when uvicorn gets SIGTERM right after ``requests`` requests."""
    figures: dict[str, float] = {}
    print(f"SIGTERM right after {requests} requests (uvicorn, default settings)")
    for variant in ("otel", "predtrace"):
        with (
            serve_collector(RecordingCollector()) as sink,
            run_uvicorn(
                "_mw_app:app",
                app_dir=BENCH_DIR,
                env=_env(variant, sink.url),
                ready_path="/health",
            ) as server,
        ):
            with httpx.Client(base_url=server.url) as client:
                for _ in range(requests):
                    client.post(PATH, content=BODY, headers={"content-type": "application/json"})
            code, _ = server.terminate(timeout=60)
            spans = sum(
                1 for name in sink.server_spans if "/infer" in name or name.startswith("predict")
            )
            spans_lost = requests - spans
            figures[f"sigterm_{variant}_spans_lost"] = spans_lost
            line = f"  {variant:10s} exit {code}: spans lost {spans_lost} of {requests}"
            if variant == "predtrace":
                events_lost = requests - len(set(sink.snapshot_ids()))
                figures["sigterm_predtrace_events_lost"] = events_lost
                line += f", events lost {events_lost} of {requests} (target 0)"
            print(line)
    return figures


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark; print the figures and one final JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs (< 1 minute)")
    parser.add_argument("--http", action="store_true", help="uvicorn + load generator mode")
    args = parser.parse_args(argv)
    figures: dict[str, float] = {}
    if args.http:
        figures |= http_throughput(args.quick)
        figures |= sigterm_loss()
    else:
        medians = asyncio.run(in_process(args.quick))
        figures |= {f"us_{k}": v for k, v in medians.items()}
        figures |= in_process_ratios(medians)
    print(json.dumps({k: round(v, 4) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
