"""Prediction events to store rows, and stored rows back to JSON for the query API.

Ingest builds the row of a plain, valid event straight from its msgpack map
(``fast_prediction_row``); any other event goes through the wire's precise
decoder, ``event_problem`` and ``prediction_row``.

What the wire format allows but a store cannot hold (a timestamp beyond int64
nanoseconds, a NUL in text) rejects that one event, the same way on SQLite and
PostgreSQL: ``event_problem`` (from the wire, shared with the sidecar's intake).
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from predtrace.collector.store._ops import Row
from predtrace.wire import ModelRef, PredictionEvent
from predtrace.wire._limits import INT63_MAX
from predtrace.wire._maps import (  # the wire's own map readers
    _DEPLOYMENT_KEYS,
    _MODEL_KEYS,
    finite_floats,
    no_additional_models,
    plain_scalars,
)

ServedKey = tuple[str, str, str, str, str]
_STATUS_NAMES: Final = ("unset", "ok", "error")


def deployment_key(event: PredictionEvent) -> str:
    """The deployment hop's id: the event's deployment id, else namespace/service."""
    dep = event.deployment
    if dep.id:
        return dep.id
    if dep.service:
        return f"{dep.namespace}/{dep.service}" if dep.namespace else dep.service
    return ""


def json_text(value: object) -> str:
    """Compact JSON text of a features, attributes or models column.

    orjson: much cheaper than ``json.dumps`` on a small map, and this runs
    for every stored event. The text differs from ``json.dumps``' in spacing and
    in leaving non-ASCII unescaped, and reads back to the same values; NaN and
    infinities become ``null`` (ingest leaves them out, so no stored row has one).
    """
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # e.g. a lone surrogate: json escapes it
        return json.dumps(value)


def _model_json(model: ModelRef) -> dict[str, str]:
    fields = {
        "name": model.name,
        "version": model.version,
        "alias": model.alias,
        "registry_id": model.registry_model_id,
        "artifact_digest": model.artifact_digest,
        "role": model.role,
    }
    return {k: v for k, v in fields.items() if v}


def prediction_row(event: PredictionEvent, producer_id: str, seq: int, received_ns: int) -> Row:
    """The ``predictions`` row of one event (column order of ``PREDICTION_COLUMNS``)."""
    model, dep, out = event.model, event.deployment, event.output
    extra = [_model_json(m) for m in event.additional_models]
    return (
        event.prediction_id,
        event.trace_id or None,
        event.span_id or None,
        event.timestamp_unix_nano,
        event.duration_nanos,
        received_ns,
        producer_id,
        seq,
        model.name,
        model.version,
        model.alias,
        model.registry_model_id,
        model.artifact_digest,
        json_text(extra) if extra else None,
        deployment_key(event),
        dep.service,
        dep.namespace,
        dep.pod,
        dep.node,
        dep.image_digest,
        dep.image_name,
        event.endpoint,
        event.protocol,
        int(event.status),
        event.status_code,
        event.error_type,
        event.input_fingerprint or None,
        out.label if out is not None else None,
        out.score if out is not None else None,
        out.value if out is not None else None,
        json_text(event.features) if event.features else None,
        json_text(event.attributes) if event.attributes else None,
        1 if event.sampled else 0,
    )


def _plain_output(raw: dict[Any, Any]) -> tuple[Any, Any, Any] | None:
    """(label, score, value) of the event map's output, or None when off the fast path."""
    if 15 not in raw:
        return (None, None, None)
    out = raw[15]
    if type(out) is not dict:
        return None
    label, score, value = out.get(1), out.get(2), out.get(3)
    if (
        ((label is not None or 1 in out) and type(label) is not str)
        or (score is not None and (type(score) is not float or not math.isfinite(score)))
        or (value is not None and (type(value) is not float or not math.isfinite(value)))
    ):
        return None
    return (label, score, value)


_NO_MAP: Final[dict[Any, Any]] = {}
_BLANKS: Final = ("",) * len(_DEPLOYMENT_KEYS)


def fast_prediction_row(
    raw: object, producer_id: str, seq: int, received_ns: int, max_id_len: int
) -> Row | None:
    """The row of a plain, valid event map straight from msgpack; None for any doubt.

    Equal to ``prediction_row(event_from_map(raw))`` for every map it accepts
    (a test holds it to that); everything else, including every event to be
    rejected, goes through the precise path, which alone names reasons.
    Skipping the event objects saves a third of the collector's decode work.
    """
    if type(raw) is not dict:
        return None
    g = raw.get
    model, dep, features, attributes = g(6, _NO_MAP), g(8, _NO_MAP), g(16, _NO_MAP), g(17, _NO_MAP)
    output = _plain_output(raw)
    if (
        type(model) is not dict
        or type(dep) is not dict
        or type(features) is not dict
        or type(attributes) is not dict
        or output is None
        or not no_additional_models(raw)
    ):
        return None
    # Missing keys read as "" (map() calls .get(key, "") in C: no Python loop).
    m = tuple(map(model.get, _MODEL_KEYS, _BLANKS))
    d = tuple(map(dep.get, _DEPLOYMENT_KEYS, _BLANKS))
    pid, texts = g(1, ""), (g(9, ""), g(10, ""), g(12, ""), g(13, ""))
    try:
        # One join both type-checks every text field (a non-str raises
        # TypeError) and gives one string to scan for NUL.
        joined = "".join(
            (pid, *texts, *m, *d, output[0] or "", *features, *attributes, *attributes.values())
        )
    except TypeError:
        return None
    trace_id, span_id = g(2, b""), g(3, b"")
    ts, duration, status, fingerprint = g(4, 0), g(5, 0), g(11, 0), g(14, b"")
    if (
        "\x00" in joined
        or not plain_scalars(pid, trace_id, span_id, ts, duration, status, max_id_len, INT63_MAX)
        or type(fingerprint) is not bytes
        or not finite_floats(features.values())
    ):
        return None
    key = d[0] or (f"{d[2]}/{d[1]}" if d[2] and d[1] else d[1])
    return (
        pid,
        trace_id or None,
        span_id or None,
        ts,
        duration,
        received_ns,
        producer_id,
        seq,
        *m[:5],
        None,
        key,
        *d[1:],
        *texts[:2],
        status,
        *texts[2:],
        fingerprint or None,
        *output,
        json_text(features) if features else None,
        json_text(attributes) if attributes else None,
        1 if g(18) is True else 0,
    )


def served_key(row: Row) -> ServedKey:
    """(deployment, model name, version, alias when no version, image) of a prediction row."""
    alias = "" if row[9] else row[10]
    return (row[14], row[8], row[9], alias, row[19])


SELECT_PREDICTION: Final = (
    "SELECT prediction_id, trace_id, span_id, ts_ns, duration_ns, received_ns, producer_id, seq,"
    " model_name, model_version, model_alias, model_registry_id, model_digest,"
    " additional_models, deployment_id, service, namespace, pod, node, image_digest,"
    " image_name, endpoint, protocol, status, status_code, error_type, input_fingerprint,"
    " output_label, output_score, output_value, features, attributes, sampled"
    " FROM predictions"
)


def iso_time(ns: int) -> str | None:
    """ISO 8601 UTC text of unix nanoseconds (None for 0)."""
    if not ns:
        return None
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).isoformat().replace("+00:00", "Z")


def _hex(value: object) -> str | None:
    return bytes(value).hex() if isinstance(value, bytes | memoryview | bytearray) else None


def prediction_json(row: Row) -> dict[str, object]:
    """A stored prediction as the query API shows it."""
    output = None
    if row[27] is not None or row[28] is not None or row[29] is not None:
        output = {"label": row[27], "score": row[28], "value": row[29]}
    deployment = dict(zip(("id", "service", "namespace", "pod", "node"), row[14:19], strict=True))
    deployment.update(image_digest=row[19], image_name=row[20])
    return {
        "prediction_id": row[0],
        "trace_id": _hex(row[1]),
        "span_id": _hex(row[2]),
        "timestamp": iso_time(row[3]),
        "timestamp_unix_nano": row[3],
        "duration_ms": row[4] / 1e6,
        "received_unix_nano": row[5],
        "producer": {"id": row[6], "seq": row[7]},
        "model": {
            "name": row[8],
            "version": row[9],
            "alias": row[10],
            "registry_id": row[11],
            "artifact_digest": row[12],
        },
        "additional_models": json.loads(row[13]) if row[13] else [],
        "deployment": deployment,
        "endpoint": row[21],
        "protocol": row[22],
        "status": _STATUS_NAMES[row[23]] if 0 <= row[23] < 3 else "unset",
        "status_code": row[24],
        "error_type": row[25],
        "input_fingerprint": _hex(row[26]),
        "output": output,
        "features": json.loads(row[30]) if row[30] else {},
        "attributes": json.loads(row[31]) if row[31] else {},
        "sampled": bool(row[32]),
    }
