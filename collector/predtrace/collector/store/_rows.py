"""Prediction events to store rows, and stored rows back to JSON for the query API.

The collector's own checks live here too: what the wire format allows but a
store cannot hold (a timestamp beyond int64 nanoseconds, a NUL in text) rejects
that one event, the same way on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Final

from predtrace.collector.store._ops import Row
from predtrace.wire import ModelRef, PredictionEvent

INT64_MAX: Final = 2**63 - 1
ServedKey = tuple[str, str, str, str, str]
_STATUS_NAMES: Final = ("unset", "ok", "error")


def _texts(event: PredictionEvent) -> Iterator[str]:
    model, dep = event.model, event.deployment
    yield from (event.prediction_id, event.endpoint, event.protocol, event.status_code)
    yield from (event.error_type, model.name, model.version, model.alias)
    yield from (model.registry_model_id, model.artifact_digest, dep.id, dep.service)
    yield from (dep.namespace, dep.pod, dep.node, dep.image_digest, dep.image_name)
    if event.output is not None and event.output.label:
        yield event.output.label
    yield from event.features
    yield from event.attributes
    yield from event.attributes.values()
    for extra in event.additional_models:
        yield from (extra.name, extra.version, extra.alias, extra.role)


def event_problem(event: PredictionEvent) -> str | None:
    """Why the store cannot hold ``event`` (None when it can)."""
    if event.timestamp_unix_nano > INT64_MAX or event.duration_nanos > INT64_MAX:
        return "timestamp_unix_nano and duration_nanos must fit in int64"
    if any("\x00" in text for text in _texts(event)):
        return "text fields must not contain NUL characters"
    return None


def deployment_key(event: PredictionEvent) -> str:
    """The deployment hop's id: the event's deployment id, else namespace/service."""
    dep = event.deployment
    if dep.id:
        return dep.id
    if dep.service:
        return f"{dep.namespace}/{dep.service}" if dep.namespace else dep.service
    return ""


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
        json.dumps(extra) if extra else None,
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
        json.dumps(event.features) if event.features else None,
        json.dumps(event.attributes) if event.attributes else None,
        1 if event.sampled else 0,
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
