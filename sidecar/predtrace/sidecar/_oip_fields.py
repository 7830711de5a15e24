"""model_name, model_version and id of an OIP v2 ModelInfer message, read by protobuf's C parser.

Client -> OipProxy (reads these three fields of each ModelInfer request and
response, adds an id) -> model server. The fields are 1-3 of both
ModelInferRequest and ModelInferResponse, read as ``bytes`` by a private
message (``_raw_fields``): the cost of a message does not grow with the
fields the proxy is not looking at, and an id that is not UTF-8 leaves the
message readable, and is itself marked unreadable.
"""

from __future__ import annotations

from typing import Final, NamedTuple, Protocol, cast

from google.protobuf.message import DecodeError

from predtrace.sidecar._raw_fields import bytes_message

_MAX_TEXT: Final = 4096


class OipFields(NamedTuple):
    """The three fields as text: "" when absent (or empty), None when unreadable."""

    model_name: str | None
    model_version: str | None
    id: str | None


class _Raw(Protocol):
    model_name: bytes
    model_version: bytes
    id: bytes


_FIELDS: Final = bytes_message(
    "OipFields", [(1, "model_name", False), (2, "model_version", False), (3, "id", False)]
)


def read_fields(message: bytes) -> OipFields | None:
    """The three fields of a ModelInfer request or response; None if the bytes are malformed."""
    try:
        raw = cast("_Raw", _FIELDS.FromString(message))
    except DecodeError:
        return None
    return OipFields(_text(raw.model_name), _text(raw.model_version), _text(raw.id))


def id_field(value: str) -> bytes:
    """The id field, to append to a request (the last occurrence wins when parsed)."""
    return _FIELDS(id=value.encode("utf-8")).SerializeToString()


def _text(raw: bytes) -> str | None:
    """The field as text; None when it is over 4 KiB or not UTF-8."""
    if len(raw) > _MAX_TEXT:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
