"""List answers come a page at a time, and bad query arguments never look like an outage.

``/v1/producers`` and ``/v1/completeness`` list at most a page (1,000 rows
unless ``?limit=`` asks for up to 10,000) in a stable order, with ``total``,
``truncated`` and the key to go on from; a NUL in a path or query value is a
400 on both stores (PostgreSQL once answered 503, "retry"); a store failure is
a 503 that carries Retry-After only when the store said it is transient.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner

from predtrace.cli import main
from predtrace.collector._api import QueryApi
from predtrace.collector._config import RetentionPolicy
from predtrace.collector._errors import StoreError, StoreUnavailableError
from predtrace.collector._metrics import CollectorMetrics
from predtrace.collector._retention import Retainer
from predtrace.collector._security import Authorizer
from predtrace.collector._service import LineageService
from predtrace.collector.store import Store
from predtrace.collector.store._completeness import _ModelPage, completeness_plan
from predtrace.collector.store._maintenance import PAGE_LIMIT
from predtrace.collector.store._ops import ExecMany, Plan, T
from predtrace.collector.store._postgres import translate
from predtrace.collector.testing import make_events

from .test_store import record

Get = Callable[[str], Awaitable[tuple[int, dict[str, Any], dict[str, str]]]]


def _api_app(store: Store) -> web.Application:
    """The query routes over ``store`` (no tokens: loopback clients only)."""
    metrics = CollectorMetrics()
    api = QueryApi(
        LineageService(store, None, metrics),
        Retainer(store, RetentionPolicy(), metrics),
        Authorizer(None),
        metrics,
        query_limit=1000,
        retry_after_s=7,
    )
    app = web.Application()
    app.add_routes(api.routes())
    return app


@pytest.fixture
async def client_of() -> AsyncIterator[Callable[[Store], Awaitable[TestClient[Any, Any]]]]:
    """Serve the query API of a store on 127.0.0.1 (port 0); closed afterwards."""
    clients: list[TestClient[Any, Any]] = []

    async def serve(store: Store) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = TestClient(TestServer(_api_app(store), host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield serve
    for client in clients:
        await client.close()


@pytest.fixture
async def get(store: Store, client_of: Callable[[Store], Awaitable[TestClient[Any, Any]]]) -> Get:
    """GET a path of the store's query API: status, JSON body (or {}), headers."""
    client = await client_of(store)

    async def _get(path: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        async with client.get(path) as resp:
            body = await resp.json() if resp.content_type == "application/json" else {}
            return resp.status, body, dict(resp.headers)

    return _get


def _producer_rows(count: int) -> Plan[None]:
    """``count`` producers, as that many first batches would leave them."""
    yield ExecMany(
        "INSERT INTO producers VALUES (?, 1, 1, 1, 0, 0, 1, 1)",
        [(f"edge-7-r{i:06d}",) for i in range(count)],
    )


async def _models(store: Store, names: list[str]) -> None:
    """Two predictions of each model, on two deployments (two served groups a model)."""
    for seq, name in enumerate(names, start=1):
        events = make_events(1, model=(name, "1")) + make_events(
            1, model=(name, "1"), deployment=f"d-{seq % 3}"
        )
        await store.ingest(record("p", seq, events))


# -- /v1/producers ---------------------------------------------------------------------


async def test_the_producer_list_stops_at_its_page_and_counts_every_producer(
    store: Store, get: Get
) -> None:
    await store.engine.write(_producer_rows(PAGE_LIMIT + 5))
    # The store's own call is bounded too (it once listed every row).
    assert len(await store.producers()) == PAGE_LIMIT
    status, body, _ = await get("/v1/producers")
    assert status == 200
    assert len(body["producers"]) == PAGE_LIMIT
    assert (body["total"], body["truncated"], body["truncated_by"]) == (
        PAGE_LIMIT + 5,
        True,
        "limit",
    )
    assert body["next_after"] == body["producers"][-1]["producer_id"] == "edge-7-r000999"
    assert "after=" in body["note"]
    status, body, _ = await get(f"/v1/producers?after={body['next_after']}")
    assert status == 200
    assert [p["producer_id"] for p in body["producers"]] == [
        f"edge-7-r{i:06d}" for i in range(PAGE_LIMIT, PAGE_LIMIT + 5)
    ]
    assert (body["total"], body["truncated"]) == (PAGE_LIMIT + 5, False)
    assert "next_after" not in body


async def test_pages_of_producers_follow_each_other_in_id_order(store: Store, get: Get) -> None:
    ids = ["edge-b", "edge-a", "Z", "edge-a-r00000f", "edge-{7}", "é"]
    for producer in ids:
        await store.ingest(record(producer, 1, []))
    seen: list[str] = []
    after = ""
    for _ in range(len(ids)):
        query = f"?limit=2&after={after}" if seen else "?limit=2"
        status, body, _ = await get("/v1/producers" + query.replace("{", "%7B").replace("}", "%7D"))
        assert status == 200 and body["total"] == len(ids), body
        seen += [p["producer_id"] for p in body["producers"]]
        if not body["truncated"]:
            break
        after = body["next_after"]
    assert sorted(seen) == sorted(ids) and len(seen) == len(ids)
    status, body, _ = await get("/v1/producers")
    assert [p["producer_id"] for p in body["producers"]] == seen  # one order, paged or not
    assert (body["total"], body["truncated"]) == (len(ids), False)


@pytest.mark.parametrize("limit", ["0", "10001", "-1", "abc", "1.5", " 5", "٣"])
async def test_a_limit_outside_1_to_10000_is_refused_with_a_reason(
    store: Store, get: Get, limit: str
) -> None:
    for path in ("/v1/producers", "/v1/completeness"):
        status, body, _ = await get(f"{path}?limit={limit}")
        assert status == 400, (path, limit, body)
        assert body["error"] == "limit must be a whole number from 1 to 10000"


# -- /v1/completeness -----------------------------------------------------------------


async def test_completeness_lists_a_page_of_models_and_its_totals_cover_them_all(
    store: Store, get: Get
) -> None:
    names = [f"m{i}" for i in (4, 0, 3, 1, 2)]
    await _models(store, names)
    whole = await store.completeness()
    assert [m["model"] for m in whole["models"]] == sorted(names)  # type: ignore[attr-defined]
    assert (whole["total"], whole["truncated"]) == (5, False)
    pages, after = [], None
    while True:
        query = "?limit=2" + (f"&after={after}" if after is not None else "")
        status, body, _ = await get("/v1/completeness" + query)
        assert status == 200
        for key in ("predictions", "complete", "share"):
            assert body[key] == whole[key], key  # every page: the totals of all models
        assert body["total"] == 5
        pages.append(body["models"])
        if not body["truncated"]:
            break
        assert body["truncated_by"] == "limit" and body["next_after"] == body["models"][-1]["model"]
        after = body["next_after"]
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [m for page in pages for m in page] == whole["models"]


async def test_completeness_reads_served_groups_a_chunk_at_a_time_with_the_same_answer(
    store: Store,
) -> None:
    names = [f"model-{i:02d}" for i in range(9)]
    await _models(store, names)
    whole = await store.engine.read(completeness_plan(limit=100))
    for limit, chunk in ((100, 1), (3, 2), (1, 5)):
        paged: list[object] = []
        after = None
        while True:
            answer = await store.engine.read(completeness_plan(limit, after, chunk=chunk))
            assert answer["predictions"] == whole["predictions"] == 18
            assert answer["complete"] == whole["complete"]
            paged += answer["models"]  # type: ignore[arg-type]
            if not answer["truncated"]:
                break
            after = str(answer["next_after"])
        assert paged == whole["models"], (limit, chunk)


def test_a_model_page_keeps_the_first_names_whatever_order_their_groups_come_in() -> None:
    rng = random.Random(7)
    groups = [f"m{n:03d}" for n in range(200) for _ in range(rng.randint(1, 4))]
    rng.shuffle(groups)
    for after, limit in ((None, 10), ("m049", 7), ("m195", 10), ("z", 3)):
        page = _ModelPage(limit, after)
        for name in groups:
            entry = page.entry(name)
            if entry is not None:
                entry["predictions"] = int(entry["predictions"]) + 1  # type: ignore[call-overload]
        expected = sorted({n for n in groups if after is None or n > after})
        listed = page.listed()
        assert [e["model"] for e in listed] == expected[:limit]
        assert [e["predictions"] for e in listed] == [groups.count(n) for n in expected[:limit]]
        assert page.beyond == (len(expected) > limit)


# -- bad arguments and store failures -------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v1/producers/%00",
        "/v1/producers/a%00b",
        "/v1/impact?image=%00",
        "/v1/impact?dataset=x%00",
        "/v1/impact?commit=abc%00def",
        "/v1/models/%00/versions/1/lineage",
        "/v1/models/m/aliases/%00/lineage",
        "/v1/predictions/a%00b",
        "/v1/producers?after=%00",
        "/v1/completeness?after=a%00",
        "/v1/completeness?x%00=1",
    ],
)
async def test_a_nul_in_a_path_or_query_value_is_a_400_on_every_store(
    store: Store, get: Get, path: str
) -> None:
    status, body, headers = await get(path)
    assert status == 400, (path, body)
    assert "NUL character" in body["error"]
    assert "Retry-After" not in headers


async def test_other_control_characters_still_find_what_ingest_stored(
    store: Store, get: Get
) -> None:
    # Ingest refuses only NUL in a producer id: its gap report stays reachable.
    await store.ingest(record("edge\x01\t\x1b7", 1, []))
    status, body, _ = await get("/v1/producers/edge%01%09%1B7")
    assert (status, body.get("producer_id")) == (200, "edge\x01\t\x1b7"), body
    status, body, headers = await get("/v1/producers/edge%01")
    assert (status, body) == (404, {"error": "unknown producer"})
    assert "Retry-After" not in headers


class _FailingEngine:
    """An engine whose every read fails with ``error``."""

    dialect = "sqlite"

    def __init__(self, error: StoreError) -> None:
        self.error = error

    async def open(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to close."""

    async def read(self, plan: Plan[T]) -> T:
        plan.close()
        raise self.error

    async def write(self, plan: Plan[T]) -> T:
        plan.close()
        raise self.error

    async def prepare_ingest(self, received_ns: int) -> None:
        """Nothing to prepare."""

    async def drop_partitions_before(self, cutoff_ns: int) -> tuple[int, int]:
        return 0, 0


async def test_a_transient_store_failure_is_a_503_with_retry_after(
    client_of: Callable[[Store], Awaitable[TestClient[Any, Any]]],
) -> None:
    client = await client_of(Store(_FailingEngine(StoreUnavailableError("database is locked"))))
    async with client.get("/v1/producers/p") as resp:
        assert (resp.status, resp.headers.get("Retry-After")) == (503, "7")
        assert (await resp.json())["error"] == "store unavailable, retry later"


async def test_another_store_failure_is_a_503_without_retry_after_logged_once_a_minute(
    client_of: Callable[[Store], Awaitable[TestClient[Any, Any]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    error = StoreError("postgresql store error: UndefinedTableError: relation does not exist")
    client = await client_of(Store(_FailingEngine(error)))
    caplog.set_level(logging.WARNING, logger="predtrace.collector.api")
    for _ in range(3):
        async with client.get("/v1/producers") as resp:
            assert resp.status == 503 and "Retry-After" not in resp.headers
            assert "the collector's log says why" in (await resp.json())["error"]
    lines = [r for r in caplog.records if "store failed a producers query" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.ERROR
    assert "UndefinedTableError" in lines[0].getMessage()


def test_asyncpgs_client_side_data_error_is_not_transient() -> None:
    asyncpg = pytest.importorskip("asyncpg")
    refused = translate(asyncpg.exceptions._base.DataError("invalid input for query argument $1"))
    assert type(refused) is StoreError
    gone = translate(asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"))
    assert isinstance(gone, StoreUnavailableError)


# -- predtrace completeness -----------------------------------------------------------


async def test_completeness_command_says_a_list_was_truncated_and_how_to_go_on(
    store: Store, client_of: Callable[[Store], Awaitable[TestClient[Any, Any]]]
) -> None:
    await _models(store, ["a b", "c", "d"])
    client = await client_of(store)
    url = str(client.make_url("")).rstrip("/")

    def cli(*args: str) -> Any:
        return CliRunner().invoke(main, ["completeness", "--collector", url, *args])

    first = await asyncio.to_thread(cli, "--limit", "1", "--fail-under", "0")
    assert first.exit_code == 0, first.output  # the verdict covers every model
    assert "1 of 3 models listed" in first.stdout  # the table's caption
    assert (
        "answer truncated: 1 of 3 models listed;"
        " next: predtrace completeness --after 'a b' --limit 1" in first.stderr
    )
    last = await asyncio.to_thread(cli, "--after", "a b", "-o", "json")
    assert last.exit_code == 0 and "truncated" not in last.stderr
    assert [m["model"] for m in json.loads(last.stdout)["models"]] == ["c", "d"]
    failing = await asyncio.to_thread(cli, "--limit", "1", "--fail-under", "1")
    assert failing.exit_code == 1 and "answer truncated" in failing.stderr
