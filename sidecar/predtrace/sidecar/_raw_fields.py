"""Messages of ``bytes`` fields only, read by protobuf's own parser (upb, in C).

Where the sidecar needs a few fields of a message it does not otherwise
parse (the OIP proxy's model_name, model_version and id; a RecordBatchRequest
protobuf refused whole; the id of an event it rejects unread), it declares a
private message holding just those fields as ``bytes``: protobuf skips the
rest (unknown fields and groups) in C, so the cost does not grow with the
fields the sidecar is not looking at, proto3's rules hold (the last
occurrence of a field wins; a field of another wire type is an unknown
one), and text that is not UTF-8 leaves the message readable. A scan in
Python took about a second for a message of a million tiny fields, on the
event loop.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

_PACKAGE = "predtrace.sidecar.raw"
_POOL = descriptor_pool.DescriptorPool()  # private: no clash with the real messages' names
_BYTES = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED


def bytes_message(name: str, fields: Sequence[tuple[int, str, bool]]) -> type[Message]:
    """A proto3 message class named ``name`` of ``(number, field name, repeated)`` bytes fields."""
    file = descriptor_pb2.FileDescriptorProto(
        name=f"predtrace/sidecar/raw/{name.lower()}.proto", package=_PACKAGE, syntax="proto3"
    )
    message = file.message_type.add(name=name)
    for number, field_name, repeated in fields:
        message.field.add(
            name=field_name,
            number=number,
            type=_BYTES,
            label=_REPEATED if repeated else _OPTIONAL,
        )
    _POOL.Add(file)
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
