"""current_prediction()'s helpers never raise, whatever the handler gives them.

A class index given as a label, a version given as a number, a list where a
text was meant: a number is kept as its ``str``, another value is ignored
and counted (``context_value_ignored``), and the handler's answer is the
same with telemetry on or off.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from fastapi import FastAPI

from predtrace.middleware import PredictionContext, current_prediction
from predtrace.middleware._context import IGNORED
from predtrace.middleware.testing import call_asgi
from predtrace.sidecar.pipeline import QueueConfig
from predtrace.sidecar.testing import InMemoryExporter

from .conftest import TELEMETRY_OFF, Instrument


def _ctx() -> PredictionContext:
    return PredictionContext(
        "p-1", sampled=True, features=frozenset({"a"}), attributes=frozenset({"tenant"})
    )


def _ignored(p: PredictionContext) -> int:
    counts: Counter[str] = Counter()
    p._close(counts)
    return counts[IGNORED]


class _Raising:
    """A value whose every conversion fails."""

    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __float__(self) -> float:
        raise RuntimeError("no float")

    def __hash__(self) -> int:
        raise RuntimeError("no hash")


class _BadMapping(Mapping[Any, float]):
    """A mapping with an unhashable key, whose lookups fail."""

    def __getitem__(self, key: object) -> float:
        raise KeyError(key)

    def __iter__(self) -> Iterator[Any]:
        return iter([["a"]])

    def __len__(self) -> int:
        return 1

    def items(self) -> Any:
        return [(["a"], 1.0), ("a", _Raising())]


ODD_VALUES: list[object] = [
    ["cat"],
    b"cat",
    {"k": "v"},
    object(),
    _Raising(),
    10**5000,  # past Python's int-to-str digit limit: str() raises
    float("nan"),
    complex(1, 2),
]


def test_a_number_given_as_a_text_is_kept_as_its_str() -> None:
    p = _ctx()
    p.record_output(label=3, score=0.9)  # type: ignore[arg-type]
    p.set_model(name="churn", version=7)  # type: ignore[arg-type]
    p.add_model(role="ranker", name="r", version=2)  # type: ignore[arg-type]
    p.set_attribute("tenant", 42)  # type: ignore[arg-type]
    assert p.output is not None and (p.output.label, p.output.score) == ("3", 0.9)
    assert p.model_override == {"name": "churn", "version": "7"}
    assert p.extra_models is not None and p.extra_models[0].version == "2"
    assert p.attributes == {"tenant": "42"}
    p.record_output(label=2.5)  # type: ignore[arg-type]
    assert p.output is not None and p.output.label == "2.5"
    p.record_output(label=True)  # type: ignore[arg-type]
    assert p.output is not None and p.output.label == "True"
    assert _ignored(p) == 0


@pytest.mark.parametrize("odd", ODD_VALUES, ids=lambda v: type(v).__name__)
def test_no_helper_raises_on_a_value_of_the_wrong_type(odd: object) -> None:
    p = _ctx()
    p.record_output(label=odd, score=odd, value=odd)  # type: ignore[arg-type]
    p.set_model(name=odd, version=odd, alias=odd)  # type: ignore[arg-type]
    p.add_model(role=odd, name=odd, version=odd)  # type: ignore[arg-type]
    p.add_model(role="pre", name="scaler", version=odd)  # type: ignore[arg-type]
    p.record_features(odd)  # type: ignore[arg-type]
    p.record_features({"a": odd})  # type: ignore[dict-item]
    p.set_attribute(odd, "v")  # type: ignore[arg-type]
    p.set_attribute("tenant", odd)  # type: ignore[arg-type]
    # A number (NaN, complex) is kept as its str; anything kept is a plain str.
    kept = [*(p.model_override or {}).values(), *(p.attributes or {}).values()]
    assert all(type(text) is str for text in kept)
    assert p.extra_models is not None and p.extra_models[-1].name == "scaler"
    assert p.features is None or p.features == {}
    assert _ignored(p) > 0


def test_no_helper_raises_on_missing_or_odd_containers() -> None:
    p = _ctx()
    p.add_model(role="pre", name=None)  # type: ignore[arg-type]
    p.add_model(role=None, name="scaler", version=None)  # type: ignore[arg-type]
    p.record_features(None)  # type: ignore[arg-type]
    p.record_features([("a", 1.0)])  # type: ignore[arg-type]
    p.record_features(_BadMapping())
    p.set_attribute(["tenant"], "v")  # type: ignore[arg-type]
    p.set_attribute({"tenant": 1}, "v")  # type: ignore[arg-type]
    assert p.extra_models is not None and [(m.role, m.name) for m in p.extra_models] == [
        ("", "scaler")
    ]
    assert p.attributes is None
    assert _ignored(p) == 6  # the nameless model, 3 feature calls, 2 attribute keys


def test_an_ignored_value_after_the_prediction_counts_at_once() -> None:
    p = _ctx()
    counts: Counter[str] = Counter()
    p.record_output(label=["x"])  # type: ignore[arg-type]
    p._close(counts)
    assert counts[IGNORED] == 1


def test_texts_from_a_handler_lose_nul_and_control_characters_and_lone_surrogates() -> None:
    p = _ctx()
    p.set_model(name="m\x00odel", version="7\n")
    p.add_model(role="pre\x00", name="s\ud800")
    p.record_output(label="ca\x00t\ud83d")
    p.set_attribute("tenant", "acme\x00\r\n")
    assert p.model_override == {"name": "model", "version": "7"}
    assert p.extra_models is not None and p.extra_models[0].name == "s\ufffd"
    assert p.extra_models[0].role == "pre"
    assert p.output is not None and p.output.label == "cat\ufffd"
    assert p.attributes == {"tenant": "acme"}
    for text in (p.output.label, p.extra_models[0].name, *p.model_override.values()):
        text.encode()  # UTF-8: an exporter can write it


def _app() -> FastAPI:
    app = FastAPI(telemetry=TELEMETRY_OFF)

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, body: dict[str, Any]) -> dict[str, Any]:
        p = current_prediction()
        if name == "index":
            p.record_output(label=3, score=0.9)  # type: ignore[arg-type]  # int(argmax(...))
            p.add_model(role="pre", name=None, version=2)  # type: ignore[arg-type]
        elif name == "list":
            p.record_output(label=["cat"])  # type: ignore[arg-type]  # model.predict(...)
            p.set_attribute(["unhashable"], "v")  # type: ignore[arg-type]
        return {"model_name": name, "outputs": [{"name": "score", "data": [0.5]}]}

    return app


_BODY = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}'
_HEADERS = [("content-type", "application/json")]


async def test_an_int_label_answers_200_and_is_exported_as_its_str(
    instrument: Instrument, events: InMemoryExporter
) -> None:
    app = _app()
    runtime = instrument(app, sample_rate=1.0)
    response = await call_asgi(app, "POST", "/v2/models/index/infer", _BODY, _HEADERS)
    assert response.status == 200
    assert runtime.force_flush(5)
    (event,) = events.events
    assert event.output is not None and (event.output.label, event.output.score) == ("3", 0.9)
    assert event.additional_models == []
    assert runtime.stats()[IGNORED] == 1


async def test_a_label_of_the_wrong_type_costs_no_other_event_of_its_batch(
    instrument: Instrument, events: InMemoryExporter
) -> None:
    app = _app()
    runtime = instrument(app, queue=QueueConfig(schedule_delay=5.0))
    for _ in range(20):
        good = await call_asgi(app, "POST", "/v2/models/good/infer", _BODY, _HEADERS)
        assert good.status == 200
    response = await call_asgi(app, "POST", "/v2/models/list/infer", _BODY, _HEADERS)
    assert response.status == 200
    assert runtime.force_flush(5)
    assert len(events.events) == 21
    stats = runtime.stats()
    assert stats.get("dropped", 0) == 0 and stats[IGNORED] == 2


def test_a_misspelt_keyword_fails_alike_inside_and_outside_a_prediction() -> None:
    # Accepted outside a prediction only, a typo would pass every test run
    # with telemetry off and fail the first prediction with it on.
    inside = PredictionContext("p", sampled=True, features=frozenset(), attributes=frozenset())
    for context in (current_prediction(), inside):
        with pytest.raises(TypeError, match="nmae"):
            context.set_model(nmae="churn")  # type: ignore[call-arg]
