"""OTLP request bodies: the HTTP read, the content decoding, the refusals.

Used by the receiver (``_otlp``) before any span is looked at: an HTTP body
is read chunk by chunk within a deadline and under a byte budget shared by
every request (gRPC ones too, each charged its bytes whole); a compressed body
is inflated here, bounded and checked to end properly (aiohttp's own
inflation is off). The parsers of a body, protobuf (``_otlp_protobuf``) and
JSON (``_otlp_json``), are imported from here too. A refused body is answered
with a ``google.rpc.Status`` in the request's encoding.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Final

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from google.protobuf import duration_pb2, json_format
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]  # no py.typed

from predtrace.sidecar._otlp_json import OtlpJsonError, parse_json
from predtrace.sidecar._otlp_protobuf import (
    ExportRequest,
    TooManySpansError,
    count_spans,
    parse_protobuf,
)
from predtrace.wire import WireTooLargeError

# Imported from here, wherever they are defined.
__all__ = [
    "BODY_TIMEOUT_S",
    "CODINGS",
    "JSON",
    "PROTOBUF",
    "BodyRefusedError",
    "BodyReservation",
    "BudgetSpentError",
    "ExportRequest",
    "InflightBudget",
    "OtlpJsonError",
    "TooManySpansError",
    "UndecodableBodyError",
    "count_spans",
    "decode_reason",
    "decompress",
    "forget_traceback",
    "parse_json",
    "parse_protobuf",
    "read_body",
    "refusal_response",
    "rpc_status",
]

PROTOBUF: Final = "application/x-protobuf"
JSON: Final = "application/json"
_DECODE_REASON_CHARS: Final = 200
# The Content-Encodings a body may come in; anything else is refused (415).
CODINGS: Final = frozenset({"", "identity", "gzip", "deflate"})
_GZIP_MAGIC: Final = b"\x1f\x8b"
# A gzip body may be several members back to back (RFC 1952): a few are taken,
# not thousands, as each one costs a copy of the rest of the body.
_MAX_GZIP_MEMBERS: Final = 16
# HTTP bodies are read in chunks of this size, each charged to the budget.
_CHUNK: Final = 64 * 1024
# A body that has not fully arrived by then is refused (408): a client that
# stalls mid-upload must not hold its share of the in-flight budget for ever.
BODY_TIMEOUT_S: Final = 30.0


class BodyRefusedError(Exception):
    """An HTTP body the receiver does not take: the status to answer and why."""

    def __init__(self, status: int, reason: str, *, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


class BudgetSpentError(BodyRefusedError):
    """The in-flight budget cannot take a request's bytes now: 503 (gRPC UNAVAILABLE), retry."""

    def __init__(self, cap: int) -> None:
        super().__init__(
            503,
            f"busy: too many OTLP bytes in flight, over the receiver's in-flight budget ({cap} "
            "bytes of request bodies, gRPC and HTTP together); retry shortly",
            retry_after=1,
        )


class InflightBudget:
    """Bytes of OTLP bodies held now, capped: HTTP ones as they arrive (then inflated), gRPC whole.

    Shared by every request of a receiver, over both transports; event-loop only.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0

    def reservation(self) -> BodyReservation:
        """A new request's share, empty until its body is charged."""
        return BodyReservation(self)


class BodyReservation:
    """One request's share of the budget: grows as its body arrives, released once."""

    __slots__ = ("_budget", "amount")

    def __init__(self, budget: InflightBudget) -> None:
        self._budget, self.amount = budget, 0

    def grow_to(self, total: int) -> None:
        """Hold ``total`` bytes.

        Raises:
            BudgetSpentError: the budget cannot give the difference.
        """
        more = total - self.amount
        if more <= 0:
            return
        if self._budget.used + more > self._budget.cap:
            raise BudgetSpentError(self._budget.cap)
        self._budget.used += more
        self.amount = total

    def release(self) -> None:
        """Give everything back (safe twice)."""
        self._budget.used -= self.amount
        self.amount = 0

    def hand_over(self) -> BodyReservation:
        """A new reservation holding what this one held; this one is left empty.

        For work that may outlive the request that reserved the bytes (its
        caller gave up): the work releases its own share once it is done, and
        the request's ``release`` then gives back nothing.
        """
        taken = BodyReservation(self._budget)
        taken.amount, self.amount = self.amount, 0
        return taken


async def read_body(
    request: web.Request, reservation: BodyReservation, *, limit: int, body_timeout: float
) -> bytes:
    """The raw body, read chunk by chunk within ``body_timeout``, each charged as it arrives.

    A stalled upload holds only the bytes it sent, and only until the deadline.

    Raises:
        BodyRefusedError: 413 past ``limit``, 503 past the budget, 408 not
            received in time, 400 cut off (the client hung up) or garbled.
    """
    if (request.content_length or 0) > limit:
        raise BodyRefusedError(413, f"body exceeds {limit} bytes")
    reservation.grow_to(1)  # a spent budget answers 503 before any read
    chunks: list[bytes] = []
    total = 0
    try:
        async with asyncio.timeout(body_timeout):
            async for chunk in request.content.iter_chunked(_CHUNK):
                total += len(chunk)
                if total > limit:
                    raise BodyRefusedError(413, f"body exceeds {limit} bytes")
                reservation.grow_to(total)
                chunks.append(chunk)
    except TimeoutError:
        raise BodyRefusedError(408, f"body not received within {body_timeout:g} s") from None
    except (OSError, RequestPayloadError) as exc:
        # The client hung up mid-body (or garbled its chunked framing). The
        # exception's traceback holds this frame, and with it the chunks; the
        # request's stream holds the exception: a cycle only the cyclic GC
        # would free (rarely, in the sidecar). Cut it here.
        forget_traceback(exc)
        raise BodyRefusedError(400, "the body could not be read (client gone?)") from None
    return b"".join(chunks)


def forget_traceback(exc: BaseException) -> None:
    """Drop the tracebacks of ``exc`` and of the exceptions chained to it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__cause__ or current.__context__


class UndecodableBodyError(ValueError):
    """A compressed body that is corrupt, cut short, or followed by stray bytes."""


def decompress(raw: bytes, coding: str, limit: int) -> bytes:
    """The body under its Content-Encoding, and under one sniffed gzip layer, bounded.

    Raises:
        WireTooLargeError: it inflates past ``limit`` (a bomb).
        UndecodableBodyError: a layer is corrupt, cut short, or has trailing bytes.
    """
    body = raw if coding in ("", "identity") else _inflate(raw, coding, limit)
    if body[:2] == _GZIP_MAGIC:  # gzip'd twice, or unsaid: no protobuf or JSON starts so
        body = _inflate(body, "gzip", limit)
    return body


def _inflate(data: bytes, coding: str, limit: int) -> bytes:
    """``data`` inflated; at most ``limit`` bytes, and each stream must end properly.

    aiohttp's own inflation is off for this reason: it takes a stream cut
    short, or without its CRC trailer, as a complete (shorter) body.
    """
    wbits = _wbits(data, coding)
    parts: list[bytes] = []
    size = 0
    for _ in range(_MAX_GZIP_MEMBERS if coding == "gzip" else 1):
        inflater = zlib.decompressobj(wbits)
        try:
            parts.append(inflater.decompress(data, limit + 1 - size))
        except zlib.error as exc:
            raise UndecodableBodyError(f"invalid {coding} data ({exc})") from None
        size += len(parts[-1])
        if size > limit or inflater.unconsumed_tail:
            raise WireTooLargeError(f"decompressed body exceeds {limit} bytes")
        if not inflater.eof:
            raise UndecodableBodyError(f"{coding} data cut short (no end of stream)")
        data = inflater.unused_data
        if not data:
            return b"".join(parts)
    if coding == "gzip":
        raise UndecodableBodyError(f"more than {_MAX_GZIP_MEMBERS} gzip members")
    raise UndecodableBodyError(f"bytes after the end of the {coding} data")


def _wbits(data: bytes, coding: str) -> int:
    """zlib's ``wbits`` for a body of ``coding``."""
    if coding == "gzip":
        return 16 + zlib.MAX_WBITS
    if data[:1] and data[0] & 0x0F == 8:  # deflate as RFC 9110 has it: zlib-wrapped
        return zlib.MAX_WBITS
    return -zlib.MAX_WBITS  # raw deflate, as some clients send it (and aiohttp took it)


def decode_reason(exc: BaseException) -> str:
    """The protobuf library's reason for refusing bytes, without its "Error parsing" preamble."""
    if isinstance(exc, RecursionError):
        return "nested too deep"
    text = str(exc)
    return (text.rpartition("': ")[2] or text)[:_DECODE_REASON_CHARS]


def rpc_status(code: int, message: str, retry_after: int | None = None) -> bytes:
    """A serialized ``google.rpc.Status``; with a RetryInfo detail when ``retry_after`` is given.

    Over gRPC it goes in the ``grpc-status-details-bin`` trailer, where a
    sender looks for the RetryInfo.
    """
    data: bytes = _status(code, message, retry_after).SerializeToString()
    return data


def _status(code: int, message: str, retry_after: int | None) -> status_pb2.Status:
    status = status_pb2.Status(code=code, message=message)
    if retry_after is not None:
        delay = duration_pb2.Duration(seconds=retry_after)
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


# The google.rpc code (the gRPC one) that goes with each HTTP status answered.
_RPC_CODES: Final = {
    400: 3,  # INVALID_ARGUMENT
    408: 4,  # DEADLINE_EXCEEDED
    413: 3,
    415: 3,
    503: 14,  # UNAVAILABLE
    508: 9,  # FAILED_PRECONDITION: the configuration loops
}
_UNKNOWN: Final = 2


def refusal_response(refused: BodyRefusedError, content_type: str) -> web.Response:
    """The HTTP answer to a refused request: a ``google.rpc.Status`` in the request's encoding.

    The OTLP/HTTP spec asks for a Status, encoded as the request was; a
    request in neither encoding gets plain text.
    """
    headers = {"Retry-After": str(refused.retry_after)} if refused.retry_after else None
    code = _RPC_CODES.get(refused.status, _UNKNOWN)
    status = _status(code, refused.reason, refused.retry_after)
    if content_type == JSON:
        text = json_format.MessageToJson(status, indent=None)
        return web.Response(status=refused.status, text=text, content_type=JSON, headers=headers)
    if content_type == PROTOBUF:
        body = status.SerializeToString()
        return web.Response(
            status=refused.status, body=body, content_type=PROTOBUF, headers=headers
        )
    return web.Response(status=refused.status, text=refused.reason, headers=headers)
