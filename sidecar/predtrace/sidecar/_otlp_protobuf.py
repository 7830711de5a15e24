"""OTLP protobuf request bodies (gRPC and HTTP), parsed once their spans are counted.

Used by the receiver (``_otlp``, through ``_otlp_body``) on a body already
read and inflated: its spans are first counted on the wire, without parsing
(some ten times cheaper), and a body holding more than its size may carry is
refused before protobuf builds a single span.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

# What both encodings are parsed into (OTLP/JSON's parser makes one too).
ExportRequest = trace_service_pb2.ExportTraceServiceRequest

# At least this many spans are taken in one protobuf request, and more in a
# bigger body: one per 64 bytes. An SDK exports 512 at most, a Collector some
# thousands; a parsed span costs some 180 bytes even when empty (2 on the
# wire), so a 4 MiB body of two million empty spans would cost 360 MB.
_MIN_SPANS: Final = 100_000
_BYTES_PER_SPAN: Final = 64


class TooManySpansError(ValueError):
    """A protobuf request with more spans than a body of its size may carry."""


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
