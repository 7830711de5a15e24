"""The prediction event: what every stage of the pipeline carries.

Plain slotted dataclasses mirroring ``predtrace/v1/event.proto`` (the proto is
the source of truth for field numbers). They are cheap to build on the request
path, which a protobuf message is not; ``to_proto``/``from_proto`` convert at
the gRPC boundary.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Status(enum.IntEnum):
    """Outcome of a prediction (``predtrace.v1.StatusCode``)."""

    UNSET = 0
    OK = 1
    ERROR = 2


@dataclass(slots=True)
class ModelRef:
    """A model involved in a prediction; ``role`` is empty for the primary model."""

    name: str = ""
    version: str = ""
    alias: str = ""
    registry_model_id: str = ""
    artifact_digest: str = ""
    role: str = ""


@dataclass(slots=True)
class DeploymentRef:
    """Where a prediction was served (pod, image, ...)."""

    id: str = ""
    service: str = ""
    namespace: str = ""
    pod: str = ""
    node: str = ""
    image_digest: str = ""
    image_name: str = ""


@dataclass(slots=True)
class OutputSummary:
    """Bounded summary of a model output: a label, a score, a value."""

    label: str | None = None
    score: float | None = None
    value: float | None = None


@dataclass(slots=True)
class PredictionEvent:
    """One prediction, as recorded by the middleware, the sidecar or a client.

    Example:
        >>> PredictionEvent(prediction_id="0190...", model=ModelRef("churn", "3"))
    """

    prediction_id: str
    trace_id: bytes = b""
    span_id: bytes = b""
    timestamp_unix_nano: int = 0
    duration_nanos: int = 0
    model: ModelRef = field(default_factory=ModelRef)
    additional_models: list[ModelRef] = field(default_factory=list)
    deployment: DeploymentRef = field(default_factory=DeploymentRef)
    endpoint: str = ""
    protocol: str = ""
    status: Status = Status.UNSET
    status_code: str = ""
    error_type: str = ""
    input_fingerprint: bytes = b""
    output: OutputSummary | None = None
    features: dict[str, float] = field(default_factory=dict)
    attributes: dict[str, str] = field(default_factory=dict)
    sampled: bool = False


@dataclass(slots=True)
class EventBatch:
    """A batch of events from one producer: the unit of delivery to the collector."""

    producer_id: str
    seq: int
    events: list[PredictionEvent]
    batch_id: bytes = b""
    created_at_unix_nano: int = 0
    prev_digest: bytes = b""


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one event of a batch was refused."""

    index: int
    reason: str
    prediction_id: str = ""


@dataclass(frozen=True, slots=True)
class IngestAck:
    """The collector's answer to a batch."""

    producer_id: str
    seq: int
    accepted: int
    rejected: tuple[Rejection, ...] = ()
    duplicate: bool = False
