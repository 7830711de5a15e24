"""The sidecar intake keeps plain event maps as maps: the result must not change.

For every map, valid or mutated, the intake's map path (``plain_event_map``,
the processors' ``on_map``, ``plain_map_problem``) and the object path
(``event_from_map``, the processors, ``event_problem``) must accept the same
events, spool bytes that decode to the same events, and reject the same
events with the same reasons.
"""

from __future__ import annotations

import copy
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from predtrace.sidecar._config import DeploymentConfig, RedactionConfig
from predtrace.sidecar._intake import Intake
from predtrace.sidecar._processors import default_processors
from predtrace.wire import (
    DeploymentRef,
    ModelRef,
    OutputSummary,
    PredictionEvent,
    Status,
    event_from_map,
    event_to_map,
    plain_event_map,
)

FAST = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _spool(max_record_bytes: int) -> object:
    class Spool:
        class config:  # the attribute the intake reads
            pass

    Spool.config.max_record_bytes = max_record_bytes  # type: ignore[attr-defined]
    return Spool()


# Over every per-field bound (those must decide), and about one event's size.
LIMITS = st.sampled_from([400_000, 420])


def _intakes(max_record_bytes: int = 400_000) -> tuple[Intake, Intake]:
    processors = default_processors(
        DeploymentConfig(id="dep-9", service="svc", pod="pod-1", image_digest="sha256:ee"),
        RedactionConfig(
            allow_features=("age", "f*"),
            allow_attributes=("region", "note*"),
            patterns=(r"\d{3}-\d{2}-\d{4}", "x"),
        ),
    )
    maps = Intake(_spool(max_record_bytes), processors)  # type: ignore[arg-type]
    # The same processors without on_map: every item takes the object path.
    objects = Intake(_spool(max_record_bytes), [lambda e, p=p: p(e) for p in processors])  # type: ignore[arg-type, misc]
    assert maps._map_processors is not None
    assert objects._map_processors is None
    return maps, objects


def _base() -> dict[int, Any]:
    event = PredictionEvent(
        prediction_id="0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        trace_id=bytes(range(16)),
        span_id=bytes(range(8)),
        timestamp_unix_nano=1_800_000_000_000_000_000,
        duration_nanos=1_500_000,
        model=ModelRef("churn", "3", "champion"),
        deployment=DeploymentRef(namespace="prod", node="n1"),
        endpoint="/v2/models/churn/infer",
        protocol="oip-v2-rest",
        status=Status.OK,
        status_code="200",
        input_fingerprint=b"\x01" * 32,
        output=OutputSummary("churn 123-45-6789", 0.25, None),
        features={"age": 42.0, "f1": 1.5, "secret": 9.0},
        attributes={"region": "eu x", "note": "ok", "email": "a@b"},
        sampled=True,
    )
    return event_to_map(event)


texts = st.text(max_size=12) | st.sampled_from(["", "\x00", "123-45-6789", "é" * 33_000])
names = st.sampled_from(["age", "f2", "secret", "region", "note9", "email", "x"]) | texts
numbers = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(-3, 2**64 + 1)
    | st.sampled_from([0, 2**63 - 1, 2**63, 2**64 - 1, 2**64])
)
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64 + 5),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
    st.binary(max_size=20),
    st.sampled_from([b"", bytes(8), bytes(16), [], {}, [{}], {1: "a"}, {"k": 1.0}]),
    st.dictionaries(st.integers(0, 9) | texts, st.integers(0, 3) | st.floats() | texts, max_size=3),
)


def _plausible(draw: st.DrawFn, raw: dict[int, Any]) -> None:
    """A change that keeps the field's type: such maps stay plain and test the map path."""
    kind = draw(
        st.sampled_from(["text", "model", "deployment", "features", "attributes", "more", "new"])
    )
    if kind == "new":  # a key this version does not know, or additional models
        raw[draw(st.sampled_from([0, 7, 19, 99]))] = draw(texts | st.just([]) | st.just([{1: "m"}]))
        if draw(st.booleans()):  # a key sent as a float or a bool: the same key to a dict
            target = raw if draw(st.booleans()) else raw.get(draw(st.sampled_from([6, 8, 15])))
            if isinstance(target, dict) and 1 in target:
                target[draw(st.sampled_from([1.0, True]))] = target.pop(1)
    elif kind == "text":
        raw[draw(st.sampled_from([1, 9, 10, 12, 13]))] = draw(texts)
    elif kind in ("model", "deployment"):
        top, keys = (6, (1, 2, 3, 4, 5, 6)) if kind == "model" else (8, (1, 2, 3, 4, 5, 6, 7))
        raw.setdefault(top, {})[draw(st.sampled_from(keys))] = draw(texts)
    elif kind == "features":
        raw.setdefault(16, {})[draw(names)] = draw(numbers)
    elif kind == "attributes":
        raw.setdefault(17, {})[draw(names)] = draw(texts)
    else:
        key = draw(st.sampled_from([4, 5, 11, 14, 15, 18]))
        raw[key] = draw(
            {
                4: numbers,
                5: numbers,
                11: st.integers(-1, 3),
                14: st.sampled_from([b"", b"\x02" * 70_000]),
                15: st.fixed_dictionaries({1: texts | st.none(), 2: numbers | st.none()}),
                18: st.sampled_from([True, False, None, 1, "yes"]),
            }[key]
        )


@st.composite
def event_maps(draw: st.DrawFn) -> object:
    raw: Any = _base()
    if draw(st.booleans()):
        if draw(st.booleans()):
            raw[16] = {f"f{i}": 1.0 for i in range(draw(st.sampled_from([1024, 1025])))}
        for _ in range(draw(st.integers(1, 4))):
            _plausible(draw, raw)
        return raw
    for _ in range(draw(st.integers(0, 4))):
        where = draw(st.sampled_from(["top", "model", "deployment", "output", "drop", "whole"]))
        if where == "whole":
            raw = draw(values)
            break
        if where == "drop":
            raw.pop(draw(st.integers(1, 18)), None)
            continue
        target = raw
        if where in ("model", "deployment", "output"):
            key = {"model": 6, "deployment": 8, "output": 15}[where]
            target = raw.setdefault(key, {})
            if not isinstance(target, dict):
                continue
        target[draw(st.integers(0, 20))] = draw(values)
    return raw


def _outcome(intake: Intake, raw: object) -> tuple[object, ...]:
    payloads, rejected = intake._prepare([copy.deepcopy(raw)])
    counters = intake.counters
    return (
        payloads,  # the very bytes: a kept map is spooled as its event would be
        [(r.index, r.reason, r.prediction_id) for r in rejected],
        (counters.filtered, counters.processor_errors),
    )


@FAST
@given(event_maps(), LIMITS)
def test_map_and_object_paths_spool_and_reject_alike(raw: object, limit: int) -> None:
    maps, objects = _intakes(limit)
    assert _outcome(maps, raw) == _outcome(objects, raw)


def test_the_unmutated_map_takes_the_map_path_and_is_processed() -> None:
    maps, objects = _intakes()
    raw = _base()
    assert plain_event_map(raw)
    payloads, rejected, _ = _outcome(maps, raw)
    assert rejected == []
    [event] = [event_from_map(msgpack.unpackb(p, strict_map_key=False)) for p in payloads]  # type: ignore[attr-defined]
    assert event.features == {"age": 42.0, "f1": 1.5}
    assert event.attributes == {"region": "eu [redacted]", "note": "ok"}
    assert event.output.label == "churn [redacted]"
    assert (event.deployment.id, event.deployment.namespace) == ("dep-9", "prod")
    assert _outcome(objects, raw)[0] == payloads
