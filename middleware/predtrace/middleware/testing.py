"""Public test helpers for the middleware: an ASGI driver, a recording sidecar and collector.

Use them instead of mocks: ``call_asgi`` drives any ASGI app in-process (no
network, no client library, every message kept); ``serve_sidecar`` runs a
real gRPC server on 127.0.0.1 implementing ``predtrace.v1.Sidecar``, and
``serve_collector`` a real aiohttp server taking the collector's batch
endpoint (``POST /v1/batches``) and OTLP/HTTP traces (``POST /v1/traces``);
both record what they receive and can be told to fail or stall.

Example:
    >>> with serve_sidecar() as sidecar:
    ...     config = MiddlewareConfig(sidecar_target=sidecar.target)
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from aiohttp import web

from predtrace.middleware._asgi import ASGIApp, Message
from predtrace.v1 import event_pb2, sidecar_pb2, sidecar_pb2_grpc
from predtrace.wire import (
    IngestAck,
    WireError,
    decode_batch,
    encode_ack,
    event_to_proto,
    unpack_events,
)

_BATCH_TYPE = "application/vnd.predtrace.batch+msgpack"


@dataclass(slots=True)
class AsgiResponse:
    """What an ASGI app sent for one request."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    messages: list[Message]

    def header(self, name: str) -> str | None:
        """The first value of a response header (case-insensitive), or None."""
        wanted = name.lower().encode("latin-1")
        for key, value in self.headers:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return None


async def call_asgi(
    app: ASGIApp,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] = b"",
    headers: Iterable[tuple[str, str]] = (),
) -> AsgiResponse:
    """Send one HTTP request through ``app`` in-process and collect the response.

    ``body`` may be several chunks (sent as ``more_body`` messages). ``path``
    is given as on the wire (percent-encoded); the scope's ``path`` has it
    decoded, as a server gives it. Raises whatever the app raises.
    """
    chunks = [body] if isinstance(body, bytes) else list(body)
    requests: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks or [b""])
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        if requests:
            return requests.pop(0)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    raw_path = path.split("?", 1)[0]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": urllib.parse.unquote(raw_path),  # decoded, as servers (uvicorn) do
        "raw_path": raw_path.encode(),
        "query_string": path.partition("?")[2].encode(),
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return AsgiResponse(start["status"], list(start.get("headers", [])), payload, sent)


@dataclass
class RecordingSidecar(sidecar_pb2_grpc.SidecarServicer):
    """A ``predtrace.v1.Sidecar`` servicer that keeps every event it is sent.

    ``script`` holds outcomes for the next ``RecordBatch`` calls: a
    ``grpc.StatusCode`` aborts the call with that code (a tuple adds trailing
    metadata); ``None`` accepts. When the script is empty every call is accepted.
    Packed events are read like protobuf ones, unless ``reads_packed`` is off
    (a sidecar from before ``packed_events``, which ignores the field).
    """

    script: list[grpc.StatusCode | tuple[grpc.StatusCode, tuple[tuple[str, str], ...]] | None] = (
        field(default_factory=list)
    )
    reject_ids: frozenset[str] = frozenset()
    reads_packed: bool = True
    events: list[event_pb2.PredictionEvent] = field(default_factory=list)
    calls: int = 0
    packed_calls: int = 0
    request_bytes: list[int] = field(default_factory=list)
    batch_ids: list[bytes] = field(default_factory=list)
    target: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def RecordBatch(
        self, request: sidecar_pb2.RecordBatchRequest, context: grpc.ServicerContext
    ) -> sidecar_pb2.RecordAck:
        """Record the batch, or abort with the next scripted code."""
        with self._lock:
            self.calls += 1
            self.request_bytes.append(request.ByteSize())
            self.batch_ids.append(request.batch_id)
            outcome = self.script.pop(0) if self.script else None
        if outcome is not None:
            code, metadata = outcome if isinstance(outcome, tuple) else (outcome, ())
            if metadata:
                context.set_trailing_metadata(metadata)
            context.abort(code, f"scripted {code.name}")
        ack = sidecar_pb2.RecordAck()
        received = list(enumerate(request.events))
        if request.packed_events and self.reads_packed:
            try:
                packed, places, bad = unpack_events(
                    request.packed_events, first_index=len(request.events)
                )
            except WireError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"packed_events: {exc}")
            with self._lock:
                self.packed_calls += 1
            received += zip(places, (event_to_proto(e) for e in packed), strict=True)
            for r in bad:
                ack.rejected.add(index=r.index, prediction_id=r.prediction_id, reason=r.reason)
            ack.read_packed = True
        with self._lock:
            for index, event in received:
                if event.prediction_id in self.reject_ids:
                    ack.rejected.add(index=index, prediction_id=event.prediction_id, reason="test")
                else:
                    self.events.append(event)
                    ack.accepted += 1
        return ack

    @property
    def prediction_ids(self) -> list[str]:
        """Ids of the recorded events, in arrival order."""
        with self._lock:
            return [e.prediction_id for e in self.events]


@contextmanager
def serve_sidecar(sidecar: RecordingSidecar | None = None) -> Iterator[RecordingSidecar]:
    """Run ``sidecar`` on a real gRPC server at 127.0.0.1:<free port>; stop it after."""
    sidecar = sidecar or RecordingSidecar()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    sidecar_pb2_grpc.add_SidecarServicer_to_server(sidecar, server)  # type: ignore[no-untyped-call]  # generated
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    sidecar.target = f"127.0.0.1:{port}"
    try:
        yield sidecar
    finally:
        server.stop(grace=None).wait()


@dataclass
class RecordingCollector:
    """State of a ``serve_collector`` server: what arrived, and how to answer.

    ``status`` answers every batch with that HTTP status instead of accepting
    it; ``delay`` stalls each answer (a slow collector); ``hang`` never
    answers until the server stops (a black hole).
    """

    url: str = ""
    status: int | None = None
    delay: float = 0.0
    hang: bool = False
    bodies: list[bytes] = field(default_factory=list)
    prediction_ids: list[str] = field(default_factory=list)
    spans: int = 0
    server_spans: list[str] = field(default_factory=list)
    span_bodies: list[bytes] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    async def _batches(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.hang:
            await asyncio.Event().wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status is not None:
            return web.Response(status=self.status, text="scripted")
        try:
            decoded = decode_batch(body)
        except WireError as exc:
            return web.Response(status=400, text=str(exc))
        with self._lock:
            self.bodies.append(body)
            self.prediction_ids.extend(e.prediction_id for e in decoded.batch.events)
        ack = IngestAck(decoded.batch.producer_id, decoded.batch.seq, len(decoded.batch.events))
        return web.Response(body=encode_ack(ack), content_type=_BATCH_TYPE)

    async def _traces(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1 import (  # noqa: PLC0415 - optional
            trace_service_pb2,
        )

        body = await request.read()
        message = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        spans = [span for r in message.resource_spans for s in r.scope_spans for span in s.spans]
        with self._lock:
            self.spans += len(spans)
            self.server_spans += [s.name for s in spans if s.kind == s.SPAN_KIND_SERVER]
            self.span_bodies.append(body)
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    def snapshot_ids(self) -> list[str]:
        """Prediction ids received so far, in arrival order."""
        with self._lock:
            return list(self.prediction_ids)


async def _settle(tasks: set[asyncio.Task[object]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)


@contextmanager
def serve_collector(
    collector: RecordingCollector | None = None,
) -> Iterator[RecordingCollector]:
    """Run ``collector`` on a real aiohttp server at 127.0.0.1:<free port>, in a thread."""
    state = collector or RecordingCollector()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    failure: list[BaseException] = []

    async def serve() -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/batches", state._batches)
        app.router.add_post("/v1/traces", state._traces)
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            ready.set()
            await stop.wait()
        finally:
            await runner.cleanup()

    def run() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            failure.append(exc)
            ready.set()
        finally:
            # A black-holed request is still waiting: cancel it before closing.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(_settle(pending))
            loop.close()

    thread = threading.Thread(target=run, name="recording-collector", daemon=True)
    thread.start()
    if not ready.wait(10) or failure:
        raise RuntimeError(f"collector did not start: {failure}")
    try:
        yield state
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


_RUNNING_RE = re.compile(r"Uvicorn running on https?://[^:\s]+:(\d+)")


@dataclass
class UvicornProcess:
    """A real uvicorn server in a subprocess on 127.0.0.1:<free port>."""

    process: subprocess.Popen[bytes]
    url: str = ""
    stderr_lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def terminate(self, timeout: float = 30.0) -> tuple[int, str]:
        """Send SIGTERM, wait for the exit; return (exit code, stderr text)."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(10)
        return code, "".join(self.stderr_lines)


@contextmanager
def run_uvicorn(
    app: str,
    *,
    app_dir: str,
    env: dict[str, str] | None = None,
    ready_path: str = "/",
    timeout: float = 30.0,
    extra_args: Iterable[str] = (),
) -> Iterator[UvicornProcess]:
    """Start ``uvicorn app`` on 127.0.0.1, port 0; wait until ``ready_path`` answers.

    The port uvicorn bound is read back from its start-up line (its log goes
    to a thread that keeps draining it). The process is killed at exit if
    still running.
    """
    command = [sys.executable, "-m", "uvicorn", app, "--app-dir", app_dir]
    command += ["--host", "127.0.0.1", "--port", "0", "--lifespan", "on"]
    command += ["--log-level", "info", "--no-access-log", *extra_args]
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
        command,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    server = UvicornProcess(process)
    started = threading.Event()

    def drain() -> None:
        assert process.stderr is not None  # noqa: S101 - piped above
        for raw in process.stderr:
            line = raw.decode("utf-8", "replace")
            server.stderr_lines.append(line)
            found = _RUNNING_RE.search(line)
            if found and not started.is_set():
                server.url = f"http://127.0.0.1:{found.group(1)}"
                started.set()
        started.set()  # the process ended: let the waiter see it

    server._reader = threading.Thread(target=drain, name="uvicorn-stderr", daemon=True)
    server._reader.start()
    try:
        _wait_ready(server, started, ready_path, timeout)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        server._reader.join(10)
        if process.stderr is not None:
            process.stderr.close()


def _wait_ready(
    server: UvicornProcess, started: threading.Event, path: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    if not started.wait(timeout) or not server.url:
        tail = "".join(server.stderr_lines)[-2000:]
        raise RuntimeError(f"uvicorn did not start: {tail}")
    while True:
        try:
            with urllib.request.urlopen(server.url + path, timeout=1.0):  # noqa: S310 - loopback http
                return
        except OSError:
            if server.process.poll() is not None or time.monotonic() > deadline:
                tail = "".join(server.stderr_lines)[-2000:]
                raise RuntimeError(f"uvicorn not ready: {tail}") from None
            time.sleep(0.05)
