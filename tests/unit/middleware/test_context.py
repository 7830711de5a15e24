"""current_prediction(): the handler's helper, a no-op outside a prediction, always bounded."""

from __future__ import annotations

import math
from collections import Counter

from predtrace.middleware import PredictionContext, current_prediction
from predtrace.middleware._context import MAX_ATTRIBUTES, MAX_EXTRA_MODELS, MAX_FEATURES


def _ctx(sampled: bool = True) -> PredictionContext:
    return PredictionContext(
        "p-1",
        sampled=sampled,
        features=frozenset({"a", *(f"f{i}" for i in range(200))}),
        attributes=frozenset({"tenant", *(f"k{i}" for i in range(200))}),
    )


def test_outside_a_prediction_every_call_is_a_harmless_no_op() -> None:
    p = current_prediction()
    assert not p.active and p.prediction_id == ""
    p.set_model(name="x", version="1")
    p.add_model(role="ranker", name="r")
    p.record_output(label="l")
    p.record_features({"a": 1.0})
    p.set_attribute("tenant", "t")
    assert p.model_override is None and p.output is None
    assert p.features is None and p.attributes is None and p.extra_models is None


def test_set_model_merges_and_bounds_values() -> None:
    p = _ctx()
    p.set_model(name="churn")
    p.set_model(version="7", artifact_digest="x" * 1000)
    assert p.model_override is not None
    assert p.model_override["name"] == "churn" and p.model_override["version"] == "7"
    assert len(p.model_override["artifact_digest"]) == 256


def test_features_are_allow_listed_finite_and_bounded() -> None:
    p = _ctx()
    p.record_features({"a": 1, "secret": 2.0, "f1": math.nan, "f2": True})  # type: ignore[dict-item]
    assert p.features == {"a": 1.0}
    p.record_features({f"f{i}": float(i) for i in range(200)})
    assert p.features is not None and len(p.features) == MAX_FEATURES


def test_output_and_features_are_ignored_when_not_sampled() -> None:
    p = _ctx(sampled=False)
    p.record_output(label="x", score=0.5)
    p.record_features({"a": 1.0})
    assert p.output is None and p.features is None


def test_attributes_only_allow_listed_and_bounded() -> None:
    p = _ctx()
    p.set_attribute("email", "a@b.c")
    p.set_attribute("tenant", "acme" * 100)
    for i in range(200):
        p.set_attribute(f"k{i}", "v")
    assert p.attributes is not None and "email" not in p.attributes
    assert len(p.attributes["tenant"]) == 256 and len(p.attributes) == MAX_ATTRIBUTES


def test_ensemble_members_are_recorded_with_their_role_and_bounded() -> None:
    p = _ctx()
    for i in range(20):
        p.add_model(role="member", name=f"m{i}", version="1")
    assert p.extra_models is not None and len(p.extra_models) == MAX_EXTRA_MODELS
    assert p.extra_models[0].role == "member" and p.extra_models[0].name == "m0"


def test_record_output_drops_non_finite_numbers() -> None:
    p = _ctx()
    p.record_output(label="ok", score=math.inf, value=2)
    assert p.output is not None and (p.output.label, p.output.score, p.output.value) == (
        "ok",
        None,
        2.0,
    )


def test_a_finished_prediction_is_inactive_and_counts_late_calls_instead_of_keeping_them() -> None:
    p = _ctx()
    counts: Counter[str] = Counter()
    p._close(counts)
    assert not p.active
    p.set_model(name="late", version="9")
    p.add_model(role="ranker", name="r")
    p.record_output(label="late")
    p.record_features({"a": 1.0})
    p.set_attribute("tenant", "t")
    assert p.model_override is None and p.output is None and p.extra_models is None
    assert p.features is None and p.attributes is None
    assert counts["late_context_call"] == 5
    assert p.prediction_id == "p-1"  # reading the id stays harmless


def test_sampling_and_recording_see_the_id_the_hook_settles() -> None:
    # FastAPI telemetry mode: the OIP body id arrives after the context is
    # made; the sampling decision follows it, for every caller of the helper.
    p = _ctx(sampled=False)
    runs: list[int] = []

    def adopt() -> bool:
        runs.append(1)
        p._set_id("body-id", sampled=True)
        return True

    p.id_hook = adopt
    p.record_output(label="kept")
    assert p.output is not None and p.output.label == "kept"
    assert p.is_sampled and p.prediction_id == "body-id"
    p.record_features({"a": 1.0})
    assert p.features == {"a": 1.0}
    assert runs == [1]  # run once, then dropped
