"""Conversion between the event dataclasses and their protobuf messages.

Used at the gRPC boundary (the sidecar's ``Record`` API and its clients); the
hot paths carry dataclasses and msgpack, never protobuf objects.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TypeVar

from predtrace.v1 import event_pb2
from predtrace.wire._errors import WireError
from predtrace.wire._event import (
    DeploymentRef,
    ModelRef,
    OutputSummary,
    PredictionEvent,
    Status,
)


def _model_from_proto(msg: event_pb2.ModelRef) -> ModelRef:
    return ModelRef(
        msg.name, msg.version, msg.alias, msg.registry_model_id, msg.artifact_digest, msg.role
    )


_V = TypeVar("_V")
_STATUSES = (Status.UNSET, Status.OK, Status.ERROR)


def _fill_model(msg: event_pb2.ModelRef, model: ModelRef) -> None:
    # Attribute stores on the parent's own submessage: no temporary message
    # and copy per event (the producer's hot path).
    msg.SetInParent()
    if model.name:
        msg.name = model.name
    if model.version:
        msg.version = model.version
    if model.alias:
        msg.alias = model.alias
    if model.registry_model_id:
        msg.registry_model_id = model.registry_model_id
    if model.artifact_digest:
        msg.artifact_digest = model.artifact_digest
    if model.role:
        msg.role = model.role


def event_to_proto(event: PredictionEvent) -> event_pb2.PredictionEvent:
    """Return the protobuf message for an event."""
    msg = event_pb2.PredictionEvent(
        prediction_id=event.prediction_id,
        trace_id=event.trace_id,
        span_id=event.span_id,
        timestamp_unix_nano=event.timestamp_unix_nano,
        duration_nanos=event.duration_nanos,
        endpoint=event.endpoint,
        protocol=event.protocol,
        status=int(event.status),  # type: ignore[arg-type]
        status_code=event.status_code,
        error_type=event.error_type,
        input_fingerprint=event.input_fingerprint,
        features=event.features,
        attributes=event.attributes,
        sampled=event.sampled,
    )
    _fill_model(msg.model, event.model)
    for extra in event.additional_models:
        _fill_model(msg.additional_models.add(), extra)
    dep, d = event.deployment, msg.deployment
    d.SetInParent()
    d.id, d.service, d.namespace, d.pod = dep.id, dep.service, dep.namespace, dep.pod
    d.node, d.image_digest, d.image_name = dep.node, dep.image_digest, dep.image_name
    if event.output is not None:
        out = msg.output
        out.SetInParent()
        if event.output.label is not None:
            out.label = event.output.label
        if event.output.score is not None:
            out.score = event.output.score
        if event.output.value is not None:
            out.value = event.output.value
    return msg


def _map(field: Mapping[str, _V]) -> dict[str, _V]:
    # dict(field) walks a protobuf map through the Mapping ABC (~1.3 us for 4
    # entries); indexing by its own keys is twice as fast, and empty is free.
    return {key: field[key] for key in field} if field else {}


def event_from_proto(msg: event_pb2.PredictionEvent, *, max_id_len: int = 256) -> PredictionEvent:
    """Build an event from its protobuf message, validating what proto cannot.

    A NaN or infinite feature value is left out, and such an output score or
    value left unset, as the msgpack decoder does (FORMAT.md). Whether a
    store keeps the id is ``event_problem``'s to say, as for every event.

    Raises:
        WireError: missing prediction id, or ids of the wrong length.
    """
    prediction_id, trace_id, span_id = msg.prediction_id, msg.trace_id, msg.span_id
    if not prediction_id:
        raise WireError("prediction_id is required")
    if len(prediction_id) > max_id_len:
        raise WireError(f"prediction_id longer than {max_id_len} characters")
    if len(trace_id) not in (0, 16):
        raise WireError("trace_id must be 16 bytes")
    if len(span_id) not in (0, 8):
        raise WireError("span_id must be 8 bytes")
    features = _map(msg.features)
    if not all(map(math.isfinite, features.values())):
        # NaN marks a missing value in ML data: the value is left out, not the event.
        features = {key: value for key, value in features.items() if math.isfinite(value)}
    output = None
    if msg.HasField("output"):
        o = msg.output
        output = OutputSummary(
            o.label if o.HasField("label") else None,
            o.score if o.HasField("score") and math.isfinite(o.score) else None,
            o.value if o.HasField("value") and math.isfinite(o.value) else None,
        )
    m, d, status, extra = msg.model, msg.deployment, msg.status, msg.additional_models
    # Positional arguments and a tuple lookup for the status: this runs once
    # per event received by the sidecar.
    return PredictionEvent(
        prediction_id,
        trace_id,
        span_id,
        msg.timestamp_unix_nano,
        msg.duration_nanos,
        ModelRef(m.name, m.version, m.alias, m.registry_model_id, m.artifact_digest, m.role),
        [_model_from_proto(x) for x in extra] if extra else [],
        DeploymentRef(d.id, d.service, d.namespace, d.pod, d.node, d.image_digest, d.image_name),
        msg.endpoint,
        msg.protocol,
        _STATUSES[status] if 0 <= status <= 2 else Status.UNSET,
        msg.status_code,
        msg.error_type,
        msg.input_fingerprint,
        output,
        features,
        _map(msg.attributes),
        msg.sampled,
    )
