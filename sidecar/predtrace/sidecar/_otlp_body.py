"""OTLP request bodies: the HTTP read, the content decoding, the parsers, the refusals.

Used by the receiver (``_otlp``) before any span is looked at: an HTTP body
is read chunk by chunk within a deadline and under a byte budget shared by
every request (gRPC ones too, each charged its bytes whole); a compressed body
is inflated here, bounded and checked to end properly (aiohttp's own
inflation is off); a protobuf or JSON body becomes an
``ExportTraceServiceRequest`` (JSON with its hex ids and either spelling of
the field names), once a cheap count says it is not a bomb of tiny spans. A
refused body is answered with a ``google.rpc.Status`` in the request's encoding.
"""

from __future__ import annotations

import asyncio
import base64
import json
import zlib
from collections.abc import Iterator
from typing import Final, TypeAlias

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from google.protobuf import duration_pb2, json_format
from google.protobuf.descriptor import Descriptor
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]  # no py.typed
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from predtrace.wire import WireTooLargeError

ExportRequest = trace_service_pb2.ExportTraceServiceRequest
PROTOBUF: Final = "application/x-protobuf"
JSON: Final = "application/json"
_DECODE_REASON_CHARS: Final = 200
# The Content-Encodings a body may come in; anything else is refused (415).
CODINGS: Final = frozenset({"", "identity", "gzip", "deflate"})
# At least this many objects are taken (about 4,000 spans of 30 attributes
# each), and more in a bigger body: one per 16 bytes (a real span spends some
# 25 bytes an object; a bomb of ``{}`` 2 or 3).
_MIN_JSON_OBJECTS: Final = 250_000
_BYTES_PER_JSON_OBJECT: Final = 16
_GZIP_MAGIC: Final = b"\x1f\x8b"
# A gzip body may be several members back to back (RFC 1952): a few are taken,
# not thousands, as each one costs a copy of the rest of the body.
_MAX_GZIP_MEMBERS: Final = 16
# At least this many spans are taken in one protobuf request, and more in a
# bigger body: one per 64 bytes. An SDK exports 512 at most, a Collector some
# thousands; a parsed span costs some 180 bytes even when empty (2 on the
# wire), so a 4 MiB body of two million empty spans would cost 360 MB.
_MIN_SPANS: Final = 100_000
_BYTES_PER_SPAN: Final = 64
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


class TooManySpansError(ValueError):
    """A protobuf request with more spans than a body of its size may carry."""


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


class OtlpJsonError(ValueError):
    """An OTLP/JSON body that does not describe an ExportTraceServiceRequest."""


# OTLP/JSON writes these bytes fields as hex, where protobuf's JSON mapping says base64.
_HEX_ID_FIELDS: Final = (
    "traceId",
    "spanId",
    "parentSpanId",
    "trace_id",
    "span_id",
    "parent_span_id",
)
# The messages whose ids are hex in OTLP/JSON.
_WITH_HEX_IDS: Final = frozenset(
    {trace_pb2.Span.DESCRIPTOR.full_name, trace_pb2.Span.Link.DESCRIPTOR.full_name}
)
# Where an object lies in the body: None for the body itself, else (the
# parent's place, the field's key as written, the index in a list or None).
# Rendered only for an error message: a walk builds no strings.
_Place: TypeAlias = "tuple[_Place, str, int | None] | None"


def _path(place: _Place) -> str:
    """``place`` as written in an error: ``resourceSpans[0].scopeSpans[0].spans[3].status``."""
    parts: list[str] = []
    while place is not None:
        place, key, index = place
        parts.append(key if index is None else f"{key}[{index}]")
    return ".".join(reversed(parts)) or "the body"


def _hex_ids_to_base64(item: dict[str, object], place: _Place) -> None:
    for key in _HEX_ID_FIELDS:
        value = item.get(key)
        if isinstance(value, str) and value:
            try:
                item[key] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                raise OtlpJsonError(f"{_path((place, key, None))} must be hex") from None


class _Type:
    """What the walk needs of a message type: its message-typed fields, and its hex ids."""

    __slots__ = ("fields", "hex_ids", "name")

    def __init__(self, descriptor: Descriptor) -> None:
        self.name = descriptor.full_name
        self.hex_ids = self.name in _WITH_HEX_IDS
        # Each message-typed field (maps and well-known types aside: a JSON
        # string or list may be right for them) under both of its spellings,
        # with its type and whether it is repeated; filled in by ``_type``.
        self.fields: dict[str, tuple[_Type, bool]] = {}


_TYPES: Final[dict[str, _Type]] = {}


def _type(descriptor: Descriptor) -> _Type:
    """The walk's view of a message type (and of those it holds), made once, at import."""
    known = _TYPES.get(descriptor.full_name)
    if known is not None:
        return known
    made = _TYPES[descriptor.full_name] = _Type(descriptor)  # first: the types nest in a cycle
    for field in descriptor.fields:
        sub = field.message_type
        if sub is None or sub.GetOptions().map_entry or sub.full_name.startswith("google."):
            continue
        made.fields[field.name] = made.fields[field.json_name] = (_type(sub), field.is_repeated)
    return made


# Made whole here, before any parse thread can see it half made.
_REQUEST_TYPE: Final = _type(ExportRequest.DESCRIPTOR)


def _check_shape(document: dict[str, object]) -> None:
    """Check that every message in ``document`` is an object (a list of them where repeated).

    protobuf's ``ParseDict`` reads a string where a message belongs as the
    names of fields it does not know, and ignores them: an attribute written
    ``"value": "churn"`` would become an empty value, a ``"status": "ERROR"``
    an OK span, all answered 200. Also turns the hex ids of spans and links
    into the base64 protobuf reads. One pass over the objects, in the body's
    order, without recursion; it holds one iterator per level of nesting.

    Raises:
        OtlpJsonError: naming where in the body the first misshapen field lies.
    """
    stack = [_messages_in(document, _REQUEST_TYPE, None)]
    while stack:
        child = next(stack[-1], None)
        if child is None:
            stack.pop()
        else:
            stack.append(_messages_in(*child))


_Message: TypeAlias = tuple[dict[str, object], _Type, _Place]


def _messages_in(item: dict[str, object], kind: _Type, place: _Place) -> Iterator[_Message]:
    """The messages held by ``item`` (a message of type ``kind``) that need a look, checked.

    A message with no field to look into (an attribute's ``{"stringValue":
    ...}``: most of a body) is checked here, not handed back.

    Raises:
        OtlpJsonError: one is not an object, or a repeated field not a list.
    """
    if kind.hex_ids:
        _hex_ids_to_base64(item, place)
    fields = kind.fields
    for key, value in item.items():
        field = fields.get(key)
        if field is None or value is None:  # not a message; or null: the field is unset
            continue
        sub, repeated = field
        if not repeated:
            if not isinstance(value, dict):
                raise OtlpJsonError(f"{_path((place, key, None))} must be an object")
            if sub.hex_ids or not sub.fields.keys().isdisjoint(value):
                yield value, sub, (place, key, None)
            continue
        if not isinstance(value, list):
            raise OtlpJsonError(f"{_path((place, key, None))} must be a list")
        look = sub.hex_ids or bool(sub.fields)
        for index, element in enumerate(value):
            if not isinstance(element, dict):
                raise OtlpJsonError(f"{_path((place, key, index))} must be an object")
            if look:
                yield element, sub, (place, key, index)


def parse_protobuf(body: bytes) -> ExportRequest:
    """Decode an OTLP protobuf body (gRPC or HTTP), once its span count is within bounds.

    Raises:
        TooManySpansError: more spans than a body of its size may carry.
        DecodeError: not an ExportTraceServiceRequest (or nested too deep).
    """
    most = max(_MIN_SPANS, len(body) // _BYTES_PER_SPAN)
    # A span takes two bytes at least: a smaller body cannot hold too many.
    if len(body) > 2 * most and count_spans(body, most) > most:
        raise TooManySpansError(f"more than {most} spans in one request")
    return ExportRequest.FromString(body)


def count_spans(body: bytes, most: int) -> int:
    """The spans of an ExportTraceServiceRequest, counted on the wire, without parsing it.

    Walks resource_spans (1) -> scope_spans (2) -> spans (2), skipping each
    span by its length, and stops once past ``most``: some ten times cheaper
    than parsing. Bytes it cannot walk end the count early: the parser that
    follows says what is wrong with them.
    """
    count = 0
    try:
        for rs_start, rs_end in _embedded(body, 0, len(body), 1):
            for ss_start, ss_end in _embedded(body, rs_start, rs_end, 2):
                for _ in _embedded(body, ss_start, ss_end, 2):
                    count += 1
                    if count > most:
                        return count
    except IndexError:  # a varint cut off by the end of the body
        pass
    return count


def _embedded(data: bytes, pos: int, end: int, number: int) -> Iterator[tuple[int, int]]:
    """Where each length-delimited field ``number`` of the message in ``data[pos:end]`` lies."""
    while pos < end:
        key, pos = _varint(data, pos)
        kind = key & 7
        if kind == 2:  # length-delimited
            size, pos = _varint(data, pos)
            if key >> 3 == number and pos + size <= end:
                yield pos, pos + size
            pos += size
        elif kind == 0:  # varint
            pos = _varint(data, pos)[1]
        elif kind in (1, 5):  # fixed64, fixed32
            pos += 8 if kind == 1 else 4
        elif kind == 3:  # a group: protobuf skips it and reads on, so does the count
            pos = _past_group(data, pos, end)
        else:  # not protobuf: left to the parser
            return


def _past_group(data: bytes, pos: int, end: int) -> int:
    """The position after the group whose start tag ended at ``pos`` (``end`` if it never ends)."""
    depth = 1
    while pos < end:
        key, pos = _varint(data, pos)
        kind = key & 7
        if kind == 3:
            depth += 1
        elif kind == 4:
            depth -= 1
            if depth == 0:
                return pos
        elif kind == 2:
            size, pos = _varint(data, pos)
            pos += size
        elif kind == 0:
            pos = _varint(data, pos)[1]
        elif kind in (1, 5):
            pos += 8 if kind == 1 else 4
        else:
            return end
    return end


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it (IndexError past the end)."""
    if data[pos] < 0x80:  # the common case: tags, and lengths under 128
        return data[pos], pos + 1
    value = shift = 0
    for _ in range(10):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise IndexError("overlong varint")


def parse_json(body: bytes) -> trace_service_pb2.ExportTraceServiceRequest:
    """Decode an OTLP/HTTP JSON body (hex ids, lowerCamelCase or snake_case keys).

    Unknown fields are ignored, as the OTLP spec asks of receivers; a known
    field holding the wrong kind of JSON value is not.

    Raises:
        OtlpJsonError: not JSON, nested too deep, too many objects, or not the
            request's shape (a message that is not an object names its place).
    """
    # protobuf's ParseDict walks every object in Python (some microseconds
    # each): a body of nothing but ``{}`` would cost seconds of CPU. Braces
    # are counted first, at C speed (those in strings too: a generous bound).
    most = max(_MIN_JSON_OBJECTS, len(body) // _BYTES_PER_JSON_OBJECT)
    if body.count(b"{") > most:
        raise OtlpJsonError(f"more than {most} JSON objects in one request")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise OtlpJsonError("not JSON (or nested too deep)") from None
    if not isinstance(document, dict):
        raise OtlpJsonError("the body must be a JSON object")
    # Protobuf's JSON parser takes a field under its name or its lowerCamelCase
    # json_name: the walk follows both, or a snake_case body's hex ids would
    # be read as base64 (and its misshapen fields let through).
    _check_shape(document)
    try:
        return json_format.ParseDict(document, ExportRequest(), ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError, TypeError, ValueError) as exc:
        raise OtlpJsonError(str(exc)[:200]) from None


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
