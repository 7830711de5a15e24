"""The intake's choice between keeping event maps as maps and building events."""

from __future__ import annotations

from typing import Any

import msgpack

from predtrace.sidecar._config import DeploymentConfig, RedactionConfig
from predtrace.sidecar._intake import Intake
from predtrace.sidecar._processors import DeploymentEnricher, RedactionProcessor
from predtrace.wire import ModelRef, PredictionEvent, event_from_map, event_to_map


class _Spool:
    class config:  # the attribute the intake reads
        max_record_bytes = 1 << 20


class ShoutingRedaction(RedactionProcessor):
    """A subclass that changes ``__call__`` only."""

    def __call__(self, event: PredictionEvent) -> PredictionEvent:
        event = super().__call__(event)
        event.endpoint = event.endpoint.upper()
        return event


def _spooled(intake: Intake, raw: dict[int, Any]) -> PredictionEvent:
    payloads, rejected = intake._prepare([raw])
    assert rejected == []
    return event_from_map(msgpack.unpackb(payloads[0], strict_map_key=False))


def test_built_in_processors_keep_maps_as_maps() -> None:
    enrich = DeploymentEnricher(DeploymentConfig(id="d"))
    processors = [enrich, RedactionProcessor(RedactionConfig())]
    intake = Intake(_Spool(), processors)  # type: ignore[arg-type]
    assert intake._map_processors is not None


def test_a_subclass_that_overrides_only_call_is_not_bypassed_for_maps() -> None:
    intake = Intake(_Spool(), [ShoutingRedaction(RedactionConfig())])  # type: ignore[arg-type]
    assert intake._map_processors is None
    raw = event_to_map(PredictionEvent("p1", model=ModelRef("m"), endpoint="/infer"))
    assert _spooled(intake, raw).endpoint == "/INFER"


def test_a_plain_callable_processor_sends_every_map_the_object_way() -> None:
    def tag(event: PredictionEvent) -> PredictionEvent:
        event.attributes["seen"] = "yes"
        return event

    intake = Intake(_Spool(), [tag])  # type: ignore[arg-type]
    assert intake._map_processors is None
    raw = event_to_map(PredictionEvent("p1", model=ModelRef("m")))
    assert _spooled(intake, raw).attributes == {"seen": "yes"}
