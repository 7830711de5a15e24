"""The OTLP forwarder: every received span, on to the user's OTLP/HTTP backend.

OTLP receiver -> **OtlpForwarder** -> any OTLP/HTTP receiver (an OTel
Collector, Jaeger, Tempo, Phoenix, MLflow). Spans are best effort, unlike
prediction events: a bounded queue (by bytes; oldest dropped first), a
bounded number of retries with backoff, and every dropped span counted by
reason (those the backend's ``partial_success`` says it rejected too).
Resources get the sidecar's deployment identity where they lack it. Each
request names the sidecars it went through (``FORWARDED_BY``) so a receiver
that finds itself among them refuses it: an export URL that leads back to the
sidecar would otherwise forward the same spans round and round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Final, NamedTuple
from urllib.parse import urlsplit

import aiohttp
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2

from predtrace.sidecar.pipeline import RateLimitedLog, RetryPolicy, parse_retry_after

_log = logging.getLogger("predtrace.sidecar.otlp")
_RETRYABLE: Final = frozenset({408, 429, 500, 502, 503, 504})
_LOOP_DETECTED: Final = 508
_MESSAGE_CHARS: Final = 200
PROTOBUF: Final = "application/x-protobuf"
FORWARDED_BY: Final = "x-predtrace-forwarded-by"
"""The header naming, comma-separated, the forwarders a request went through."""
SPAN_DROP_REASONS: Final = (
    "too_large",  # one request over the queue's byte cap
    "queue_full",  # the oldest queued, past the byte cap
    "loop",  # the export URL leads back to this sidecar (508)
    "permanent",  # the backend refused them (a status not worth retrying)
    "retries_exhausted",  # the backend unreachable or failing through every retry
    "rejected",  # the backend's partial_success rejected them
    "shutdown",  # still queued when the sidecar stopped
)
"""Every reason ``ForwarderCounters.drop`` is given."""


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


class _Queued(NamedTuple):
    body: bytes
    spans: int
    via: str  # the FORWARDED_BY value to send


class _Answer(NamedTuple):
    status: int | None  # None: no answer (unreachable, timed out)
    retry_after: float | None = None
    rejected: int = 0  # spans the backend's partial_success rejected
    message: str = ""  # its error_message


def _answer_of(status: int, content_type: str, body: bytes, spans: int) -> _Answer:
    """A 2xx answer with its ``partial_success`` read (protobuf, or JSON if it says so).

    An empty or unreadable body is a plain success: OTLP backends may answer so.
    """
    response = trace_service_pb2.ExportTraceServiceResponse()
    try:
        if content_type == "application/json":
            json_format.Parse(body or b"{}", response, ignore_unknown_fields=True)
        else:
            response.ParseFromString(body)
    except (json_format.ParseError, DecodeError, RecursionError, ValueError):
        return _Answer(status)
    partial = response.partial_success
    rejected = min(max(partial.rejected_spans, 0), spans)
    return _Answer(status, None, rejected, partial.error_message[:_MESSAGE_CHARS])


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
        token: str | None = None,
    ) -> None:
        self.url = traces_url(url)
        self.counters = ForwarderCounters()
        self.token = token or secrets.token_hex(8)
        """This forwarder's name in ``FORWARDED_BY`` (random: one per process start)."""
        self._headers = {"Content-Type": PROTOBUF, **(headers or {})}
        self._resource = resource or {}
        self._max_bytes = max_queue_bytes
        self._retry = retry or RetryPolicy(initial_backoff=0.2, max_backoff=10.0, max_attempts=6)
        self._timeout = timeout
        self._queue: deque[_Queued] = deque()
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

    def offer(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        spans: int,
        *,
        via: tuple[str, ...] = (),
    ) -> None:
        """Queue a request for forwarding. Never blocks; drops oldest past the cap (counted).

        ``via``: the forwarders the request came through (its ``FORWARDED_BY``);
        this one is added when it is sent on.
        """
        self.counters.offered += spans
        self._enrich(request)
        body = request.SerializeToString()
        if len(body) > self._max_bytes:
            self.counters.drop("too_large", spans)
            return
        while self._queue and self._queued_bytes + len(body) > self._max_bytes:
            old = self._queue.popleft()
            self._queued_bytes -= len(old.body)
            self.counters.drop("queue_full", old.spans)
        self._queue.append(_Queued(body, spans, ", ".join((*via, self.token))))
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
            queued = self._queue.popleft()
            self._queued_bytes -= len(queued.body)
            self._in_flight = queued.spans
            await self._deliver(queued)
            self._in_flight = 0

    async def _deliver(self, queued: _Queued) -> None:
        spans = queued.spans
        for attempt in range(1, 1_000):
            answer = await self._post(queued)
            status, retry_after = answer.status, answer.retry_after
            if status is not None and 200 <= status < 300:
                self._delivered(answer, spans)
                return
            if status == _LOOP_DETECTED:
                self.counters.drop("loop", spans)
                self._log.warning(
                    "loop", "the OTLP export URL leads back to this sidecar (508); spans dropped"
                )
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

    def _delivered(self, answer: _Answer, spans: int) -> None:
        """Count a 2xx: spans forwarded, but those its ``partial_success`` rejected dropped."""
        self.counters.forwarded += spans - answer.rejected
        self.counters.drop("rejected", answer.rejected)
        if answer.rejected or answer.message:
            self._log.warning(
                "rejected",
                "OTLP backend rejected %d of %d spans: %s",
                answer.rejected,
                spans,
                answer.message or "(no message)",
            )

    async def _post(self, queued: _Queued) -> _Answer:
        assert self._session is not None  # noqa: S101 - started before use
        headers = {**self._headers, FORWARDED_BY: queued.via}
        try:
            async with self._session.post(self.url, data=queued.body, headers=headers) as resp:
                body = await resp.read()
                if 200 <= resp.status < 300:
                    return _answer_of(resp.status, resp.content_type, body, queued.spans)
                return _Answer(resp.status, parse_retry_after(resp.headers.get("Retry-After")))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._log.warning("unreachable", "OTLP backend unreachable: %s", type(exc).__name__)
            return _Answer(None)

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
        left = sum(queued.spans for queued in self._queue) + self._in_flight
        self.counters.drop("shutdown", left)
        if left:
            _log.warning("OTLP forwarder stopped with %d span(s) not forwarded: dropped", left)
        self._queue.clear()
        self._queued_bytes = 0
        if self._session is not None:
            await self._session.close()
            self._session = None
