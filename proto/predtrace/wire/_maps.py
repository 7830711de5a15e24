"""One event as its int-keyed msgpack map (proto/FORMAT.md): writing it and reading it back.

``event_to_map`` writes the map the batch codec packs; ``event_from_map``
reads one back, through a fast path for plain maps (``_fast_event``) or the
checked path that names every failure (``_checked_event``). The fast readers
elsewhere (the sidecar's plain maps, the collector's rows) share the checks
defined here (``plain_scalars``, ``finite_floats``, ``no_additional_models``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Final, cast

from predtrace.wire._errors import UnreadableEvent, WireError
from predtrace.wire._event import (
    DeploymentRef,
    ModelRef,
    OutputSummary,
    PredictionEvent,
    Status,
)
from predtrace.wire._limits import _UINT64_MAX, DEFAULT_LIMITS, DecodeLimits

# -- encoding -----------------------------------------------------------------

# Explicit tests instead of tables of (key, value) pairs: this runs once per
# event on every producer (~30 % faster), and the key order, hence the bytes,
# is the same.


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


# -- decoding ---------------------------------------------------------------


def _is_uint(value: object) -> bool:
    return type(value) is int and 0 <= value <= _UINT64_MAX


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
        """The number at ``key``; None when absent, NaN or infinite (left unset, FORMAT.md)."""
        value = self.raw.get(key)
        if value is None:
            return None
        if type(value) not in (int, float):
            raise WireError(f"{self.where}.{name} must be a number")
        try:
            number = float(value)
        except OverflowError:
            raise WireError(f"{self.where}.{name} is out of range") from None
        return number if math.isfinite(number) else None

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
    if type(value) is not int and type(value) is not float:
        raise WireError("features values must be numbers")
    return float(value)


def _features_from(raw: object) -> dict[str, float]:
    """An event map's features; a NaN or infinite value is left out, as missing (FORMAT.md)."""
    features: dict[str, float] = _str_map(raw, "event.features", _feature_value)
    if all(map(math.isfinite, features.values())):
        return features
    return {key: value for key, value in features.items() if math.isfinite(value)}


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
# OpenTelemetry's invalid ids: a trace or span id of zeros names no trace
# (``predtrace trace`` refuses to look one up). Read as absent.
_ZERO_TRACE_ID: Final = bytes(16)
_ZERO_SPAN_ID: Final = bytes(8)
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
    maps, the collector's rows); ``max_time`` is 2**63-1 for a store. The id
    must also match ``CALLER_ID_RE``: one ``event_problem`` refuses takes the
    precise path, so no fast path keeps an id the query API could never find.
    """
    return (
        type(pid) is str
        and 0 < len(pid) <= max_id_len
        # CALLER_ID_RE ([\x21-\x7e]+, the length checked above) in three C
        # calls: about half the cost of the regex, on every event.
        and pid.isascii()
        and pid.isprintable()
        and " " not in pid
        and type(trace_id) is bytes
        and len(trace_id) in (0, 16)
        and trace_id != _ZERO_TRACE_ID  # read as absent by the precise path
        and type(span_id) is bytes
        and len(span_id) in (0, 8)
        and span_id != _ZERO_SPAN_ID
        and type(ts) is int
        and type(duration) is int
        and 0 <= ts <= max_time
        and 0 <= duration <= max_time
        and type(status) is int
        and status in (0, 1, 2)
    )


def _valid_id(value: bytes, zeros: bytes) -> bytes:
    """A trace or span id; OpenTelemetry's invalid one (all zeros) is no id (``b""``)."""
    return b"" if value == zeros else value


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
        # A NaN or infinite value, too: the checked path leaves it out.
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
        return None  # the checked path refuses it with a reason, or unsets a NaN
    return OutputSummary(label, score, value)


def event_from_map(raw: object, limits: DecodeLimits = DEFAULT_LIMITS) -> PredictionEvent:
    """Build one event from its int-keyed map; unknown keys are ignored.

    The id is kept as sent (``event_problem`` says whether a store keeps it);
    a NaN or infinite number is left out (FORMAT.md).

    Raises:
        WireError: a known field has the wrong type or the id is missing.
    """
    if type(raw) is dict:
        fast = _fast_event(raw, limits)
        if fast is not None:
            return fast
    if isinstance(raw, UnreadableEvent):
        raise WireError(raw.reason)
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
        trace_id=_valid_id(f.blob(2, "trace_id", (0, 16)), _ZERO_TRACE_ID),
        span_id=_valid_id(f.blob(3, "span_id", (0, 8)), _ZERO_SPAN_ID),
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
        features=_features_from(f.raw.get(16, {})),
        attributes=_str_map(f.raw.get(17, {}), "event.attributes", _attribute_value),
        sampled=f.raw.get(18) is True,
    )
