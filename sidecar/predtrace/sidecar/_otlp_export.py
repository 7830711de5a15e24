"""The OTLP forwarder: every received span, on to the user's OTLP/HTTP backend.

OTLP receiver -> **OtlpForwarder** -> any OTLP/HTTP receiver (an OTel
Collector, Jaeger, Tempo, Phoenix, MLflow). Spans are best effort, unlike
prediction events: a bounded queue (by bytes; oldest dropped first), a
bounded number of retries with backoff, and every dropped span counted by
reason. Resources get the sidecar's deployment identity where they lack it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

import aiohttp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2

from predtrace.sidecar.pipeline import RateLimitedLog, RetryPolicy, parse_retry_after

_log = logging.getLogger("predtrace.sidecar.otlp")
_RETRYABLE: Final = frozenset({408, 429, 500, 502, 503, 504})
PROTOBUF: Final = "application/x-protobuf"


@dataclass(slots=True)
class ForwarderCounters:
    """Spans offered, forwarded and dropped by reason."""

    offered: int = 0
    forwarded: int = 0
    retried: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, count: int) -> None:
        """Count spans dropped for ``reason``."""
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count


def traces_url(url: str) -> str:
    """The full traces URL: a bare base URL gets ``/v1/traces`` (OTel's convention)."""
    return url if urlsplit(url).path not in ("", "/") else url.rstrip("/") + "/v1/traces"


class OtlpForwarder:
    """Bounded, retrying OTLP/HTTP (protobuf) exporter of whole export requests."""

    def __init__(
        self,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        resource: dict[str, str] | None = None,
        max_queue_bytes: int = 32 * 1024 * 1024,
        retry: RetryPolicy | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.url = traces_url(url)
        self.counters = ForwarderCounters()
        self._headers = {"Content-Type": PROTOBUF, **(headers or {})}
        self._resource = resource or {}
        self._max_bytes = max_queue_bytes
        self._retry = retry or RetryPolicy(initial_backoff=0.2, max_backoff=10.0, max_attempts=6)
        self._timeout = timeout
        self._queue: deque[tuple[bytes, int]] = deque()
        self._queued_bytes = 0
        self._in_flight = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random()  # noqa: S311 - jitter, not secrets
        self._log = RateLimitedLog(_log)

    async def start(self) -> None:
        """Start the sending task."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        self._task = asyncio.create_task(self._run(), name="predtrace-otlp-forwarder")

    def offer(self, request: trace_service_pb2.ExportTraceServiceRequest, spans: int) -> None:
        """Queue a request for forwarding. Never blocks; drops oldest past the cap (counted)."""
        self.counters.offered += spans
        self._enrich(request)
        body = request.SerializeToString()
        if len(body) > self._max_bytes:
            self.counters.drop("too_large", spans)
            return
        while self._queue and self._queued_bytes + len(body) > self._max_bytes:
            old, old_spans = self._queue.popleft()
            self._queued_bytes -= len(old)
            self.counters.drop("queue_full", old_spans)
        self._queue.append((body, spans))
        self._queued_bytes += len(body)
        self._idle.clear()
        self._wake.set()

    def _enrich(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        if not self._resource:
            return
        for resource_spans in request.resource_spans:
            attributes = resource_spans.resource.attributes
            present = {kv.key for kv in attributes}
            for key, value in self._resource.items():
                if key not in present:
                    attributes.append(
                        common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))
                    )

    async def _run(self) -> None:
        while True:
            while not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            body, spans = self._queue.popleft()
            self._queued_bytes -= len(body)
            self._in_flight = spans
            await self._deliver(body, spans)
            self._in_flight = 0

    async def _deliver(self, body: bytes, spans: int) -> None:
        for attempt in range(1, 1_000):
            status, retry_after = await self._post(body)
            if status is not None and 200 <= status < 300:
                self.counters.forwarded += spans
                return
            if status is not None and status not in _RETRYABLE:
                self.counters.drop("permanent", spans)
                self._log.warning("permanent", "OTLP backend refused spans with %d", status)
                return
            if self._retry.gives_up_after(attempt):
                self.counters.drop("retries_exhausted", spans)
                self._log.warning("exhausted", "OTLP backend unreachable; spans dropped")
                return
            self.counters.retried += 1
            await asyncio.sleep(self._retry.delay(attempt - 1, retry_after, self._rng))

    async def _post(self, body: bytes) -> tuple[int | None, float | None]:
        assert self._session is not None  # noqa: S101 - started before use
        try:
            async with self._session.post(self.url, data=body, headers=self._headers) as resp:
                await resp.read()
                return resp.status, parse_retry_after(resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._log.warning("unreachable", "OTLP backend unreachable: %s", type(exc).__name__)
            return None, None

    async def stop(self, timeout: float = 2.0) -> None:  # noqa: ASYNC109 - a flush deadline
        """Flush for up to ``timeout`` seconds, then drop (counted) what is left. Safe twice."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        left = sum(spans for _, spans in self._queue) + self._in_flight
        self.counters.drop("shutdown", left)
        self._queue.clear()
        self._queued_bytes = 0
        if self._session is not None:
            await self._session.close()
            self._session = None
