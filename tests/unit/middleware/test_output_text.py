"""Texts read from a model's answer: safe to export, and a label only when short.

A lone surrogate (JSON ``"\\ud800"``) cannot be encoded as UTF-8: it would make
the exporter fail on the whole batch; a NUL would cost its event. And a long
string output is generated or echoed text, not a class: never a label.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import Response

from predtrace.middleware._context import MAX_TEXT, clean
from predtrace.middleware._outputs import MAX_LABEL, ResponseCapture, served_model, summarise
from predtrace.middleware.testing import call_asgi
from predtrace.sidecar.testing import InMemoryExporter
from predtrace.wire import OutputSummary, event_problem, pack_events

from .conftest import TELEMETRY_OFF, Instrument

SECRET = "Alice Example wrote: my card number is 4111111111111111, SSN 078-05-1120"


def test_clean_replaces_lone_surrogates_and_drops_control_characters() -> None:
    assert clean("a\ud800b\udfff") == "a\ufffdb\ufffd"
    assert clean("a\x00b\x1f\x7f\x9fc") == "abc"
    assert clean("caf\u00e9 \u00a0\U0001f600") == "caf\u00e9 \u00a0\U0001f600"  # kept as is
    assert len(clean("\ud800" * 1000)) == MAX_TEXT
    plain = "iris-classifier"
    assert clean(plain) is plain  # the usual case: no copy


def test_a_lone_surrogate_or_nul_in_an_answer_becomes_safe_text() -> None:
    oip = json.loads('{"outputs": [{"name": "t", "data": ["\\ud800a\\u0000"]}]}')
    summary = summarise(oip, "oip-v2-rest")
    assert summary is not None and summary.label == "\ufffda"
    kserve = summarise({"predictions": ["b\udc00\x00"]}, "kserve-v1")
    assert kserve == OutputSummary(label="b\ufffd")
    assert served_model({"model_name": "m\ud800", "model_version": "1\x00"}) == ("m\ufffd", "1")


@pytest.mark.parametrize(
    "body",
    [
        b'{"id": "r", "model_version": "7", "model_name": "m\\ud800"}',
        b'{"model_name": "m\\ud800", "model_version": "7"}',
    ],
)
def test_the_served_model_read_from_the_head_is_safe_text(body: bytes) -> None:
    capture = ResponseCapture(limit=16)  # over the bound: the head scan reads the names
    capture.add(body + b" " * 64)
    assert capture.served() == ("m\ufffd", "7")


def test_a_short_string_output_is_a_label_a_long_one_is_not() -> None:
    short, long = "x" * MAX_LABEL, "x" * (MAX_LABEL + 1)
    oip = {"outputs": [{"name": "label", "data": [short]}, {"name": "score", "data": [0.9]}]}
    assert summarise(oip, "oip-v2-rest") == OutputSummary(label=short, score=0.9)
    oip["outputs"][0]["data"] = [long]
    assert summarise(oip, "oip-v2-rest") == OutputSummary(score=0.9)  # the score still leaves
    assert summarise({"predictions": [short]}, "kserve-v1") == OutputSummary(label=short)
    assert summarise({"predictions": [[long]]}, "kserve-v1") is None
    # A later short string still gives the label.
    two = {"outputs": [{"name": "text", "data": [long]}, {"name": "class", "data": ["cat"]}]}
    assert summarise(two, "oip-v2-rest") == OutputSummary(label="cat")


def _text_app() -> FastAPI:
    """A text model: its answer carries the request's text (or a broken string)."""
    app = FastAPI(telemetry=TELEMETRY_OFF)

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, body: dict[str, Any]) -> Response:
        if name == "surrogate":
            raw = (
                '{"model_name": "m\\ud800", "model_version": "1", "outputs": '
                '[{"name": "t", "datatype": "BYTES", "data": ["\\udfff\\u0000"]}]}'
            )
            return Response(raw, media_type="application/json")
        text = body["inputs"][0]["data"][0]
        answer = {"model_name": name, "outputs": [{"name": "text", "data": [text.strip()]}]}
        return Response(json.dumps(answer), media_type="application/json")

    @app.post("/v1/models/{name}:predict")
    async def kserve(name: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"predictions": [body["instances"][0]]}

    return app


async def test_an_answer_with_a_lone_surrogate_gives_an_event_an_exporter_can_write(
    instrument: Instrument, events: InMemoryExporter
) -> None:
    app = _text_app()
    runtime = instrument(app)
    headers = [("content-type", "application/json")]
    response = await call_asgi(app, "POST", "/v2/models/surrogate/infer", b"{}", headers)
    assert response.status == 200
    assert runtime.force_flush(5)
    (event,) = events.events
    assert (event.model.name, event.output) == ("m\ufffd", OutputSummary(label="\ufffd"))
    assert event_problem(event) is None
    assert pack_events([event])  # what both real exporters do: raised UnicodeEncodeError


async def test_generated_text_echoing_the_request_is_not_exported_as_a_label(
    instrument: Instrument, events: InMemoryExporter
) -> None:
    app = _text_app()
    runtime = instrument(app)  # empty allow-lists
    headers = [("content-type", "application/json")]
    oip = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [SECRET]}]}
    await call_asgi(app, "POST", "/v2/models/norm/infer", json.dumps(oip).encode(), headers)
    kserve = json.dumps({"instances": [SECRET]}).encode()
    await call_asgi(app, "POST", "/v1/models/norm:predict", kserve, headers)
    assert runtime.force_flush(5)
    assert len(events.events) == 2
    assert all(event.output is None for event in events.events)
    assert SECRET[:MAX_LABEL].encode() not in pack_events(events.events)
