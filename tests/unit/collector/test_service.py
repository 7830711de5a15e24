"""Queries with the MLflow fallback, against a fake MLflow on 127.0.0.1.

A registry that answers badly, hangs or is unreachable never fails a query:
the answer comes from the store with the hop missing and why, within one
deadline, and the failure is remembered so the next queries do not wait.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from predtrace.collector._errors import RegistryError
from predtrace.collector._metrics import CollectorMetrics
from predtrace.collector._service import LineageService
from predtrace.collector.lineage import MlflowConfig, MlflowRegistry, parse_registration
from predtrace.collector.lineage._mlflow import RegistryBackoffError
from predtrace.collector.store import Store
from predtrace.collector.testing import make_events

from .test_store import record

TRACE = bytes.fromhex("6bf92f3577b34da6a3ce929d0e0e4738")
RUN = {
    "info": {"run_id": "r-1", "experiment_id": "0", "run_name": "train"},
    "data": {"tags": [{"key": "mlflow.source.git.commit", "value": "abcdef0123"}]},
    "inputs": {"dataset_inputs": [{"dataset": {"digest": "d1", "name": "train"}}]},
}


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeMlflow:
    """MLflow's three lineage GET endpoints; what they answer is set per test."""

    def __init__(self) -> None:
        self.versions: dict[tuple[str, str], dict[str, object]] = {}
        self.runs: dict[str, object] = {"r-1": RUN}
        self.aliases: dict[tuple[str, str], str] = {}
        self.raw: bytes | None = None  # this body (status 200) for every request
        self.status = 200
        self.hang = False
        self.delay = 0.0  # seconds before each answer: a healthy but not instant MLflow
        self.requests: list[str] = []
        self.release = asyncio.Event()
        self.url = ""

    def _model_version(self, name: str, version: str) -> dict[str, object]:
        aliases = sorted(a for (n, a), v in self.aliases.items() if n == name and v == version)
        return {"name": name, "version": version, "aliases": aliases, "run_id": "r-1"} | (
            self.versions[(name, version)]
        )

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(request.path_qs)
        if self.hang:
            await self.release.wait()
        await asyncio.sleep(self.delay)
        if self.raw is not None or self.status != 200:
            return web.Response(status=self.status, body=self.raw or b"oops")
        q, path = request.query, request.path.removeprefix("/api/2.0/mlflow")
        if path == "/model-versions/get" and (q["name"], q["version"]) in self.versions:
            return web.json_response(
                {"model_version": self._model_version(q["name"], q["version"])}
            )
        if path == "/runs/get" and q["run_id"] in self.runs:
            return web.json_response({"run": self.runs[q["run_id"]]})
        if path == "/registered-models/alias":
            version = self.aliases.get((q["name"], q["alias"]))
            if version is None:  # what MLflow answers for an alias never set
                return web.json_response({"error_code": "INVALID_PARAMETER_VALUE"}, status=400)
            return web.json_response({"model_version": self._model_version(q["name"], version)})
        return web.json_response({"error_code": "RESOURCE_DOES_NOT_EXIST"}, status=404)


@pytest.fixture
async def mlflow() -> AsyncIterator[FakeMlflow]:
    fake = FakeMlflow()
    app = web.Application()
    app.router.add_get("/{tail:.*}", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake.url = f"http://127.0.0.1:{port}"
    yield fake
    fake.release.set()
    await runner.cleanup()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def service(store: Store, mlflow: FakeMlflow, clock: Clock) -> AsyncIterator[LineageService]:
    registry = MlflowRegistry(MlflowConfig(url=mlflow.url, ttl=300, negative_ttl=30), clock=clock)
    # A short deadline keeps the hung-MLflow tests short; nothing asserts durations.
    lineage = LineageService(store, registry, CollectorMetrics(), registry_deadline_s=0.3)
    yield lineage
    await lineage.close()


def _count(service: LineageService, result: str) -> float:
    value = service.metrics.registry.get_sample_value(
        "predtrace_collector_registry_lookups_total", {"result": result}
    )
    return value or 0.0


async def _serve(store: Store, *models: tuple[str, str], alias: str = "") -> None:
    for seq, model in enumerate(models, 1):
        await store.ingest(
            record("p", seq, make_events(1, trace_id=TRACE, model=model, alias=alias))
        )


def _model_hop(prediction: dict[str, Any]) -> str:
    hops = {m["hop"]: m["reason"] for m in prediction["lineage"]["missing"]}
    return str(hops.get("model_version", ""))


MALFORMED: list[tuple[str, dict[str, Any], str]] = [  # (case, MLflow's answer, the reason)
    ("run info is a list", {"runs": {"r-1": {**RUN, "info": [1]}}}, "run.info as a list"),
    ("run is a list", {"runs": {"r-1": [1]}}, "run as a list"),
    ("aliases is text", {"version": {"aliases": "champ"}}, "alias"),
    ("alias holds NUL", {"version": {"aliases": ["ch\x00amp"]}}, "NUL"),
    ("no name", {"version": {"name": None}}, "without a name"),
    ("another model", {"version": {"name": "other"}}, "answered model 'other'"),
    (
        "metric without key",
        {"runs": {"r-1": {**RUN, "data": {"metrics": [{"value": 1.0}]}}}},
        "metric without a key",
    ),
    (
        "dataset inputs an object",
        {"runs": {"r-1": {**RUN, "inputs": {"dataset_inputs": {"a": 1}}}}},
        "dataset_inputs as an object",
    ),
    (
        "dataset input is text",
        {"runs": {"r-1": {**RUN, "inputs": {"dataset_inputs": ["x"]}}}},
        "as text, not an object",
    ),
    ("a JSON list", {"raw": b"[1, 2]"}, "a list for /model-versions/get"),
    ("not JSON", {"raw": b"\x00\xffnot json"}, "invalid JSON"),
]


@pytest.mark.parametrize(
    ("answer", "reason"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
async def test_a_malformed_mlflow_answer_leaves_the_hop_missing_and_says_why(
    service: LineageService,
    store: Store,
    mlflow: FakeMlflow,
    answer: dict[str, Any],
    reason: str,
) -> None:
    mlflow.versions[("m", "1")] = answer.get("version", {})
    mlflow.runs.update(answer.get("runs", {}))
    mlflow.raw = answer.get("raw")
    await _serve(store, ("m", "1"))

    predictions = await service.pivot("trace_id", TRACE, 10)
    assert predictions[0]["lineage"]["model_version"] is None
    assert "the MLflow lookup failed: MLflow" in _model_hop(predictions[0])
    assert reason in _model_hop(predictions[0])
    completeness = await service.completeness()
    assert completeness["models"][0]["missing"]["model_version"] == 1  # type: ignore[index]
    with pytest.raises(RegistryError, match=r"MLflow"):
        await service.model_lineage("m", "1")
    assert await store.model("m", "1") is None  # nothing half-read was stored
    assert await store.resolve_alias("m", "c") is None  # "champ" was not five aliases


async def test_a_hung_mlflow_costs_one_query_its_deadline_and_the_next_queries_nothing(
    service: LineageService, store: Store, mlflow: FakeMlflow
) -> None:
    versions = [("m", str(v)) for v in range(1, 9)]
    mlflow.versions.update({v: {} for v in versions})
    mlflow.hang = True
    await _serve(store, *versions)

    completeness = await service.completeness()
    assert completeness["models"][0]["missing"]["model_version"] == 8  # type: ignore[index]
    assert len(mlflow.requests) <= 4  # side by side, a few at once: never all 8
    # The 4 sent time out; the 4 still waiting for a slot were never asked.
    assert (_count(service, "timeout"), _count(service, "skipped")) == (4, 4)

    asked = len(mlflow.requests)
    predictions = await service.pivot("trace_id", TRACE, 10)
    await service.completeness()
    assert [p["lineage"]["model_version"] for p in predictions] == [None] * 8
    assert "did not answer within the query's" in _model_hop(predictions[0])
    with pytest.raises(RegistryBackoffError, match=r"next try in \d+ s"):
        await service.model_lineage("m", "1")
    assert len(mlflow.requests) == asked  # remembered: nobody waited again
    assert _count(service, "skipped") == 4 + 8 + 8 + 1


async def test_a_slow_but_answering_mlflow_is_not_marked_down_by_a_long_query(
    service: LineageService, store: Store, mlflow: FakeMlflow
) -> None:
    # 16 lookups at 0.1 s each, 4 at a time, against a 0.3 s deadline: the query
    # runs out of time, but MLflow answered: it must not be shunned for 30 s.
    versions = [("m", str(v)) for v in range(1, 17)]
    mlflow.versions.update({v: {} for v in [*versions, ("m", "99")]})
    mlflow.delay = 0.1
    await _serve(store, *versions)
    await service.completeness()
    assert _count(service, "found") >= 1 and _count(service, "timeout") <= 4
    lineage = await service.model_lineage("m", "99")  # MLflow is still asked
    assert lineage is not None and lineage["model_version"]["version"] == "99"  # type: ignore[index]


async def test_a_failed_lookup_is_tried_again_after_the_negative_ttl(
    service: LineageService, store: Store, mlflow: FakeMlflow, clock: Clock
) -> None:
    mlflow.versions[("m", "1")] = {}
    mlflow.status = 500
    with pytest.raises(RegistryError, match="MLflow answered 500"):
        await service.model_lineage("m", "1")
    mlflow.status = 200
    with pytest.raises(RegistryBackoffError):
        await service.model_lineage("m", "1")
    assert len(mlflow.requests) == 1

    clock.now += 31
    lineage = await service.model_lineage("m", "1")
    assert lineage is not None and lineage["run"]["id"] == "r-1"  # type: ignore[index]


async def test_an_unreachable_mlflow_is_a_registry_error_not_a_missing_version(
    store: Store,
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    registry = MlflowRegistry(MlflowConfig(url=f"http://127.0.0.1:{port}"))
    service = LineageService(store, registry, CollectorMetrics())
    try:
        with pytest.raises(RegistryError, match="MLflow unreachable") as first:
            await service.model_lineage("rec", "1")
        assert not isinstance(first.value, RegistryBackoffError)
        # MLflow is down: neither the alias nor another version is asked for.
        with pytest.raises(RegistryBackoffError, match="MLflow unreachable"):
            await service.resolve_alias("rec", "champion")
        with pytest.raises(RegistryBackoffError, match="MLflow unreachable"):
            await service.model_lineage("rec", "2")
    finally:
        await service.close()
    assert registry.requests == 1
    assert _count(service, "error") == 1


async def test_an_alias_moved_in_mlflow_is_seen_once_the_cached_one_is_stale(
    service: LineageService, store: Store, mlflow: FakeMlflow, clock: Clock
) -> None:
    mlflow.versions.update({("m", "1"): {}, ("m", "2"): {}})
    mlflow.aliases[("m", "champion")] = "1"
    assert await service.resolve_alias("m", "champion") == "1"
    assert await store.resolve_alias("m", "champion") == "1"

    mlflow.aliases[("m", "champion")] = "2"
    asked = len(mlflow.requests)
    assert await service.resolve_alias("m", "champion") == "1"  # fresh for the TTL
    assert len(mlflow.requests) == asked

    clock.now += 301
    assert await service.resolve_alias("m", "champion") == "2"
    assert await store.resolve_alias("m", "champion") == "2"  # stored where MLflow has it
    assert await service.resolve_alias("m", "nope") is None  # MLflow's 400: no such alias


async def test_an_alias_registered_by_ci_is_the_stores_answer(
    service: LineageService, mlflow: FakeMlflow
) -> None:
    await service.register(
        parse_registration({"model": {"name": "m", "version": "3", "aliases": ["prod"]}})
    )
    mlflow.versions[("m", "9")] = {}
    mlflow.aliases[("m", "prod")] = "9"
    assert await service.resolve_alias("m", "prod") == "3"
    assert mlflow.requests == []


async def test_a_prediction_naming_only_an_alias_is_resolved_through_mlflow(
    service: LineageService, store: Store, mlflow: FakeMlflow
) -> None:
    mlflow.versions[("m", "2")] = {}
    mlflow.aliases[("m", "staging")] = "2"
    # The store learns the alias before predictions name it (a lookup by
    # alias, a query of another prediction): it holds for them.
    assert await service.resolve_alias("m", "staging") == "2"
    await _serve(store, ("m", ""), alias="staging")

    predictions = await service.pivot("trace_id", TRACE, 10)
    model = predictions[0]["lineage"]["model_version"]
    assert model is not None
    assert (model["version"], model["resolved_via_alias"]) == ("2", "staging")
    assert predictions[0]["lineage"]["run"]["id"] == "r-1"


async def test_predictions_older_than_the_stores_first_sight_of_an_alias_are_not_explained(
    service: LineageService, store: Store, mlflow: FakeMlflow
) -> None:
    # Served while staging pointed at version 1; by the first query MLflow
    # has moved it to version 2 (created after them): version 2 must not be
    # said to have served them, since MLflow says where an alias is, not
    # since when.
    await _serve(store, ("m", ""), alias="staging")
    mlflow.versions[("m", "2")] = {}
    mlflow.aliases[("m", "staging")] = "2"
    predictions = await service.pivot("trace_id", TRACE, 10)
    assert predictions[0]["lineage"]["model_version"] is None
    reason = _model_hop(predictions[0])
    assert "alias 'staging' was moved to version 2, or first made known to the store" in reason
    assert "the version that served them is unknown" in reason
    completeness = await service.completeness()
    assert completeness["complete"] == 0
    lineage = await service.model_lineage("m", "2")
    assert lineage is not None and lineage["predictions"] == 0


async def test_an_alias_only_prediction_follows_the_alias_once_mlflow_moved_it(
    service: LineageService, store: Store, mlflow: FakeMlflow, clock: Clock
) -> None:
    mlflow.versions.update({("m", "2"): {}, ("m", "3"): {}})
    mlflow.aliases[("m", "staging")] = "2"
    assert await service.resolve_alias("m", "staging") == "2"  # known before predictions
    await _serve(store, ("m", ""), alias="staging")
    await service.pivot("trace_id", TRACE, 10)
    mlflow.aliases[("m", "staging")] = "3"

    clock.now += 301  # stale: this query answers as stored and asks MLflow behind it
    predictions = await service.pivot("trace_id", TRACE, 10)
    assert predictions[0]["lineage"]["model_version"]["version"] == "2"
    await asyncio.gather(*service._refreshing)
    # The move is learnt: a prediction made before it is not explained by
    # version 3 (version 2 served it); one made after it is.
    predictions = await service.pivot("trace_id", TRACE, 10)
    assert "was moved to version 3" in _model_hop(predictions[0])
    later = bytes.fromhex("7bf92f3577b34da6a3ce929d0e0e4739")
    await store.ingest(
        record("p", 9, make_events(1, trace_id=later, model=("m", ""), alias="staging"))
    )
    predictions = await service.pivot("trace_id", later, 10)
    assert predictions[0]["lineage"]["model_version"]["version"] == "3"


async def test_an_alias_only_prediction_says_why_mlflow_could_not_resolve_it(
    service: LineageService, store: Store, mlflow: FakeMlflow
) -> None:
    mlflow.status = 503
    await _serve(store, ("m", ""), alias="staging")
    predictions = await service.pivot("trace_id", TRACE, 10)
    assert "the MLflow lookup failed: MLflow answered 503" in _model_hop(predictions[0])


async def test_registrations_are_counted_by_endpoint_kind_never_by_free_text(
    service: LineageService,
) -> None:
    for i in range(3):
        body = {"image": {"digest": "sha256:lbl"}, "source": f"s{i}-" + "x" * 200}
        await service.register(parse_registration(body))
    text = service.metrics.render().decode()
    assert "xxxxx" not in text
    sample = service.metrics.registry.get_sample_value
    assert sample("predtrace_collector_lineage_registrations_total", {"source": "api"}) == 3
    assert sample("predtrace_collector_lineage_registrations_total", {"source": "mlflow"}) == 0


async def test_a_deleted_run_leaves_the_model_version_without_it(
    service: LineageService, mlflow: FakeMlflow
) -> None:
    mlflow.versions[("m", "1")] = {"run_id": "gone"}
    lineage = await service.model_lineage("m", "1")
    assert lineage is not None and lineage["run"] is None
    assert json.dumps(lineage)  # plain JSON
