"""OTLP/JSON request bodies: hex ids, either spelling of field names, checked shape.

Used by the receiver (``_otlp``, through ``_otlp_body``) on an OTLP/HTTP body
already read and inflated: once a cheap count says it is not a bomb of tiny
objects, the JSON is walked once to check that every message is an object
(protobuf's parser would quietly read a misshapen one as empty) and to turn
the hex ids of spans and links into base64, then made an
``ExportTraceServiceRequest``.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from typing import Final, TypeAlias

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from predtrace.sidecar._otlp_protobuf import ExportRequest

# At least this many objects are taken (about 4,000 spans of 30 attributes
# each), and more in a bigger body: one per 16 bytes (a real span spends some
# 25 bytes an object; a bomb of ``{}`` 2 or 3).
_MIN_JSON_OBJECTS: Final = 250_000
_BYTES_PER_JSON_OBJECT: Final = 16


class OtlpJsonError(ValueError):
    """An OTLP/JSON body that does not describe an ExportTraceServiceRequest."""


# OTLP/JSON writes these bytes fields as hex, where protobuf's JSON mapping says
# base64: each with the hex digits it takes (16 bytes for a trace, 8 for a span).
_HEX_ID_FIELDS: Final = {
    "traceId": 32,
    "spanId": 16,
    "parentSpanId": 16,
    "trace_id": 32,
    "span_id": 16,
    "parent_span_id": 16,
}
_HEX: Final = re.compile(r"[0-9a-fA-F]*")
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
    """Turn the hex ids of a span or link into base64, checking their digits and length.

    An id of the wrong length is refused here, naming it as written (the
    conversion would refuse its bytes too: ``_otlp_spans.SpanIdLengthError``).
    """
    for key, digits in _HEX_ID_FIELDS.items():
        value = item.get(key)
        if isinstance(value, str) and value:
            if not _HEX.fullmatch(value):  # bytes.fromhex would also take spaces
                raise OtlpJsonError(f"{_path((place, key, None))} must be hex")
            if len(value) != digits:
                raise OtlpJsonError(
                    f"{_path((place, key, None))} is {len(value)} hex digits: it must be"
                    f" {digits}, or empty"
                )
            item[key] = base64.b64encode(bytes.fromhex(value)).decode()


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
