"""The msgpack batch codec: EventBatch <-> bytes on the wire (proto/FORMAT.md).

Producers encode after the queue (in the exporter) and the collector decodes
on ingest. Map keys are the proto field numbers, key 0 of a batch holds the
format version. The decoder is bounded in every dimension and raises only
WireError: a bad batch is refused with a reason, a bad event inside a good
batch is rejected alone (partial success).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast

import msgpack

from predtrace.wire._errors import WireError, WireTooLargeError
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

FORMAT_MAJOR: Final = 1
FORMAT_MINOR: Final = 0
GZIP_MAGIC: Final = b"\x1f\x8b"
_UINT64_MAX: Final = 2**64 - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeLimits:
    """Bounds applied while decoding untrusted bytes.

    Example:
        >>> decode_batch(body, limits=DecodeLimits(max_events=1000))
    """

    max_bytes: int = 16 * 1024 * 1024
    max_decompressed_bytes: int = 64 * 1024 * 1024
    max_events: int = 10_000
    max_str_len: int = 64 * 1024
    max_bin_len: int = 64 * 1024
    max_map_len: int = 1024
    max_id_len: int = 256

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_decompressed_bytes", "max_events", "max_str_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DecodeLimits.{name} must be positive")


DEFAULT_LIMITS: Final = DecodeLimits()


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """A decoded batch: the valid events, the rejected ones, and its digest.

    ``digest`` is the SHA-256 of the uncompressed msgpack bytes: the next batch
    of the same producer carries it as ``prev_digest``.
    """

    batch: EventBatch
    rejected: tuple[Rejection, ...]
    digest: bytes


# -- encoding -----------------------------------------------------------------


# Explicit tests instead of tables of (key, value) pairs: this runs once per
# event on every producer (~30 % faster), and the key order, hence the bytes,
# is the same.


INT63_MAX: Final = 2**63 - 1  # the largest signed 64-bit integer: seq, times as stored


def _model_to_map(model: ModelRef) -> dict[int, str]:
    m: dict[int, str] = {}
    if model.name:
        m[1] = model.name
    if model.version:
        m[2] = model.version
    if model.alias:
        m[3] = model.alias
    if model.registry_model_id:
        m[4] = model.registry_model_id
    if model.artifact_digest:
        m[5] = model.artifact_digest
    if model.role:
        m[6] = model.role
    return m


def _deployment_to_map(dep: DeploymentRef) -> dict[int, str]:
    m: dict[int, str] = {}
    if dep.id:
        m[1] = dep.id
    if dep.service:
        m[2] = dep.service
    if dep.namespace:
        m[3] = dep.namespace
    if dep.pod:
        m[4] = dep.pod
    if dep.node:
        m[5] = dep.node
    if dep.image_digest:
        m[6] = dep.image_digest
    if dep.image_name:
        m[7] = dep.image_name
    return m


def _output_to_map(out: OutputSummary) -> dict[int, str | float]:
    result: dict[int, str | float] = {}
    if out.label is not None:
        result[1] = out.label
    if out.score is not None:
        result[2] = out.score
    if out.value is not None:
        result[3] = out.value
    return result


def event_to_map(event: PredictionEvent) -> dict[int, Any]:  # noqa: PLR0912 - one test per field, flat on purpose
    """Return the int-keyed map of one event, omitting empty fields."""
    m: dict[int, Any] = {1: event.prediction_id}
    if event.trace_id:
        m[2] = event.trace_id
    if event.span_id:
        m[3] = event.span_id
    if event.timestamp_unix_nano:
        m[4] = event.timestamp_unix_nano
    if event.duration_nanos:
        m[5] = event.duration_nanos
    model = _model_to_map(event.model)
    if model:
        m[6] = model
    if event.additional_models:
        m[7] = [_model_to_map(x) for x in event.additional_models]
    deployment = _deployment_to_map(event.deployment)
    if deployment:
        m[8] = deployment
    if event.endpoint:
        m[9] = event.endpoint
    if event.protocol:
        m[10] = event.protocol
    if event.status:
        m[11] = int(event.status)
    if event.status_code:
        m[12] = event.status_code
    if event.error_type:
        m[13] = event.error_type
    if event.input_fingerprint:
        m[14] = event.input_fingerprint
    if event.features:
        m[16] = event.features
    if event.attributes:
        m[17] = event.attributes
    if event.sampled:
        m[18] = event.sampled
    if event.output is not None:
        # Present even when empty: "an output summary with nothing in it" is
        # not the same as "no output recorded".
        m[15] = _output_to_map(event.output)
    return m


def encode_events_payload(batch: EventBatch) -> bytes:
    """Encode a batch to uncompressed msgpack bytes (what the digest covers)."""
    body: dict[int, Any] = {
        0: [FORMAT_MAJOR, FORMAT_MINOR],
        1: batch.producer_id,
        2: batch.seq,
        6: [event_to_map(e) for e in batch.events],
    }
    if batch.batch_id:
        body[3] = batch.batch_id
    if batch.created_at_unix_nano:
        body[4] = batch.created_at_unix_nano
    if batch.prev_digest:
        body[5] = batch.prev_digest
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def pack_events(events: Sequence[PredictionEvent]) -> bytes:
    """A msgpack array of event maps: ``RecordBatchRequest.packed_events``.

    Example:
        >>> RecordBatchRequest(packed_events=pack_events(events))
    """
    return msgpack.packb([event_to_map(e) for e in events], use_bin_type=True)  # type: ignore[no-any-return]


def unpack_events(
    data: bytes, *, first_index: int = 0, limits: DecodeLimits = DEFAULT_LIMITS
) -> tuple[list[PredictionEvent], list[int], list[Rejection]]:
    """Read ``pack_events`` bytes: the good events, their positions, and rejections.

    A bad event is rejected alone (positions count from ``first_index``).
    Strings, binaries and maps are bounded here by the size of ``data`` only:
    one event over the per-field limits must not cost the others, so those
    are the consumer's to check per event (``event_problem``, as the
    sidecar's intake does for every event).

    Raises:
        WireTooLargeError: more bytes or events than ``limits`` allow.
        WireError: the bytes are not a msgpack array (nothing is accepted).
    """
    raw = unpack_event_maps(data, limits=limits)
    return _events_from_maps(raw, limits, first_index=first_index)


def unpack_event_maps(data: bytes, *, limits: DecodeLimits = DEFAULT_LIMITS) -> list[object]:
    """The items of ``pack_events`` bytes, not yet checked (``event_from_map`` checks one).

    Raises:
        WireTooLargeError: more bytes or events than ``limits`` allow.
        WireError: the bytes are not a msgpack array.
    """
    if len(data) > limits.max_bytes:
        raise WireTooLargeError(f"packed events exceed {limits.max_bytes} bytes")
    declared = _declared_array_len(data)
    if declared is None:
        raise WireError("packed events must be a msgpack array")
    if declared > limits.max_events:
        # Refused from the array header, before one item is built.
        raise WireTooLargeError(f"more than {limits.max_events} packed events")
    size = max(len(data), 1)
    whole = DecodeLimits(max_events=size, max_str_len=size, max_bin_len=size, max_map_len=size)
    raw = unpack_bounded(data, whole)
    if not isinstance(raw, list):
        raise WireError("packed events must be a msgpack array")
    if len(raw) > limits.max_events:
        raise WireTooLargeError(f"more than {limits.max_events} packed events")
    return raw


def _declared_array_len(data: bytes) -> int | None:
    """The item count an msgpack array header at the start of ``data`` declares.

    None when ``data`` does not start with an array header (or is cut in it).
    """
    if not data:
        return None
    first = data[0]
    if 0x90 <= first <= 0x9F:  # fixarray
        return first & 0x0F
    width = {0xDC: 2, 0xDD: 4}.get(first)
    if width is None or len(data) < 1 + width:
        return None
    return int.from_bytes(data[1 : 1 + width], "big")


def _events_from_maps(
    items: Sequence[object], limits: DecodeLimits, *, first_index: int = 0
) -> tuple[list[PredictionEvent], list[int], list[Rejection]]:
    """Build events from raw maps: the good ones, their positions, and rejections."""
    events: list[PredictionEvent] = []
    positions: list[int] = []
    rejected: list[Rejection] = []
    for index, item in enumerate(items, first_index):
        try:
            events.append(event_from_map(item, limits))
        except WireError as exc:
            rejected.append(event_rejection(index, item, exc))
            continue
        positions.append(index)
    return events, positions, rejected


# Level 1: on realistic batches (bench/codec.py's events) it gives 127 bytes an
# event against 123.5 at level 6, for less than half the CPU (2.6 against
# 5.8 us an event), and compression runs once per event in every producer.
GZIP_LEVEL: Final = 1


def encode_batch(batch: EventBatch, *, compress: bool = False, level: int = GZIP_LEVEL) -> bytes:
    """Encode a batch for the wire, gzip'd when ``compress`` is set.

    Example:
        >>> body = encode_batch(EventBatch("edge-7", 1, events), compress=True)
    """
    payload = encode_events_payload(batch)
    if not compress:
        return payload
    return gzip_bytes(payload, level)


def gzip_bytes(payload: bytes, level: int = GZIP_LEVEL) -> bytes:
    """Gzip ``payload`` (a standard gzip member, mtime 0 for reproducible bytes)."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
    return compressor.compress(payload) + compressor.flush()


def batch_digest(payload: bytes) -> bytes:
    """SHA-256 of uncompressed batch bytes: the link of the per-producer chain."""
    return hashlib.sha256(payload).digest()


# -- decoding -----------------------------------------------------------------


def gunzip_bounded(data: bytes, max_bytes: int) -> bytes:
    """Decompress a gzip payload, refusing to produce more than ``max_bytes``.

    Raises:
        WireTooLargeError: the output would exceed ``max_bytes`` (gzip bomb).
        WireError: the bytes are not valid gzip.
    """
    decompressor = zlib.decompressobj(31)
    try:
        out = decompressor.decompress(data, max_bytes + 1)
    except zlib.error as exc:
        raise WireError(f"invalid gzip data: {exc}") from None
    if len(out) > max_bytes or decompressor.unconsumed_tail:
        raise WireTooLargeError(f"decompressed body exceeds {max_bytes} bytes")
    if not decompressor.eof:
        raise WireError("truncated gzip data")
    if decompressor.unused_data:
        raise WireError("trailing bytes after the gzip data (one gzip member only)")
    return out


def unpack_bounded(payload: bytes, limits: DecodeLimits) -> object:
    """Unpack msgpack bytes with every declared length, and the number of containers, bounded.

    An empty map or array is one byte on the wire and some 60 in memory: a
    body of nothing else would cost about 75 times its size. What predtrace's
    encoder writes spends at least three bytes a container (the densest event,
    a one-character id and an empty output, is six bytes in two; an empty
    additional model, one byte, is refused by ``event_problem``), so at most
    one container per ``_BYTES_PER_CONTAINER`` bytes is allowed: some 30 times
    the bytes at worst.

    Raises:
        WireError: malformed, truncated, trailing data or a bound exceeded.
    """
    count = itertools.count()
    most = len(payload) // _BYTES_PER_CONTAINER + 64

    def counted(container: _C) -> _C:
        if next(count) > most:
            raise _TooManyContainersError
        return container

    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=False,
            use_list=True,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=max(limits.max_events, limits.max_map_len),
            max_map_len=limits.max_map_len,
            max_ext_len=0,
            object_hook=counted,
            list_hook=counted,
        )
    except _TooManyContainersError:
        raise WireError(
            f"more than one map or array per {_BYTES_PER_CONTAINER} bytes of msgpack"
        ) from None
    except msgpack.ExtraData:
        raise WireError("trailing bytes after the msgpack value") from None
    except (msgpack.OutOfData, msgpack.FormatError, msgpack.StackError) as exc:
        raise WireError(f"malformed msgpack: {type(exc).__name__}") from None
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise WireError(f"malformed msgpack: {_short(exc)}") from None


_BYTES_PER_CONTAINER: Final = 2
_C = TypeVar("_C")


class _TooManyContainersError(Exception):
    """Raised inside the decoder's hooks; becomes a WireError."""


def _short(exc: BaseException) -> str:
    return str(exc).split("\n", 1)[0][:120]


@dataclass(frozen=True, slots=True)
class RawBatch:
    """A batch whose header is checked but whose events are still int-keyed maps.

    For a consumer with its own fast path per event (the collector builds its
    store rows straight from the maps); ``event_from_map`` is the precise path
    that decides every rejection and its reason.
    """

    producer_id: str
    seq: int
    batch_id: bytes
    created_at_unix_nano: int
    prev_digest: bytes
    events: list[Any]
    digest: bytes


def decode_batch_raw(data: bytes, *, limits: DecodeLimits = DEFAULT_LIMITS) -> RawBatch:
    """Decode wire bytes (gzip'd or not) and check the batch header, not the events.

    Raises:
        WireTooLargeError: the body or its decompressed form is over the limits.
        WireError: the batch itself is malformed (the whole body is refused).
    """
    if len(data) > limits.max_bytes:
        raise WireTooLargeError(f"body exceeds {limits.max_bytes} bytes")
    payload = data
    if data[:2] == GZIP_MAGIC:
        payload = gunzip_bounded(data, limits.max_decompressed_bytes)
    raw = unpack_bounded(payload, limits)
    if not isinstance(raw, dict):
        raise WireError("batch must be a msgpack map")
    _check_version(raw.get(0))
    producer_id = _batch_str(raw, 1, "producer_id", required=True, max_len=limits.max_id_len)
    if "\x00" in producer_id:
        raise WireError("producer_id must not contain NUL characters")
    seq = raw.get(2)
    if not isinstance(seq, int) or not _is_uint(seq) or seq == 0 or seq > INT63_MAX:
        raise WireError("seq must be a positive integer below 2**63")
    raw_events = raw.get(6, [])
    if not isinstance(raw_events, list):
        raise WireError("events must be an array")
    if len(raw_events) > limits.max_events:
        raise WireTooLargeError(f"batch holds more than {limits.max_events} events")
    return RawBatch(
        producer_id=producer_id,
        seq=seq,
        batch_id=_batch_bytes(raw, 3, "batch_id"),
        created_at_unix_nano=_batch_uint(raw, 4, "created_at_unix_nano"),
        prev_digest=_batch_bytes(raw, 5, "prev_digest"),
        events=raw_events,
        digest=batch_digest(payload),
    )


def event_rejection(index: int, item: object, exc: WireError) -> Rejection:
    """The rejection of the raw event at ``index`` that ``event_from_map`` refused."""
    pid = item.get(1) if isinstance(item, dict) else None
    return Rejection(index, str(exc), pid if isinstance(pid, str) else "")


def decode_batch(data: bytes, *, limits: DecodeLimits = DEFAULT_LIMITS) -> DecodedBatch:
    """Decode wire bytes (gzip'd or not) into a batch, rejecting bad events alone.

    Raises:
        WireTooLargeError: the body or its decompressed form is over the limits.
        WireError: the batch itself is malformed (the whole body is refused).
    """
    raw = decode_batch_raw(data, limits=limits)
    events, _, rejected = _events_from_maps(raw.events, limits)
    batch = EventBatch(
        producer_id=raw.producer_id,
        seq=raw.seq,
        events=events,
        batch_id=raw.batch_id,
        created_at_unix_nano=raw.created_at_unix_nano,
        prev_digest=raw.prev_digest,
    )
    return DecodedBatch(batch, tuple(rejected), raw.digest)


def _check_version(version: object) -> None:
    if version is None:
        raise WireError("missing format version (key 0)")
    if (
        not isinstance(version, list)
        or len(version) < 2
        or not all(_is_uint(part) for part in version[:2])
    ):
        raise WireError("format version must be [major, minor]")
    if version[0] != FORMAT_MAJOR:
        raise WireError(f"unsupported format major version {version[0]}; this is {FORMAT_MAJOR}")


def _is_uint(value: object) -> bool:
    return type(value) is int and 0 <= value <= _UINT64_MAX


def _batch_str(raw: Mapping[Any, Any], key: int, name: str, *, required: bool, max_len: int) -> str:
    value = raw.get(key, "")
    if not isinstance(value, str):
        raise WireError(f"{name} must be a string")
    if required and not value:
        raise WireError(f"{name} is required")
    if len(value) > max_len:
        raise WireError(f"{name} longer than {max_len} characters")
    return value


def _batch_bytes(raw: Mapping[Any, Any], key: int, name: str) -> bytes:
    value = raw.get(key, b"")
    if not isinstance(value, bytes):
        raise WireError(f"{name} must be bytes")
    return value


def _batch_uint(raw: Mapping[Any, Any], key: int, name: str) -> int:
    value = raw.get(key, 0)
    if not _is_uint(value):
        raise WireError(f"{name} must be a non-negative integer")
    return int(value)


class _Fields:
    """Typed reads from one int-keyed map; every failure names the field."""

    __slots__ = ("raw", "where")

    def __init__(self, raw: object, where: str) -> None:
        if not isinstance(raw, dict):
            raise WireError(f"{where} must be a map")
        self.raw: dict[Any, Any] = raw
        self.where = where

    def text(self, key: int, name: str) -> str:
        value = self.raw.get(key, "")
        if not isinstance(value, str):
            raise WireError(f"{self.where}.{name} must be a string")
        return value

    def blob(self, key: int, name: str, sizes: tuple[int, ...] = ()) -> bytes:
        value = self.raw.get(key, b"")
        if not isinstance(value, bytes):
            raise WireError(f"{self.where}.{name} must be bytes")
        if sizes and len(value) not in sizes:
            raise WireError(f"{self.where}.{name} must be {' or '.join(map(str, sizes))} bytes")
        return value

    def uint(self, key: int, name: str) -> int:
        value = self.raw.get(key, 0)
        if not _is_uint(value):
            raise WireError(f"{self.where}.{name} must be a non-negative integer")
        return int(value)

    def number(self, key: int, name: str) -> float | None:
        value = self.raw.get(key)
        if value is None:
            return None
        if type(value) not in (int, float):
            raise WireError(f"{self.where}.{name} must be a number")
        try:
            number = float(value)
        except OverflowError:
            raise WireError(f"{self.where}.{name} is out of range") from None
        if not math.isfinite(number):
            raise WireError(f"{self.where}.{name} must be a finite number")
        return number

    def optional_str(self, key: int, name: str) -> str | None:
        return self.text(key, name) if key in self.raw else None


def _model_from(raw: object, where: str) -> ModelRef:
    f = _Fields(raw, where)
    return ModelRef(
        f.text(1, "name"),
        f.text(2, "version"),
        f.text(3, "alias"),
        f.text(4, "registry_model_id"),
        f.text(5, "artifact_digest"),
        f.text(6, "role"),
    )


def _deployment_from(raw: object) -> DeploymentRef:
    f = _Fields(raw, "deployment")
    return DeploymentRef(*(f.text(k, n) for k, n in enumerate(_DEPLOYMENT_FIELDS, start=1)))


_DEPLOYMENT_FIELDS: Final = (
    "id",
    "service",
    "namespace",
    "pod",
    "node",
    "image_digest",
    "image_name",
)


def _output_from(raw: object) -> OutputSummary:
    f = _Fields(raw, "output")
    return OutputSummary(f.optional_str(1, "label"), f.number(2, "score"), f.number(3, "value"))


def _str_map(raw: object, name: str, convert: Callable[[object], Any]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise WireError(f"{name} must be a map")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise WireError(f"{name} keys must be strings")
        out[key] = convert(value)
    return out


def _feature_value(value: object) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        raise WireError("features values must be finite numbers")
    return float(value)  # type: ignore[arg-type]


def _attribute_value(value: object) -> str:
    if not isinstance(value, str):
        raise WireError("attributes values must be strings")
    return value


def _strs(raw: object, keys: tuple[int, ...]) -> list[str] | None:
    """The values of ``keys`` of a map of strings ("" when absent), or None if anything is off."""
    if type(raw) is not dict:
        return None
    get = raw.get
    values = [get(k, "") for k in keys]
    for value in values:
        if type(value) is not str:
            return None
    return values


_MODEL_KEYS: Final = (1, 2, 3, 4, 5, 6)
_DEPLOYMENT_KEYS: Final = (1, 2, 3, 4, 5, 6, 7)


def plain_scalars(  # noqa: PLR0917 - six scalar fields of an event map, two bounds
    pid: object,
    trace_id: object,
    span_id: object,
    ts: object,
    duration: object,
    status: object,
    max_id_len: int,
    max_time: int = _UINT64_MAX,
) -> bool:
    """Whether an event map's scalar fields are of the types the decoder keeps as they are.

    The one definition the fast paths share (decode, the sidecar's plain
    maps, the collector's rows); ``max_time`` is 2**63-1 for a store.
    """
    return (
        type(pid) is str
        and 0 < len(pid) <= max_id_len
        and type(trace_id) is bytes
        and len(trace_id) in (0, 16)
        and type(span_id) is bytes
        and len(span_id) in (0, 8)
        and type(ts) is int
        and type(duration) is int
        and 0 <= ts <= max_time
        and 0 <= duration <= max_time
        and type(status) is int
        and status in (0, 1, 2)
    )


def _fast_event(raw: dict[Any, Any], limits: DecodeLimits) -> PredictionEvent | None:
    """Build a well-formed event quickly; None sends it to the precise slow path.

    Accepts a subset of what ``_checked_event`` accepts, so the slow path alone
    decides every rejection and its reason.
    """
    g = raw.get
    pid, trace_id, span_id = g(1), g(2, b""), g(3, b"")
    ts, duration, status = g(4, 0), g(5, 0), g(11, 0)
    model = _strs(g(6, {}), _MODEL_KEYS)
    deployment = _strs(g(8, {}), _DEPLOYMENT_KEYS)
    texts = (g(9, ""), g(10, ""), g(12, ""), g(13, ""))
    features, attributes = g(16, {}), g(17, {})
    if (
        not plain_scalars(pid, trace_id, span_id, ts, duration, status, limits.max_id_len)
        or model is None
        or deployment is None
        or any(type(t) is not str for t in texts)
        or not no_additional_models(raw)
        or type(g(14, b"")) is not bytes
        or type(features) is not dict
        or type(attributes) is not dict
    ):
        return None
    for key, value in features.items():
        if type(key) is not str or type(value) is not float or not math.isfinite(value):
            return None
    for key, value in attributes.items():
        if type(key) is not str or type(value) is not str:
            return None
    output = None
    if 15 in raw:
        output = _fast_output(raw[15])
        if output is None:
            return None
    return PredictionEvent(
        cast("str", pid),  # checked by plain_scalars, as are the next four
        trace_id,
        span_id,
        ts,
        duration,
        ModelRef(*model),
        [],
        DeploymentRef(*deployment),
        texts[0],
        texts[1],
        _STATUSES[status],
        texts[2],
        texts[3],
        g(14, b""),
        output,
        features,
        attributes,
        g(18) is True,
    )


_STATUSES: Final = (Status.UNSET, Status.OK, Status.ERROR)


def finite_floats(values: Iterable[object]) -> bool:
    """Whether every value is a finite float (feature values as the decoder keeps them)."""
    return all(type(value) is float and math.isfinite(value) for value in values)


def no_additional_models(raw: dict[Any, Any]) -> bool:
    """Whether an event map has no additional models in the form the decoder reads as none.

    Absent or an empty array; anything else (a nil, a 0, an empty map) is for
    the checked path, which refuses it with a reason.
    """
    extra = raw.get(7)
    return (extra is None and 7 not in raw) or (type(extra) is list and not extra)


def _fast_output(raw: object) -> OutputSummary | None:
    if type(raw) is not dict:
        return None
    label, score, value = raw.get(1), raw.get(2), raw.get(3)
    if (label is not None or 1 in raw) and type(label) is not str:
        return None  # a nil label is refused by the checked path
    if (score is not None and (type(score) is not float or not math.isfinite(score))) or (
        value is not None and (type(value) is not float or not math.isfinite(value))
    ):
        return None  # the checked path refuses it with a reason
    return OutputSummary(label, score, value)


def event_from_map(raw: object, limits: DecodeLimits = DEFAULT_LIMITS) -> PredictionEvent:
    """Build one event from its int-keyed map; unknown keys are ignored.

    Raises:
        WireError: a known field has the wrong type or the id is missing.
    """
    if type(raw) is dict:
        fast = _fast_event(raw, limits)
        if fast is not None:
            return fast
    return _checked_event(raw, limits)


def _checked_event(raw: object, limits: DecodeLimits) -> PredictionEvent:
    """The precise path: every field checked, every failure named."""
    f = _Fields(raw, "event")
    prediction_id = f.text(1, "prediction_id")
    if not prediction_id:
        raise WireError("event.prediction_id is required")
    if len(prediction_id) > limits.max_id_len:
        raise WireError(f"event.prediction_id longer than {limits.max_id_len} characters")
    status = f.uint(11, "status")
    extra = f.raw.get(7, [])
    if not isinstance(extra, list):
        raise WireError("event.additional_models must be an array")
    return PredictionEvent(
        prediction_id=prediction_id,
        trace_id=f.blob(2, "trace_id", (0, 16)),
        span_id=f.blob(3, "span_id", (0, 8)),
        timestamp_unix_nano=f.uint(4, "timestamp_unix_nano"),
        duration_nanos=f.uint(5, "duration_nanos"),
        model=_model_from(f.raw.get(6, {}), "model"),
        additional_models=[_model_from(m, "additional_models[]") for m in extra],
        deployment=_deployment_from(f.raw.get(8, {})),
        endpoint=f.text(9, "endpoint"),
        protocol=f.text(10, "protocol"),
        status=Status(status) if status in (0, 1, 2) else Status.UNSET,
        status_code=f.text(12, "status_code"),
        error_type=f.text(13, "error_type"),
        input_fingerprint=f.blob(14, "input_fingerprint"),
        output=_output_from(f.raw[15]) if 15 in f.raw else None,
        features=_str_map(f.raw.get(16, {}), "event.features", _feature_value),
        attributes=_str_map(f.raw.get(17, {}), "event.attributes", _attribute_value),
        sampled=f.raw.get(18) is True,
    )


# -- acknowledgements -------------------------------------------------------


def encode_ack(ack: IngestAck) -> bytes:
    """Encode the collector's answer (msgpack, keys from ``IngestAck``)."""
    body: dict[int, Any] = {1: ack.producer_id, 2: ack.seq, 3: ack.accepted}
    if ack.rejected:
        body[4] = [{1: r.index, 2: r.prediction_id, 3: r.reason} for r in ack.rejected]
    if ack.duplicate:
        body[5] = True
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def decode_ack(data: bytes, *, limits: DecodeLimits = DEFAULT_LIMITS) -> IngestAck:
    """Decode the collector's answer.

    Raises:
        WireError: the bytes are not a valid acknowledgement.
    """
    f = _Fields(unpack_bounded(data, limits), "ack")
    raw_rejected = f.raw.get(4, [])
    if not isinstance(raw_rejected, list):
        raise WireError("ack.rejected must be an array")
    rejected = []
    for item in raw_rejected:
        r = _Fields(item, "ack.rejected[]")
        rejected.append(
            Rejection(r.uint(1, "index"), r.text(3, "reason"), r.text(2, "prediction_id"))
        )
    return IngestAck(
        producer_id=f.text(1, "producer_id"),
        seq=f.uint(2, "seq"),
        accepted=f.uint(3, "accepted"),
        rejected=tuple(rejected),
        duplicate=f.raw.get(5) is True,
    )


def _texts(event: PredictionEvent) -> list[str]:
    # One list display instead of a generator of ``yield from``: this runs
    # once per event in the sidecar's intake (about twice as fast).
    model, dep, out = event.model, event.deployment, event.output
    texts = [
        event.prediction_id,
        event.endpoint,
        event.protocol,
        event.status_code,
        event.error_type,
        model.name,
        model.version,
        model.alias,
        model.registry_model_id,
        model.artifact_digest,
        model.role,
        dep.id,
        dep.service,
        dep.namespace,
        dep.pod,
        dep.node,
        dep.image_digest,
        dep.image_name,
        *event.features,
        *event.attributes,
        *event.attributes.values(),
    ]
    if out is not None and out.label:
        texts.append(out.label)
    for extra in event.additional_models:
        texts += (
            extra.name,
            extra.version,
            extra.alias,
            extra.registry_model_id,
            extra.artifact_digest,
            extra.role,
        )
    return texts


def event_problem(event: PredictionEvent, limits: DecodeLimits = DEFAULT_LIMITS) -> str | None:
    """Why a collector would refuse ``event`` (None when it would store it).

    The decoder's bounds (a string or binary over its limit, a map over its
    entries) would refuse a whole batch, and a store cannot hold a time past
    int64 or a NUL in text: a producer checks here before it acknowledges an
    event, so one bad event never costs the batch it would travel in.
    """
    # An event object was built by code, not decoded (which checks numbers):
    # what the collector's decoder would refuse is refused here.
    numbers = _number_problem(event)
    if numbers is not None:
        return numbers
    if _EMPTY_MODEL in event.additional_models:
        # One byte on the wire: a batch of such would pass the decoder's bound
        # of containers per byte and be refused whole.
        return "additional_models[] must not be empty"
    return stored_problem(
        limits,
        times=(event.timestamp_unix_nano, event.duration_nanos),
        texts=_texts(event),
        map_sizes=(len(event.features), len(event.attributes)),
        extra_models=len(event.additional_models),
        fingerprint_len=len(event.input_fingerprint),
    )


_EMPTY_MODEL: Final = ModelRef()


def _number_problem(event: PredictionEvent) -> str | None:
    """Why the decoder would refuse the event's feature or output numbers, if it would."""
    out = event.output
    if out is not None:
        for name, value in (("score", out.score), ("value", out.value)):
            if value is not None and not _finite_number(value):
                return f"output.{name} must be a finite number"
    if event.features and not all(map(_finite_number, event.features.values())):
        return "features values must be finite numbers"
    return None


def _finite_number(value: object) -> bool:
    """A number the decoder keeps: an int or float (not a bool), finite as a float."""
    if type(value) is not int and type(value) is not float:
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past a float's range
        return False


def stored_problem(  # noqa: PLR0911 - one answer per rule, flat on purpose
    limits: DecodeLimits,
    *,
    times: tuple[int, int],
    texts: list[str],
    map_sizes: tuple[int, int],
    extra_models: int,
    fingerprint_len: int,
) -> str | None:
    """The rules of ``event_problem`` on an event's parts (any form of the event)."""
    if times[0] > INT63_MAX or times[1] > INT63_MAX:
        return "timestamp_unix_nano and duration_nanos must fit in int64"
    # One scan of the joined text instead of one per field (a hot path).
    joined = "".join(texts)
    if "\x00" in joined:
        return "text fields must not contain NUL characters"
    if map_sizes[0] > limits.max_map_len or map_sizes[1] > limits.max_map_len:
        return f"features and attributes hold at most {limits.max_map_len} entries each"
    if extra_models > max(limits.max_events, limits.max_map_len):
        return "too many additional_models"
    if fingerprint_len > limits.max_bin_len:
        return f"input_fingerprint longer than {limits.max_bin_len} bytes"
    if len(joined) * 4 > limits.max_str_len:  # UTF-8 is at most 4 bytes a character
        for text in texts:
            if len(text.encode("utf-8", "surrogatepass")) > limits.max_str_len:
                return f"a text field is longer than {limits.max_str_len} bytes"
    return None
