from predtrace.v1 import batch_pb2 as _batch_pb2
from predtrace.v1 import event_pb2 as _event_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RecordBatchRequest(_message.Message):
    __slots__ = ("events", "packed_events", "batch_id")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    PACKED_EVENTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_event_pb2.PredictionEvent]
    packed_events: bytes
    batch_id: bytes
    def __init__(self, events: _Optional[_Iterable[_Union[_event_pb2.PredictionEvent, _Mapping]]] = ..., packed_events: _Optional[bytes] = ..., batch_id: _Optional[bytes] = ...) -> None: ...

class RecordAck(_message.Message):
    __slots__ = ("accepted", "rejected", "read_packed", "duplicate")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    READ_PACKED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejected: _containers.RepeatedCompositeFieldContainer[_batch_pb2.Rejection]
    read_packed: bool
    duplicate: bool
    def __init__(self, accepted: _Optional[int] = ..., rejected: _Optional[_Iterable[_Union[_batch_pb2.Rejection, _Mapping]]] = ..., read_packed: _Optional[bool] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SidecarStatus(_message.Message):
    __slots__ = ("producer_id", "spool_records", "spool_bytes", "spool_byte_cap", "oldest_unsent_unix_nano", "last_success_unix_nano", "next_seq", "exported_events", "retried_batches", "quarantined_batches", "dropped", "collector_url", "last_error")
    class DroppedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PRODUCER_ID_FIELD_NUMBER: _ClassVar[int]
    SPOOL_RECORDS_FIELD_NUMBER: _ClassVar[int]
    SPOOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SPOOL_BYTE_CAP_FIELD_NUMBER: _ClassVar[int]
    OLDEST_UNSENT_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    LAST_SUCCESS_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQ_FIELD_NUMBER: _ClassVar[int]
    EXPORTED_EVENTS_FIELD_NUMBER: _ClassVar[int]
    RETRIED_BATCHES_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_BATCHES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    COLLECTOR_URL_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    producer_id: str
    spool_records: int
    spool_bytes: int
    spool_byte_cap: int
    oldest_unsent_unix_nano: int
    last_success_unix_nano: int
    next_seq: int
    exported_events: int
    retried_batches: int
    quarantined_batches: int
    dropped: _containers.ScalarMap[str, int]
    collector_url: str
    last_error: str
    def __init__(self, producer_id: _Optional[str] = ..., spool_records: _Optional[int] = ..., spool_bytes: _Optional[int] = ..., spool_byte_cap: _Optional[int] = ..., oldest_unsent_unix_nano: _Optional[int] = ..., last_success_unix_nano: _Optional[int] = ..., next_seq: _Optional[int] = ..., exported_events: _Optional[int] = ..., retried_batches: _Optional[int] = ..., quarantined_batches: _Optional[int] = ..., dropped: _Optional[_Mapping[str, int]] = ..., collector_url: _Optional[str] = ..., last_error: _Optional[str] = ...) -> None: ...
