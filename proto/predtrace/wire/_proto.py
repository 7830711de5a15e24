"""Conversion between the event dataclasses and their protobuf messages.

Used at the gRPC boundary (the sidecar's ``Record`` API and its clients); the
hot paths carry dataclasses and msgpack, never protobuf objects.
"""

from __future__ import annotations

import math

from predtrace.v1 import event_pb2
from predtrace.wire._errors import WireError
from predtrace.wire._event import (
    DeploymentRef,
    ModelRef,
    OutputSummary,
    PredictionEvent,
    Status,
)


def _model_to_proto(model: ModelRef) -> event_pb2.ModelRef:
    return event_pb2.ModelRef(
        name=model.name,
        version=model.version,
        alias=model.alias,
        registry_model_id=model.registry_model_id,
        artifact_digest=model.artifact_digest,
        role=model.role,
    )


def _model_from_proto(msg: event_pb2.ModelRef) -> ModelRef:
    return ModelRef(
        msg.name, msg.version, msg.alias, msg.registry_model_id, msg.artifact_digest, msg.role
    )


def event_to_proto(event: PredictionEvent) -> event_pb2.PredictionEvent:
    """Return the protobuf message for an event."""
    dep = event.deployment
    msg = event_pb2.PredictionEvent(
        prediction_id=event.prediction_id,
        trace_id=event.trace_id,
        span_id=event.span_id,
        timestamp_unix_nano=event.timestamp_unix_nano,
        duration_nanos=event.duration_nanos,
        model=_model_to_proto(event.model),
        additional_models=[_model_to_proto(m) for m in event.additional_models],
        deployment=event_pb2.DeploymentRef(
            id=dep.id,
            service=dep.service,
            namespace=dep.namespace,
            pod=dep.pod,
            node=dep.node,
            image_digest=dep.image_digest,
            image_name=dep.image_name,
        ),
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


def event_from_proto(msg: event_pb2.PredictionEvent, *, max_id_len: int = 256) -> PredictionEvent:
    """Build an event from its protobuf message, validating what proto cannot.

    Raises:
        WireError: missing prediction id, or ids of the wrong length.
    """
    if not msg.prediction_id:
        raise WireError("prediction_id is required")
    if len(msg.prediction_id) > max_id_len:
        raise WireError(f"prediction_id longer than {max_id_len} characters")
    if len(msg.trace_id) not in (0, 16):
        raise WireError("trace_id must be 16 bytes")
    if len(msg.span_id) not in (0, 8):
        raise WireError("span_id must be 8 bytes")
    if any(not math.isfinite(v) for v in msg.features.values()):
        raise WireError("features values must be finite numbers")
    output = None
    if msg.HasField("output"):
        o = msg.output
        output = OutputSummary(
            o.label if o.HasField("label") else None,
            o.score if o.HasField("score") else None,
            o.value if o.HasField("value") else None,
        )
    d = msg.deployment
    return PredictionEvent(
        prediction_id=msg.prediction_id,
        trace_id=msg.trace_id,
        span_id=msg.span_id,
        timestamp_unix_nano=msg.timestamp_unix_nano,
        duration_nanos=msg.duration_nanos,
        model=_model_from_proto(msg.model),
        additional_models=[_model_from_proto(m) for m in msg.additional_models],
        deployment=DeploymentRef(
            d.id, d.service, d.namespace, d.pod, d.node, d.image_digest, d.image_name
        ),
        endpoint=msg.endpoint,
        protocol=msg.protocol,
        status=Status(msg.status) if msg.status in (0, 1, 2) else Status.UNSET,
        status_code=msg.status_code,
        error_type=msg.error_type,
        input_fingerprint=msg.input_fingerprint,
        output=output,
        features=dict(msg.features),
        attributes=dict(msg.attributes),
        sampled=msg.sampled,
    )
