"""OTLP request bodies: the HTTP content decoding and the two encodings' parsers.

Used by the receiver (``_otlp``) before any span is looked at: a compressed
body is inflated here, bounded and checked to end properly (aiohttp's own
inflation is off); a protobuf or JSON body becomes an
``ExportTraceServiceRequest``, JSON with its hex ids and either spelling of
the field names.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Iterator
from typing import Final

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from predtrace.wire import WireTooLargeError

ExportRequest = trace_service_pb2.ExportTraceServiceRequest
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


def _hex_ids_to_base64(item: dict[str, object]) -> None:
    for key in _HEX_ID_FIELDS:
        value = item.get(key)
        if isinstance(value, str) and value:
            try:
                item[key] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                raise OtlpJsonError(f"{key} must be hex") from None


def _list(value: object, where: str) -> list[object]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise OtlpJsonError(f"{where} must be a list")
    return value


def _items(parent: dict[str, object], *keys: str) -> Iterator[dict[str, object]]:
    """The objects listed in ``parent``'s field, under each of its spellings."""
    for key in keys:
        for item in _list(parent.get(key), key):
            if not isinstance(item, dict):
                raise OtlpJsonError(f"{key}[] must be objects")
            yield item


def parse_protobuf(body: bytes) -> ExportRequest:
    """Decode an OTLP protobuf body (gRPC or HTTP).

    Raises:
        DecodeError: not an ExportTraceServiceRequest (or nested too deep).
    """
    return ExportRequest.FromString(body)


def parse_json(body: bytes) -> trace_service_pb2.ExportTraceServiceRequest:
    """Decode an OTLP/HTTP JSON body (hex ids, lowerCamelCase or snake_case keys).

    Unknown fields are ignored, as the OTLP spec asks of receivers.

    Raises:
        OtlpJsonError: not JSON, nested too deep, too many objects, or not the
            request's shape.
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
    # json_name: the walk to the ids follows both, or a snake_case body's hex
    # ids would be read as base64.
    for resource_spans in _items(document, "resourceSpans", "resource_spans"):
        for scope_spans in _items(resource_spans, "scopeSpans", "scope_spans"):
            for span in _items(scope_spans, "spans"):
                _hex_ids_to_base64(span)
                for link in _items(span, "links"):
                    _hex_ids_to_base64(link)
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
