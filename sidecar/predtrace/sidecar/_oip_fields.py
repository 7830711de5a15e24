"""model_name, model_version and id of an OIP v2 ModelInfer message, read by protobuf's C parser.

Client -> OipProxy (reads these three fields of each ModelInfer request and
response, adds an id) -> model server. The fields are 1-3 of both
ModelInferRequest and ModelInferResponse; a private three-field message reads
them with protobuf's own parser (upb, in C), so the cost of a message does not
grow with how many fields the proxy is not looking at, and proto3's rules
hold: the last occurrence of a field wins, unknown fields and groups are
skipped. The fields are declared ``bytes``, not ``string``: an id that is not
UTF-8 leaves the message readable, and is itself marked unreadable.
"""

from __future__ import annotations

from typing import Final, NamedTuple, Protocol, cast

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

_MAX_TEXT: Final = 4096
_NAMES: Final = ("model_name", "model_version", "id")
_PACKAGE: Final = "predtrace.sidecar.oip"
_FULL_NAME: Final = f"{_PACKAGE}.Fields"


class OipFields(NamedTuple):
    """The three fields as text: "" when absent (or empty), None when unreadable."""

    model_name: str | None
    model_version: str | None
    id: str | None


class _Raw(Protocol):
    model_name: bytes
    model_version: bytes
    id: bytes


def _message_class() -> type[Message]:
    """Fields 1-3 as proto3 ``bytes``, in a pool of their own (no name clash with the OIP's)."""
    file = descriptor_pb2.FileDescriptorProto(
        name="predtrace/sidecar/oip_fields.proto", package=_PACKAGE, syntax="proto3"
    )
    message = file.message_type.add(name="Fields")
    for number, name in enumerate(_NAMES, start=1):
        message.field.add(
            name=name,
            number=number,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(_FULL_NAME))


_FIELDS: Final = _message_class()


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
