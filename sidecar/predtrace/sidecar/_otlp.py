"""The OTLP receiver: OTLP/gRPC TraceService and OTLP/HTTP ``/v1/traces`` as a source.

**OtlpReceiver** -> intake -> spool, and every span -> ``OtlpForwarder``.
Spans carrying ``predtrace.prediction.id`` become prediction events (their
``predtrace.model.*`` attributes, status and timing: ``_otlp_spans``); all spans, predictions
or not, are forwarded to the configured OTLP backend, so the sidecar can sit
in front of any OTLP receiver. Bodies are bounded; OTLP/HTTP accepts the
protobuf and the JSON encodings (gzip'd, deflate'd or not). A span whose
prediction event is refused is still forwarded; the sender hears of the
refusal in ``partial_success`` (``rejected_spans`` stays 0: no span was).
Request bodies are held under one in-flight byte budget, gRPC and HTTP
together. A refused request gets a reason: over gRPC in the status
(UNAVAILABLE with a RetryInfo when the spool is busy or the budget spent:
retryable by the OTLP spec), over HTTP in a ``google.rpc.Status`` body in the
request's encoding (503 + Retry-After when busy). A request that this sidecar
forwarded itself is refused (508): an ``--otlp-export`` pointing back at the
sidecar would otherwise loop.

An export is taken once: a sender whose call ended on its side (a deadline)
while the sidecar was still spooling retries with the same bytes, and that
retry gets the first call's answer instead of spooling the events again (an
OTLP request names no batch; its bytes are its name, kept for the last 4,096
exports). The work of a call whose caller gave up runs to its end, its bytes
still charged to the in-flight budget.

The transports are front-ends of the receiver: ``_otlp_grpc`` (TraceService)
and ``_otlp_http`` (``/v1/traces``, its listener started by ``start_http``).
This module holds what they share: the in-flight budget, the parse (on the
loop, or for a big body in a bounded pool of threads), the once-per-export
answer, and the conversion, spooling and forwarding of the spans.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, TypeVar

import grpc
from google.protobuf.message import DecodeError

from predtrace.sidecar._intake import Intake
from predtrace.sidecar._otlp_body import (
    BODY_TIMEOUT_S,
    BodyReservation,
    ExportRequest,
    InflightBudget,
    OtlpJsonError,
    parse_json,
    parse_protobuf,
)
from predtrace.sidecar._otlp_export import OtlpForwarder
from predtrace.sidecar._otlp_grpc import add_trace_service
from predtrace.sidecar._otlp_http import OtlpHttpListener, http_listen_what
from predtrace.sidecar._otlp_spans import ExportResponse, export_response, request_to_events
from predtrace.sidecar._recent_batches import RecentBatches
from predtrace.sidecar.pipeline import RateLimitedLog

# Imported from here, wherever they are defined (the parsers and what they
# raise are named by ``export``; the transports live in ``_otlp_grpc`` and
# ``_otlp_http``).
__all__ = [
    "DecodeError",
    "OtlpJsonError",
    "OtlpReceiver",
    "http_listen_what",
    "parse_json",
    "parse_protobuf",
]

# Requests bigger than this are parsed and converted in a thread: a 4 MiB
# export must not stall every other connection of the loop for a second, nor
# a 256 KiB body of 87,000 ``{}`` spans (or 120,000 empty protobuf ones) for
# a fraction of one. Below it, a body holds at most some 8,000 spans: a few
# milliseconds. An SDK export of a handful of spans stays on the loop.
_THREAD_BYTES: Final = 16 * 1024
# At most this many of those big bodies, over gRPC and HTTP together, are
# parsed, converted and held as messages at once: a parsed request costs many
# times its body (every JSON object becomes a dict, then a message), so this
# bounds that peak whatever the number of concurrent exports. They are parsed
# in a pool of as many threads of their own: a parse whose caller gave up (a
# deadline) runs on in its thread, and still holds one of the two. Smaller
# bodies are parsed on the loop, one at a time by construction.
_MAX_BIG_PARSES: Final = 2
_Out = TypeVar("_Out")


async def _off_loop(size: int, work: Callable[..., _Out], *args: object) -> _Out:
    """``work(*args)``, in a thread when ``size`` says it is big."""
    if size > _THREAD_BYTES:
        return await asyncio.to_thread(work, *args)
    return work(*args)


_log = logging.getLogger("predtrace.sidecar.otlp")
# The in-flight budget of OTLP bodies, in maximum bodies: a few exports
# arriving at once are held; past that, 503 + Retry-After (gRPC: UNAVAILABLE +
# RetryInfo) until one is done. One budget for both transports, not one each:
# it bounds what the receiver holds whichever way the bodies come, as the
# big-parse slots they wait for are shared too. (gRPC's own bound is per
# connection, 8 calls: many connections would hold many bodies, waiting.)
_INFLIGHT_BODIES: Final = 4
# The largest body the budget is sized for until ``start_http`` gives its own.
_DEFAULT_MAX_BODY: Final = 4 * 1024 * 1024


def _export_key(body: bytes, as_json: bool) -> bytes:
    """The name of an export (an OTLP request has none of its own): a digest of its bytes."""
    return hashlib.blake2b(body, digest_size=16, person=b"json" if as_json else b"proto").digest()


class OtlpReceiver:
    """Receives OTLP traces over gRPC and HTTP; spools prediction events; forwards spans."""

    def __init__(self, intake: Intake, forwarder: OtlpForwarder | None) -> None:
        self._intake = intake
        self._forwarder = forwarder
        self._http: OtlpHttpListener | None = None
        self._budget = InflightBudget(_INFLIGHT_BODIES * _DEFAULT_MAX_BODY)
        self._big_parses = asyncio.Semaphore(_MAX_BIG_PARSES)
        self._parse_pool = ThreadPoolExecutor(_MAX_BIG_PARSES, thread_name_prefix="otlp-parse")
        # Taken before a parse is handed to the pool, given back when the
        # thread is done with it: a caller that gives up frees its place in
        # ``_big_parses`` at once, but leaves no body queued behind the pool.
        self._parse_slots = asyncio.Semaphore(_MAX_BIG_PARSES)
        self._log = RateLimitedLog(_log)
        self._recent: RecentBatches[ExportResponse] = RecentBatches(ExportResponse.ByteSize)
        self.spans_received = 0
        self.budget_refusals = {"grpc": 0, "http": 0}
        """Exports refused because the in-flight budget was spent, by transport."""
        self.duplicate_exports = 0
        """Exports answered with the answer of an earlier one with the same bytes (a retry)."""

    @property
    def inflight_bytes(self) -> int:
        """Bytes of OTLP bodies held now, gRPC and HTTP (their share of the in-flight budget)."""
        return self._budget.used

    def reservation(self) -> BodyReservation:
        """A new request's share of the in-flight budget, empty; ``release`` it once done."""
        return self._budget.reservation()

    @staticmethod
    def parser(as_json: bool) -> Callable[[bytes], ExportRequest]:
        """The parser of a body in the JSON encoding (``as_json``) or the protobuf one.

        The transports take it from here at each export rather than import
        their own: ``export`` names an export by whether its parser ``is
        parse_json``, so both must read the same names.
        """
        return parse_json if as_json else parse_protobuf

    async def export(
        self,
        body: bytes,
        parse: Callable[[bytes], ExportRequest],
        via: tuple[str, ...] = (),
        *,
        reservation: BodyReservation | None = None,
    ) -> ExportResponse:
        """``_parse_and_accept`` once per export (the same bytes again: a retry).

        The work runs to its end even if the caller goes away, so that its
        retry gets its answer; it takes over the caller's ``reservation``
        (its body's share of the in-flight budget) and gives it back once done.

        Raises:
            DecodeError, RecursionError, OtlpJsonError, TooManySpansError: as ``parse``.
            SpanIdLengthError: as ``accept``.
            SpoolError: as ``accept``.
        """
        key = await _off_loop(len(body), _export_key, body, parse is parse_json)

        def start() -> Awaitable[ExportResponse]:
            held = reservation.hand_over() if reservation is not None else None
            return self._parse_and_accept(body, parse, via, held)

        # A retry waits for the first call's answer, its own bytes still held
        # by its caller (they are until it answers).
        answer, duplicate = await self._recent.spool_once(key, b"", start)
        if not duplicate:
            return answer
        self.duplicate_exports += 1
        copy = ExportResponse()
        copy.CopyFrom(answer)  # the kept answer stays as it was
        return copy

    async def _parse_and_accept(
        self,
        body: bytes,
        parse: Callable[[bytes], ExportRequest],
        via: tuple[str, ...],
        held: BodyReservation | None,
    ) -> ExportResponse:
        """Parse ``body`` and ``accept`` it; a big one waits for one of the big-parse slots."""
        try:
            return await self._parse_then_accept(body, parse, via)
        finally:
            if held is not None:
                held.release()

    async def _parse_then_accept(
        self, body: bytes, parse: Callable[[bytes], ExportRequest], via: tuple[str, ...]
    ) -> ExportResponse:
        if len(body) <= _THREAD_BYTES:
            return await self.accept(parse(body), len(body), via)
        async with self._big_parses:  # held while the parsed request lives
            loop = asyncio.get_running_loop()
            await self._parse_slots.acquire()
            try:
                future = self._parse_pool.submit(parse, body)
            except BaseException:
                self._parse_slots.release()
                raise
            release = self._parse_slots.release
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(release))
            try:
                request = await asyncio.wrap_future(future, loop=loop)
            finally:
                # The future holds a parse error, whose traceback holds this
                # frame: holding the future too would close a cycle (the body
                # in it) that only the seldom-run cyclic GC frees.
                del future
            return await self.accept(request, len(body), via)

    async def accept(
        self, request: ExportRequest, size: int = 0, via: tuple[str, ...] = ()
    ) -> ExportResponse:
        """Spool the request's prediction events (durably), then hand it to the forwarder.

        ``via`` names the sidecars it was forwarded through (see ``OtlpForwarder.offer``).

        Returns:
            The Export answer, naming the prediction events refused, if any.

        Raises:
            SpanIdLengthError: an id of a length OTLP does not allow; nothing
                was spooled or forwarded.
            SpoolError: the spool refused the write; nothing was forwarded.
        """
        converted = await _off_loop(size, request_to_events, request)
        self.spans_received += converted.spans
        refused = converted.refused
        if refused:
            self._intake.count_refused(len(refused))
            position, why = min(refused)
            self._log.warning(
                "unusable-span",
                "%d OTLP span(s) carrying predtrace.* attributes made no prediction event "
                "(the sender is told in the Export answer's partial_success); the first, "
                "span %d of its request: %s",
                len(refused),
                position,
                why,
            )
        if converted.events:
            result = await self._intake.record(converted.events)  # counts what it refuses
            refused += [(converted.positions[r.index], r.reason) for r in result.rejected]
        if self._forwarder is not None:
            self._forwarder.offer(request, converted.spans, via=via)
        return export_response(refused)

    @property
    def connections_refused(self) -> int:
        """OTLP/HTTP connections closed as soon as accepted (too many open)."""
        return self._http.connections_refused if self._http is not None else 0

    def add_to_grpc_server(self, server: grpc.aio.Server) -> None:
        """Register the OTLP TraceService on a gRPC server."""
        add_trace_service(server, self)

    async def start_http(
        self,
        listen: str,
        *,
        max_body: int,
        ssl_context: ssl.SSLContext | None = None,
        inflight_bytes: int | None = None,
        body_timeout: float = BODY_TIMEOUT_S,
        what: str | None = None,
    ) -> str:
        """Serve ``POST /v1/traces`` (HTTPS given ``ssl_context``); return ``host:port``.

        Args:
            listen: ``host:port`` to bind (port 0: any free one).
            max_body: the largest body taken, compressed or not (413 past it).
            ssl_context: serve HTTPS with it.
            inflight_bytes: bodies held at once, in bytes, over every request
                (503 + Retry-After past it); four ``max_body`` by default.
            body_timeout: seconds a body may take to arrive (408 past it).
            what: the setting ``listen`` came from, as an error names it
                (``http_listen_what``: only the caller knows whether it was
                given or derived); by default it names both.

        Raises:
            ConfigError: ``listen`` is not ``host:port``.
            OSError: it cannot be listened on, naming it and ``what``, as
                the gRPC listeners' bind errors do.
        """
        # Resized, not replaced: gRPC calls may already hold some of it.
        self._budget.cap = inflight_bytes or _INFLIGHT_BODIES * max_body
        self._http = OtlpHttpListener(
            self, self._forwarder, self._log, max_body=max_body, body_timeout=body_timeout
        )
        return await self._http.start(listen, ssl_context=ssl_context, what=what)

    async def stop(self) -> None:
        """Stop the HTTP listener and the parse threads. Safe twice."""
        if self._http is not None:
            await self._http.stop()
        self._parse_pool.shutdown(wait=False, cancel_futures=True)
