"""predtrace's wire contract: the event type, the msgpack batch codec and ids.

Everything that crosses a process boundary is defined here; this package
depends on nothing else of predtrace. The .proto files beside it
(``predtrace/v1``) are the source of truth for field numbers.
"""

from predtrace.wire._codec import (
    FORMAT_MINOR,
    DecodedBatch,
    RawBatch,
    batch_digest,
    decode_ack,
    decode_batch,
    decode_batch_raw,
    encode_ack,
    encode_batch,
    encode_events_payload,
    event_rejection,
    gunzip_bounded,
    gzip_bytes,
    pack_events,
    unpack_event_maps,
    unpack_events,
)
from predtrace.wire._errors import InvalidIdError, PredtraceError, WireError, WireTooLargeError
from predtrace.wire._event import (
    DeploymentRef,
    EventBatch,
    IngestAck,
    ModelRef,
    OutputSummary,
    PredictionEvent,
    Rejection,
    Status,
)
from predtrace.wire._event_reader import PackedEvents, open_packed_events
from predtrace.wire._ids import (
    CALLER_ID_RE,
    UuidV7Generator,
    classify_lookup_id,
    format_trace_id,
    new_prediction_id,
    parse_prediction_id,
    parse_span_id,
    parse_trace_id,
    producer_id_base,
    restarted_producer_id,
    uuid7_timestamp_ms,
)
from predtrace.wire._limits import DEFAULT_LIMITS, DecodeLimits
from predtrace.wire._maps import event_from_map, event_to_map
from predtrace.wire._plain import canonical_event_map, plain_event_map, plain_map_problem
from predtrace.wire._problems import event_problem
from predtrace.wire._proto import event_from_proto, event_to_proto
from predtrace.wire._reader import FORMAT_MAJOR, BatchHeader, read_batch_events, read_batch_header

__all__ = [
    "CALLER_ID_RE",
    "DEFAULT_LIMITS",
    "FORMAT_MAJOR",
    "FORMAT_MINOR",
    "BatchHeader",
    "DecodeLimits",
    "DecodedBatch",
    "DeploymentRef",
    "EventBatch",
    "IngestAck",
    "InvalidIdError",
    "ModelRef",
    "OutputSummary",
    "PackedEvents",
    "PredictionEvent",
    "PredtraceError",
    "RawBatch",
    "Rejection",
    "Status",
    "UuidV7Generator",
    "WireError",
    "WireTooLargeError",
    "batch_digest",
    "canonical_event_map",
    "classify_lookup_id",
    "decode_ack",
    "decode_batch",
    "decode_batch_raw",
    "encode_ack",
    "encode_batch",
    "encode_events_payload",
    "event_from_map",
    "event_from_proto",
    "event_problem",
    "event_rejection",
    "event_to_map",
    "event_to_proto",
    "format_trace_id",
    "gunzip_bounded",
    "gzip_bytes",
    "new_prediction_id",
    "open_packed_events",
    "pack_events",
    "parse_prediction_id",
    "parse_span_id",
    "parse_trace_id",
    "plain_event_map",
    "plain_map_problem",
    "producer_id_base",
    "read_batch_events",
    "read_batch_header",
    "restarted_producer_id",
    "unpack_event_maps",
    "unpack_events",
    "uuid7_timestamp_ms",
]
