"""Sidecar benchmark: end-to-end events/s beside the OpenTelemetry SDK's OTLP spans/s.

Measures in one run, on this machine:

* events/s end to end (producer encode -> sidecar gRPC -> spool fsync ->
  shipper -> collector commit; the producer packs its events as msgpack in
  ``RecordBatchRequest.packed_events``, as the client library does), beside
  the OTel SDK's spans/s (span creation -> BatchSpanProcessor -> OTLP gRPC
  exporter, default settings) into a counting OTLP receiver; loss of each.
  Both sides start from the same in-memory content (predtrace events; spans
  carrying it as attributes) and both time their producer's encoding.
  ``vs_otel`` = predtrace events committed per second (every id checked in
  the store) / OTLP spans received per second (first span started to last
  span received);
* compressed bytes per event as the shipper sends them, beside OTLP protobuf
  bytes per span for the same content (the SDK's own encoder);
* the sidecar's RSS while it takes 20,000 events/s;
* time to drain 1,000,000 spooled events to the collector after an outage;
* the latency the OIP v2 proxy adds to a ModelInfer call.

    python bench/sidecar_throughput.py [--quick]

Every server is a subprocess on 127.0.0.1 port 0. Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
from codec import (  # the sibling benchmark's data (bench/ on sys.path)
    DEPLOYMENT,
    make_events,
    make_otlp_spans,
)
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind

from predtrace.oip.v2 import grpc_predict_v2_pb2 as pb
from predtrace.sidecar._batch import assemble_payload, encode_event
from predtrace.sidecar.spool import Spool, SpoolConfig
from predtrace.v1 import sidecar_pb2
from predtrace.wire import PredictionEvent, gzip_bytes, new_prediction_id, pack_events

ROOT = Path(__file__).resolve().parents[1]
RESOURCE = {  # the resource of make_otlp_spans: the deployment the events carry
    "service.name": DEPLOYMENT.service,
    "k8s.namespace.name": DEPLOYMENT.namespace,
    "k8s.pod.name": DEPLOYMENT.pod,
    "k8s.node.name": DEPLOYMENT.node,
    "container.image.id": DEPLOYMENT.image_digest,
}
PREDTRACE = shutil.which("predtrace") or str(Path(sys.executable).with_name("predtrace"))


# -- processes -----------------------------------------------------------------------


class Server:
    """A subprocess with a ready file (first line host:port, then 'name host:port')."""

    def __init__(self, args: Sequence[str], ready: Path, log: Path) -> None:
        ready.unlink(missing_ok=True)
        self.ready = ready
        with log.open("ab") as out:
            self.proc = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not (ready.exists() and ready.read_text().endswith("\n")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{args[1:3]} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.02)
        lines = ready.read_text().splitlines()
        self.address = lines[0].strip()
        self.addresses = dict(line.split(" ", 1) for line in lines[1:])
        self.db = Path()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cpu_s(self) -> float:
        """User + system CPU seconds the process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0


def collector(tmp: Path, listen: str = "127.0.0.1:0") -> Server:
    db = tmp / f"collector-{time.monotonic_ns()}.db"
    args = [PREDTRACE, "collector", "serve", "--db", f"sqlite:///{db}", "--listen", listen]
    server = Server([*args, "--ready-file", str(tmp / "c.ready")], tmp / "c.ready", tmp / "c.log")
    server.db = db
    return server


def sidecar(tmp: Path, collector_url: str, spool: Path, *extra: str) -> Server:
    args = [PREDTRACE, "sidecar", "serve", "--listen", "127.0.0.1:0", "--collector", collector_url]
    args += ["--spool", str(spool), "--ready-file", str(tmp / "s.ready"), *extra]
    return Server(args, tmp / "s.ready", tmp / "s.log")


def stored(collector_address: str) -> int:
    """Events the collector committed (``GET /v1/producers``)."""
    url = f"http://{collector_address}/v1/producers"
    with urllib.request.urlopen(url, timeout=30) as resp:
        return sum(int(p["events"]) for p in json.loads(resp.read())["producers"])


def wait_stored(collector_address: str, n: int, limit: float = 600) -> float:
    """Seconds until the collector holds ``n`` events (polled)."""
    start = time.perf_counter()
    while stored(collector_address) < n:
        if time.perf_counter() - start > limit:
            raise SystemExit(f"only {stored(collector_address)} of {n} stored after {limit} s")
        time.sleep(0.05)
    return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- data ------------------------------------------------------------------------------


def prediction_events(n: int) -> list[PredictionEvent]:
    """``n`` realistic events with distinct prediction ids."""
    template = make_events(random.Random(7))
    events = []
    for k in range(n):
        event = copy.copy(template[k % len(template)])
        event.prediction_id = new_prediction_id()
        events.append(event)
    return events


def encode_request(events: Sequence[PredictionEvent]) -> bytes:
    """A serialized RecordBatch request, as the client library builds it (packed events)."""
    return sidecar_pb2.RecordBatchRequest(packed_events=pack_events(events)).SerializeToString()


def requests(n: int, per_request: int) -> list[bytes]:
    """Serialized RecordBatch requests carrying ``n`` realistic, distinct events."""
    events = prediction_events(n)
    return [encode_request(events[i : i + per_request]) for i in range(0, n, per_request)]


def send_all(
    target: str, events: Sequence[PredictionEvent], per_request: int, threads: int = 2
) -> int:
    """Encode and send every event (spread over threads); return events acknowledged.

    Encoding is timed with the sending, as span creation and OTLP encoding are
    on the OTel side.
    """
    acked = [0] * threads
    chunks = [events[i : i + per_request] for i in range(0, len(events), per_request)]

    def work(k: int) -> None:
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary("/predtrace.v1.Sidecar/RecordBatch")
            for chunk in chunks[k::threads]:
                ack = sidecar_pb2.RecordAck.FromString(call(encode_request(chunk), timeout=60))
                acked[k] += ack.accepted

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(acked)


def missing_ids(db: Path, ids: Sequence[str]) -> int:
    """How many of ``ids`` the collector's SQLite store does not hold (read after it stopped)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        stored_ids = {row[0] for row in conn.execute("SELECT prediction_id FROM predictions")}
    return sum(1 for i in ids if i not in stored_ids)


# -- 1. bytes --------------------------------------------------------------------------


def bytes_figures() -> dict[str, float]:
    """The shipper's compressed bytes per event vs the SDK's OTLP bytes per span."""
    events = make_events(random.Random(42))
    payload = assemble_payload(
        producer_id="sidecar-bench-7f9c",
        seq=123,
        created_at_unix_nano=time.time_ns(),
        prev_digest=b"\x01" * 32,
        events=[encode_event(e) for e in events],
    )
    ours = len(gzip_bytes(payload)) / len(events)
    otlp = len(encode_spans(make_otlp_spans(events)).SerializeToString()) / len(events)
    return {"bytes_per_event": ours, "otlp_bytes_per_span": otlp, "bytes_ratio": ours / otlp}


# -- 2. the OpenTelemetry SDK anchor ---------------------------------------------------


def otlp_sink(port_file: str) -> None:
    """A counting OTLP/gRPC receiver (run as a subprocess of this script).

    Writes ``count last`` to ``<port_file>.count``: spans received, and the
    system-wide monotonic time at which the last of them arrived.
    """
    count, last = 0, 0.0

    class Sink(trace_service_pb2_grpc.TraceServiceServicer):
        async def Export(self, request, context):  # type: ignore[no-untyped-def]
            nonlocal count, last
            count += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            last = time.monotonic()
            return trace_service_pb2.ExportTraceServiceResponse()

    async def serve() -> None:
        server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await asyncio.to_thread(Path(port_file).write_text, f"127.0.0.1:{port}\n")
        while True:
            await asyncio.sleep(0.05)
            await asyncio.to_thread(Path(port_file + ".count").write_text, f"{count} {last}")

    asyncio.run(serve())


def span_attributes(events: Sequence[PredictionEvent]) -> list[dict[str, str | float | bool]]:
    """Per event, the span attributes carrying its content (as ``make_otlp_spans`` does)."""
    return [
        {
            "predtrace.prediction.id": e.prediction_id,
            "predtrace.model.name": e.model.name,
            "predtrace.model.version": e.model.version,
            "predtrace.model.alias": e.model.alias,
            "predtrace.deployment.id": e.deployment.id,
            "predtrace.inference.protocol": e.protocol,
            "http.route": e.endpoint,
            "http.response.status_code": 200,
            "predtrace.input.fingerprint": e.input_fingerprint.hex(),
            "predtrace.output.label": (e.output and e.output.label) or "",
            "predtrace.output.score": (e.output and e.output.score) or 0.0,
            **{f"predtrace.feature.{k}": v for k, v in e.features.items()},
        }
        for e in events
    ]


def _sink_count(count_file: Path) -> tuple[int, float]:
    text = count_file.read_text() if count_file.exists() else ""
    if not text:
        return 0, 0.0
    count, last = text.split()
    return int(count), float(last)


def otel_anchor(tmp: Path, n: int) -> dict[str, float]:
    """Spans/s the OTel SDK delivers over OTLP (default BatchSpanProcessor), and its drops.

    The spans carry the same content as predtrace's events (attributes and
    resource as in ``make_otlp_spans``), the producer offers them as fast as
    it can, and the rate is spans received by the sink divided by the time
    from the first span started to the last span received.
    """
    port_file = tmp / "sink.ready"
    sink = subprocess.Popen([sys.executable, __file__, "--otlp-sink", str(port_file)])
    try:
        while not port_file.exists():
            time.sleep(0.02)
        target = port_file.read_text().strip()
        provider = TracerProvider(resource=Resource.create(RESOURCE))
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=target, insecure=True))
        )
        tracer = provider.get_tracer("bench")
        attributes = span_attributes(make_events(random.Random(11)))
        start = time.monotonic()
        for i in range(n):
            with tracer.start_as_current_span(
                "predict churn", kind=SpanKind.SERVER, attributes=attributes[i % len(attributes)]
            ):
                pass
        provider.shutdown()
        count_file = Path(str(port_file) + ".count")
        (received, last), previous = _sink_count(count_file), (-1, 0.0)
        while (received, last) != previous:  # until the count settles
            previous = (received, last)
            time.sleep(0.3)
            received, last = _sink_count(count_file)
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait(10)
    elapsed = last - start
    return {"otel_spans_per_s": received / elapsed, "otel_offered": n, "otel_lost": n - received}


# -- 3. predtrace end to end, and RSS at 20k/s ----------------------------------------


def py_spy(server: Server, out: Path) -> subprocess.Popen[bytes]:
    """``py-spy record`` of ``server`` into ``out`` (raw collapsed stacks), until it exits."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    args = [spy, "record", "-p", str(server.proc.pid), "-f", "raw", "-r", "200", "--threads"]
    proc = subprocess.Popen([*args, "-o", str(out)], stdout=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the first event
    return proc


def end_to_end(tmp: Path, n: int, profile: Path | None = None) -> dict[str, float]:
    """Events/s producer -> sidecar -> spool -> collector commit, and loss.

    Timed from the first event encoded by the producer to the last one
    committed by the collector; loss is checked id by id in the store. Also
    the CPU each process spent per event (where a faster pipeline must save).
    With ``profile``, py-spy samples the sidecar and the collector into
    ``sidecar.raw`` and ``collector.raw`` there (it costs them CPU).
    """
    events = prediction_events(n)
    c = collector(tmp)
    s = sidecar(tmp, f"http://{c.address}", tmp / "spool-e2e")
    spies = []
    if profile is not None:
        spies = [py_spy(s, profile / "sidecar.raw"), py_spy(c, profile / "collector.raw")]
    try:
        cpu0 = (time.process_time(), s.cpu_s(), c.cpu_s())
        start = time.perf_counter()
        acked = send_all(s.address, events, 1000)
        producer_cpu = time.process_time() - cpu0[0]
        wait_stored(c.address, acked)
        elapsed = time.perf_counter() - start
        sidecar_cpu, collector_cpu = s.cpu_s() - cpu0[1], c.cpu_s() - cpu0[2]
        duplicates = stored(c.address) - acked
    finally:
        s.stop()
        c.stop()
        for spy in spies:
            spy.wait(60)
    lost = missing_ids(c.db, [e.prediction_id for e in events])
    return {
        "events_per_s": acked / elapsed,
        "e2e_events": acked,
        "e2e_lost": lost,  # every sent id missing from the store, acked or not
        "e2e_duplicates": max(0, duplicates),
        "cpu_us_producer": producer_cpu / acked * 1e6,
        "cpu_us_sidecar": sidecar_cpu / acked * 1e6,
        "cpu_us_collector": collector_cpu / acked * 1e6,
    }


def rss_at_rate(tmp: Path, rate: int, seconds: float) -> dict[str, float]:
    """Peak sidecar RSS while a paced producer sends ``rate`` events/s for ``seconds``."""
    per_request = 500
    bodies = requests(int(rate * seconds), per_request)
    c = collector(tmp)
    s = sidecar(tmp, f"http://{c.address}", tmp / "spool-rss")
    peak = 0.0
    try:
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, s.rss_mb())
                time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        interval = per_request / rate
        with grpc.insecure_channel(s.address) as channel:
            call = channel.unary_unary("/predtrace.v1.Sidecar/RecordBatch")
            start = time.perf_counter()
            for k, body in enumerate(bodies):
                delay = start + k * interval - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                call(body, timeout=60)
            achieved = len(bodies) * per_request / (time.perf_counter() - start)
        wait_stored(c.address, len(bodies) * per_request)
        done.set()
        sampler.join()
    finally:
        s.stop()
        c.stop()
    return {"rss_mb": peak, "rss_rate": achieved}


# -- 4. drain after an outage ----------------------------------------------------------


def drain(tmp: Path, n: int) -> dict[str, float]:
    """Seconds to deliver ``n`` events already in the spool when the collector returns."""
    spool_dir = tmp / "spool-drain"
    spool = Spool.open(SpoolConfig(directory=str(spool_dir)))
    template = [encode_event(e) for e in make_events(random.Random(3))]
    chunk = 10_000
    for start in range(0, n, chunk):
        spool.append_sync([template[i % len(template)] for i in range(start, start + chunk)])
    spool.close()
    (spool_dir / "producer_id").write_text("bench-edge-device\n")
    c = collector(tmp)
    start = time.perf_counter()
    edge = ("--edge", "--producer-id", "bench-edge-device")
    s = sidecar(tmp, f"http://{c.address}", spool_dir, *edge)
    try:
        wait_stored(c.address, n, limit=900)
        elapsed = time.perf_counter() - start
    finally:
        s.stop()
        c.stop()
    return {"drain_events": n, "drain_measured_s": elapsed}


# -- 5. OIP proxy latency --------------------------------------------------------------


def oip_latency(tmp: Path, calls: int) -> dict[str, float]:
    """Median ModelInfer latency direct vs through the proxy; the difference in µs."""
    ready = tmp / "oip.ready"
    model = subprocess.Popen(
        [
            *(sys.executable, str(ROOT / "examples/oip_grpc_server/server.py")),
            *("--listen", "127.0.0.1:0", "--ready-file", str(ready)),
        ],
        stdout=subprocess.DEVNULL,
    )
    c = collector(tmp)
    try:
        while not ready.exists():
            time.sleep(0.02)
        upstream = ready.read_text().strip()
        s = sidecar(
            tmp, f"http://{c.address}", tmp / "spool-oip", "--oip-proxy", f"127.0.0.1:0={upstream}"
        )
        request = pb.ModelInferRequest(model_name="churn")
        tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 3])
        tensor.contents.fp32_contents.extend([12.0, 70.5, 3.0])
        body = request.SerializeToString()
        direct, proxied = [], []
        proxy = s.addresses["oip-proxy"]
        with grpc.insecure_channel(upstream) as d, grpc.insecure_channel(proxy) as p:
            method = "/inference.GRPCInferenceService/ModelInfer"
            call_d, call_p = d.unary_unary(method), p.unary_unary(method)
            for _ in range(50):  # warm up both paths
                call_d(body)
                call_p(body)
            for _ in range(calls):
                t = time.perf_counter_ns()
                call_d(body)
                direct.append(time.perf_counter_ns() - t)
                t = time.perf_counter_ns()
                call_p(body)
                proxied.append(time.perf_counter_ns() - t)
        s.stop()
    finally:
        c.stop()
        model.send_signal(signal.SIGTERM)
        model.wait(10)
    d_us, p_us = statistics.median(direct) / 1000, statistics.median(proxied) / 1000
    return {"oip_direct_us": d_us, "oip_proxied_us": p_us, "oip_proxy_added_us": p_us - d_us}


# -- main ------------------------------------------------------------------------------


def main() -> None:
    """Run every part and print the figures, then one line of JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer events (under a minute)")
    parser.add_argument("--otlp-sink", help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile",
        metavar="DIR",
        type=Path,
        help="only the end-to-end part, with py-spy sampling the sidecar and the collector "
        "into DIR/sidecar.raw and DIR/collector.raw (figures are then not comparable)",
    )
    args = parser.parse_args()
    if args.otlp_sink:
        otlp_sink(args.otlp_sink)
        return
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="predtrace-bench-") as name:
            figures = end_to_end(Path(name), 100_000, args.profile)
        print(json.dumps({k: round(v, 3) for k, v in figures.items()}))
        return
    sizes = {
        "otel": 20_000 if args.quick else 50_000,
        "e2e": 100_000 if args.quick else 300_000,
        "rss_s": 4.0 if args.quick else 15.0,
        "drain": 200_000 if args.quick else 1_000_000,
        "oip": 300 if args.quick else 2000,
    }
    print(f"sizes used: {sizes}", flush=True)
    with tempfile.TemporaryDirectory(prefix="predtrace-bench-") as name:
        tmp = Path(name)
        f: dict[str, float] = {}
        f.update(bytes_figures())
        f.update(otel_anchor(tmp, sizes["otel"]))
        f.update(end_to_end(tmp, sizes["e2e"]))
        f.update(rss_at_rate(tmp, 20_000, sizes["rss_s"]))
        f.update(drain(tmp, sizes["drain"]))
        f.update(oip_latency(tmp, sizes["oip"]))
    f["vs_otel"] = f["events_per_s"] / f["otel_spans_per_s"]
    f["drain_s"] = f["drain_measured_s"] * 1_000_000 / f["drain_events"]
    report(f, extrapolated=sizes["drain"] != 1_000_000)


def report(f: dict[str, float], *, extrapolated: bool) -> None:
    """Print the figures beside their anchors and targets, then the JSON line."""
    print(
        f"OTel SDK -> OTLP        {f['otel_spans_per_s']:>10,.0f} spans/s "
        f"(lost {f['otel_lost']:.0f} of {f['otel_offered']:.0f})"
    )
    print(
        f"predtrace end to end    {f['events_per_s']:>10,.0f} events/s "
        f"(lost {f['e2e_lost']:.0f} of {f['e2e_events']:.0f})"
    )
    print(
        f"  ratio vs OTel         {f['vs_otel']:>10.1f} x   (events committed/s over OTLP spans "
        "received/s; target >= 10 x, zero loss)"
    )
    print(
        f"  CPU per event         producer {f['cpu_us_producer']:.1f} us, sidecar "
        f"{f['cpu_us_sidecar']:.1f} us, collector {f['cpu_us_collector']:.1f} us "
        f"({os.cpu_count()} cores)"
    )
    print(
        f"bytes per event (gzip)  {f['bytes_per_event']:>10.1f}  vs OTLP "
        f"{f['otlp_bytes_per_span']:.1f} bytes/span: ratio {f['bytes_ratio']:.3f} "
        "(target <= 0.2)"
    )
    print(f"sidecar RSS at {f['rss_rate']:,.0f} events/s: {f['rss_mb']:.1f} MB (target <= 100 MB)")
    how = f"extrapolated from {f['drain_events']:,.0f} events" if extrapolated else "measured"
    print(
        f"drain of 1,000,000 spooled events: {f['drain_s']:.1f} s ({how}; "
        f"{f['drain_events'] / f['drain_measured_s']:,.0f} events/s) (target <= 60 s)"
    )
    print(
        f"OIP proxy: direct {f['oip_direct_us']:.0f} us, proxied {f['oip_proxied_us']:.0f} us, "
        f"added {f['oip_proxy_added_us']:.0f} us per call"
    )
    keys = [
        "vs_otel",
        "bytes_ratio",
        "rss_mb",
        "drain_s",
        "oip_proxy_added_us",
        "events_per_s",
        "otel_spans_per_s",
        "e2e_lost",
        "e2e_duplicates",
        "otel_lost",
        "bytes_per_event",
        "otlp_bytes_per_span",
        "drain_events",
        "drain_measured_s",
        "cpu_us_producer",
        "cpu_us_sidecar",
        "cpu_us_collector",
    ]
    print(json.dumps({k: round(f[k], 3) for k in keys}))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
