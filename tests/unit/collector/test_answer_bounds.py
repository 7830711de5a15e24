"""Answers stay bounded however much lineage a run or a model version gathers.

A pivot says of the groups it leaves out only their missing hops: it never
loads their runs' bodies (registration lets a run grow without bound, and a
thousand groups may share it), and reads each run once. Model lineage and
impact list a version's 1,000 busiest deployments, fetch their nodes in
the same query, and count every deployment and prediction; the CLI says
when a list was cut. Lineage answers are big queries: built in a query
slot and encoded in a thread, so ``/healthz`` is answered meanwhile.
"""

from __future__ import annotations

import asyncio
import http.client
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web

from predtrace.collector._api import QueryApi
from predtrace.collector._config import RetentionPolicy
from predtrace.collector._metrics import CollectorMetrics
from predtrace.collector._render import render_impact, render_model_lineage
from predtrace.collector._retention import Retainer
from predtrace.collector._security import Authorizer
from predtrace.collector._service import LineageService
from predtrace.collector.lineage import parse_registration
from predtrace.collector.store import PivotAnswer, Store, open_store
from predtrace.collector.store._chain import ChainKey, chain_plan
from predtrace.collector.store._impact import model_lineage_plan
from predtrace.collector.store._ops import Fetch, Op, Plan, T
from predtrace.collector.store._reads import pivot_plan, served_groups_plan
from predtrace.collector.testing import make_events

from .test_query_budget import _Stall
from .test_render import _printed
from .test_store import FULL_LINEAGE, TRACE, record

_RUN_BODY = "SELECT run_id, registry, name, url, params"  # run_plan's query: the whole run


def _recorded(plan: Plan[T], ops: list[Op]) -> Plan[T]:
    """``plan``, noting in ``ops`` each operation it asks the engine for."""
    try:
        op = next(plan)
        while True:
            ops.append(op)
            op = plan.send((yield op))
    except StopIteration as stop:
        return cast(T, stop.value)


def _fetches(ops: list[Op], sql: str) -> int:
    return sum(1 for op in ops if isinstance(op, Fetch) and sql in op.sql)


# -- the pivot's unlisted groups ---------------------------------------------------------


async def test_a_pivots_unlisted_groups_never_load_a_run_body_and_read_each_run_once(
    store: Store,
) -> None:
    await store.register(parse_registration(FULL_LINEAGE))
    events = [e for i in range(50) for e in make_events(1, trace_id=TRACE, deployment=f"d-{i}")]
    await store.ingest(record("p", 1, events))
    ops: list[Op] = []
    # A budget no prediction fits in: every group is left out, and checked.
    plan = pivot_plan("trace_id", TRACE, 1000, max_bytes=1)
    answer, _ = await store.engine.read(_recorded(plan, ops))
    assert isinstance(answer, PivotAnswer)
    assert (len(answer), answer.total, answer.cut_by) == (0, 50, "bytes")
    assert answer.unlisted is not None and len(answer.unlisted) == 50
    assert all(g["complete"] and g["missing"] == [] for g in answer.unlisted)
    assert answer.complete is True
    assert _fetches(ops, _RUN_BODY) == 0
    assert _fetches(ops, "FROM runs r WHERE r.run_id = ?") == 1  # one run: read once
    assert _fetches(ops, "FROM model_versions WHERE name = ? AND version = ?") == 1


async def test_an_unlisted_groups_missing_hops_are_those_its_whole_chain_names(
    store: Store,
) -> None:
    await store.register(parse_registration(FULL_LINEAGE))  # churn/3 complete, alias prod
    await store.register(parse_registration({"model": {"name": "churn", "version": "4"}}))
    bare = {"model": {"name": "churn", "version": "5"}, "run": {"id": "run-bare"}}
    await store.register(parse_registration(bare))  # a run without commit or datasets
    await store.register(parse_registration({"model": {"name": "churn", "version": "6"}}))
    await store.ingest(record("p", 1, make_events(1, trace_id=TRACE, timestamp_ns=1)))
    broken = [
        make_events(1, trace_id=TRACE, deployment=""),
        make_events(1, trace_id=TRACE, image=""),  # churn/3's sole image
        make_events(1, trace_id=TRACE, model=("churn", "4")),  # no run
        make_events(1, trace_id=TRACE, model=("churn", "5"), image=""),
        make_events(1, trace_id=TRACE, model=("churn", "9")),  # not registered
        make_events(1, trace_id=TRACE, model=("churn", ""), alias="prod"),
        make_events(1, trace_id=TRACE, model=("churn", ""), alias="ghost"),
        make_events(1, trace_id=TRACE, model=("", "")),
    ]
    await store.ingest(record("p", 2, [e for events in broken for e in events]))
    ops: list[Op] = []
    plan = pivot_plan("trace_id", TRACE, 1000, max_bytes=1)  # every group left out
    answer, unresolved = await store.engine.read(_recorded(plan, ops))
    assert _fetches(ops, _RUN_BODY) == 0
    assert isinstance(answer, PivotAnswer) and answer.unlisted is not None
    assert len(answer.unlisted) == len(broken) + 1
    # A group's first prediction: the time its chain is explained at.
    since = {tuple(r[:5]): int(r[6]) for r in await store.engine.read(served_groups_plan())}
    for group in answer.unlisted:
        model = cast(dict[str, str], group["model"])
        names = (model["name"], model["version"], model["alias"])
        key = cast(ChainKey, (*names, group["deployment"], group["image_digest"]))
        whole = await store.engine.read(chain_plan(key, since[key]))
        assert (group["complete"], group["missing"]) == (whole["complete"], whole["missing"])
    assert [k[:2] for k in unresolved] == [("churn", "9")]
    assert answer.complete is False


# -- model lineage and impact --------------------------------------------------------------

_FLEET = 1_005  # deployments: past the 1,000 listed


async def _fleet(store: Store) -> None:
    """churn/3 served by ``_FLEET`` deployments; edge-1004 and edge-0500 the busiest."""
    deployment = {"id": "edge-1004", "service": "churn-edge", "namespace": "edge"}
    await store.register(parse_registration({**FULL_LINEAGE, "deployment": deployment}))
    events = [e for i in range(_FLEET) for e in make_events(1, deployment=f"edge-{i:04d}")]
    events += make_events(4, deployment="edge-1004") + make_events(2, deployment="edge-0500")
    await store.ingest(record("p", 1, events))


async def test_model_lineage_lists_the_busiest_deployments_and_counts_them_all(
    store: Store,
) -> None:
    await _fleet(store)
    ops: list[Op] = []
    lineage = await store.engine.read(_recorded(model_lineage_plan("churn", "3"), ops))
    assert lineage is not None
    deployments = cast(list[dict[str, Any]], lineage["deployments"])
    assert len(deployments) == 1_000
    assert (lineage["deployments_total"], lineage["deployments_truncated"]) == (_FLEET, True)
    assert lineage["predictions"] == _FLEET + 6  # every deployment's, listed or not
    assert [(d["id"], d["predictions"]) for d in deployments[:3]] == [
        ("edge-1004", 5),
        ("edge-0500", 3),
        ("edge-0000", 1),
    ]
    assert deployments[0]["node"]["service"] == "churn-edge"
    assert all(d["node"]["id"] == d["id"] for d in deployments)
    assert lineage["complete"] is True, lineage["missing_reasons"]
    assert len(ops) < 20, "one query for every deployment's node"
    assert not _fetches(ops, "FROM deployments WHERE id = ?")


async def test_a_model_lineage_of_few_deployments_lists_them_all_and_says_so(
    store: Store,
) -> None:
    await store.register(parse_registration(FULL_LINEAGE))
    await store.ingest(record("p", 1, make_events(2) + make_events(3, deployment="churn-b")))
    lineage = await store.model_lineage("churn", "3")
    assert lineage is not None
    assert [d["id"] for d in lineage["deployments"]] == ["churn-b", "churn-prod"]  # type: ignore[attr-defined]
    assert (lineage["deployments_total"], lineage["deployments_truncated"]) == (2, False)
    assert lineage["predictions"] == 5


@pytest.mark.parametrize(
    ("kind", "value"), [("dataset", "sha256:train"), ("image", "sha256:image-churn-3")]
)
async def test_impact_lists_the_busiest_deployments_of_a_version_and_counts_them_all(
    store: Store, kind: str, value: str
) -> None:
    await _fleet(store)
    impact = await store.impact(kind, value)
    assert impact is not None
    assert impact["predictions"] == _FLEET + 6
    [version] = cast(list[dict[str, Any]], impact["model_versions"])
    assert len(version["deployments"]) == 1_000
    assert (version["deployments_total"], version["deployments_truncated"]) == (_FLEET, True)
    assert version["predictions"] == _FLEET + 6
    assert version["deployments"][0]["id"] == "edge-1004"
    assert version["first_seen"] is not None and version["last_seen"] is not None


# -- what the CLI prints -------------------------------------------------------------------


def test_model_lineage_table_says_how_many_deployments_it_shows_of_how_many() -> None:
    answer: dict[str, object] = {
        "model_version": {"name": "churn", "version": "3", "origin": "ci"},
        "run": None,
        "deployments": [{"id": "edge-1", "predictions": 9, "first_seen": None, "last_seen": None}],
        "deployments_total": 200_000,
        "deployments_truncated": True,
        "predictions": 1_234_567,
        "missing": [],
    }
    printed = _printed(render_model_lineage, answer)
    assert "showing 1 of 200,000 deployments" in printed
    assert "1,234,567 predictions in all" in printed  # the rows count only those shown
    answer["deployments_truncated"] = False
    assert "showing" not in _printed(render_model_lineage, answer)


def test_impact_table_says_which_versions_deployments_were_cut() -> None:
    listed = [{"id": "e-1", "predictions": 1, "first_seen": None, "last_seen": None}]
    answer = {
        "query": {"kind": "commit", "value": "abc1234"},
        "predictions": 200_000,
        "model_versions": [
            {
                "name": "churn",
                "version": "3",
                "run_id": "r",
                "predictions": 200_000,
                "deployments": listed * 2,
                "deployments_total": 200_000,
                "deployments_truncated": True,
            },
            {"name": "churn", "version": "4", "run_id": "r", "deployments": listed},
        ],
    }
    out = _printed(render_impact, answer)
    assert "churn/3: showing 2 of 200,000 deployments" in out
    assert "churn/4: showing" not in out


# -- lineage answers are big queries --------------------------------------------------------


class _SlowLineage:
    """A lineage whose run holds a value that encodes slowly (a stand-in for a big one)."""

    registry = None

    def __init__(self, store: Store, value: _Stall) -> None:
        self.store, self.value = store, value

    async def model_lineage(self, name: str, version: str) -> dict[str, object]:
        return {"model_version": {"name": name, "version": version}, "run": {"p": self.value}}

    async def resolve_alias(self, name: str, alias: str) -> str:
        return "3"


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path}/collector.db")
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
async def serve_slow(sqlite_store: Store) -> AsyncIterator[Callable[[_Stall], Awaitable[int]]]:
    """Serve the query API over ``_SlowLineage`` (with /healthz) on 127.0.0.1; its port."""
    runners: list[web.AppRunner] = []

    async def _serve(stall: _Stall) -> int:
        metrics = CollectorMetrics()
        service = cast(LineageService, _SlowLineage(sqlite_store, stall))
        retainer = Retainer(sqlite_store, RetentionPolicy(), metrics)
        api = QueryApi(
            service, retainer, Authorizer(None), metrics, query_limit=10, retry_after_s=1
        )
        app = web.Application()
        app.add_routes(api.routes())
        app.router.add_get("/healthz", _healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    yield _serve
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize(
    "path", ["/v1/models/churn/versions/3/lineage", "/v1/models/churn/aliases/prod/lineage"]
)
async def test_healthz_is_answered_while_a_lineage_answer_is_encoded(
    serve_slow: Callable[[_Stall], Awaitable[int]], path: str
) -> None:
    stall = _Stall()
    port = await serve_slow(stall)

    def probe() -> tuple[int, bytes] | str:
        # From a thread: were the answer encoded on the event loop, this
        # client would wait with the loop.
        try:
            if not stall.encoding.wait(10):
                return "the answer was not encoded"
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                connection.request("GET", "/healthz")
                response = connection.getresponse()
                return response.status, response.read()
            except OSError as exc:
                return f"/healthz not answered: {exc!r}"
            finally:
                connection.close()
        finally:
            stall.release.set()

    async with aiohttp.ClientSession() as session:
        query = asyncio.create_task(session.get(f"http://127.0.0.1:{port}{path}"))
        assert await asyncio.to_thread(probe) == (200, b"ok")
        async with await query as response:
            assert response.status == 200
            assert (await response.json())["run"] == {"p": "stalled"}
