"""RELIABILITY row 34 (short T1 run): arbitrary request bodies through the middleware.

Whatever a client sends to a prediction route (bytes that are not JSON, deep
nesting, odd ids, huge numbers), the app answers exactly as it would without
the middleware, and one event is emitted per request.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from predtrace.middleware import MiddlewareConfig, instrument_app
from predtrace.middleware.testing import call_asgi
from predtrace.sidecar.testing import InMemoryExporter

from .conftest import model_app

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["id", "inputs", "data", "name", "x"]), children, max_size=4
        )
    ),
    max_leaves=20,
)
BODIES = st.one_of(
    st.binary(max_size=200),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    # Deep nesting, but not near the interpreter's recursion limit (~1,000,
    # ~2,000 while Hypothesis runs): there the app's own answer depends on how
    # deep its caller's stack is (any middleware adds frames), so a 400 or a
    # 500 from FastAPI itself would flip with the frames, not with predtrace.
    (st.integers(1, 600) | st.integers(4000, 8000)).map(lambda depth: b"[" * depth + b"]" * depth),
)
HEADERS = [("content-type", "application/json")]

PLAIN = model_app()
TRACED = model_app()
EVENTS = InMemoryExporter(max_events=100)
RUNTIME = instrument_app(
    TRACED,
    MiddlewareConfig(
        exporter=EVENTS,
        fingerprint_key="fuzz-fingerprint-key",
        oip_echo_id=False,  # the app must see exactly what the client sent
        sample_rate=1.0,
        feature_allowlist=frozenset({"x", "data"}),
        max_body_bytes=16384,  # the deepest bodies are read and parsed too
    ),
)


async def _answer(app: object, body: bytes, chunks: int) -> tuple[int, bytes, str]:
    # Chunk boundaries vary, content does not.
    step = max(1, len(body) // chunks)
    parts = [body[i : i + step] for i in range(0, len(body), step)] or [b""]
    try:
        response = await call_asgi(app, "POST", "/v2/models/m/infer", parts, HEADERS)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - the server would answer 500
        return 500, b"", type(exc).__name__
    return response.status, response.body, ""


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODIES, chunks=st.integers(1, 3))
async def test_any_body_gets_the_same_answer_as_without_telemetry(body: bytes, chunks: int) -> None:
    before = RUNTIME.stats().get("enqueued", 0)
    assert await _answer(TRACED, body, chunks) == await _answer(PLAIN, body, chunks)
    assert RUNTIME.stats()["enqueued"] == before + 1
    assert not any(k.startswith("error.") for k in RUNTIME.stats())
