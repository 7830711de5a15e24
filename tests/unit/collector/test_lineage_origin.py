"""A model version's run link that only OpenLineage made gives way to the authority's.

An OpenLineage event that names model M/1 (a ``predtrace`` run facet or a
``models:/M/1`` output) links M/1 to the event's own runId. The CI hook
registering M/1 with the registry's run afterwards used to be refused with
409 "produced by run 0190f000-..., not mlflow-run-42", though OpenLineage is
not the authority on which run made a version. Now such a link is
provisional: a registration that is the authority (the API, MLflow) replaces
it; two authorities that disagree still conflict, and OpenLineage never
overrides an authority's link.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from predtrace.collector import CollectorConfig, RunningCollector, start_collector
from predtrace.collector._errors import LineageConflictError
from predtrace.collector.lineage import parse_registration, parse_run_event
from predtrace.collector.store import Store, open_store
from predtrace.collector.store._schema import MIGRATIONS

OL_RUN = "0190f000-0000-7000-8000-00000000abcd"
OTHER_OL_RUN = "0190f000-0000-7000-8000-00000000beef"
SHA = "1234567abc"


def _event(run_id: str = OL_RUN, model: str = "m", version: str = "1") -> dict[str, Any]:
    return {
        "eventType": "COMPLETE",
        "eventTime": "2026-11-29T00:00:00Z",
        "run": {
            "runId": run_id,
            "facets": {"predtrace": {"model": {"name": model, "version": version}}},
        },
        "job": {
            "namespace": "train",
            "name": "churn-train",
            "facets": {"sourceCodeLocation": {"version": SHA}},
        },
        "inputs": [{"namespace": "s3://b", "name": "train.csv"}],
        "outputs": [],
        "producer": "x",
    }


def _ci(run_id: str | None, **model: object) -> dict[str, Any]:
    body: dict[str, Any] = {"model": {"name": "m", "version": "1", **model}}
    if run_id is not None:
        body["run"] = {"id": run_id}
    return body


async def _run_of(store: Store) -> str:
    lineage = await store.model_lineage("m", "1")
    assert lineage is not None
    return str(lineage["model_version"]["run_id"])  # type: ignore[index]


async def _openlineage(store: Store, run_id: str = OL_RUN) -> list[str]:
    return await store.register(parse_run_event(_event(run_id)), on_conflict="keep")


async def test_the_ci_hook_replaces_a_run_link_only_openlineage_made(store: Store) -> None:
    await _openlineage(store)
    assert await _run_of(store) == OL_RUN
    assert await store.register(parse_registration(_ci("mlflow-run-42"))) == []
    assert await _run_of(store) == "mlflow-run-42"
    # Now the link is the authority's: another authority that disagrees conflicts ...
    with pytest.raises(LineageConflictError, match="produced by run mlflow-run-42, not run-43"):
        await store.register(parse_registration(_ci("run-43")))
    # ... and OpenLineage, again, leaves it as stored and reports it.
    kept = await _openlineage(store)
    assert kept == [f"model m/1 was produced by run mlflow-run-42, not {OL_RUN}"]
    assert await _run_of(store) == "mlflow-run-42"
    with pytest.raises(LineageConflictError):
        await store.register(parse_registration(_ci("run-43")))


async def test_openlineage_repeating_the_authoritys_link_does_not_weaken_it(store: Store) -> None:
    await store.register(parse_registration(_ci(OL_RUN)))  # the CI hook names the OL run
    await _openlineage(store)  # the same link again, from OpenLineage
    with pytest.raises(LineageConflictError, match=f"produced by run {OL_RUN}, not run-43"):
        await store.register(parse_registration(_ci("run-43")))


async def test_the_authority_confirming_openlineages_link_makes_it_evidence(store: Store) -> None:
    await _openlineage(store)
    await store.register(parse_registration(_ci(OL_RUN)))  # agrees: now the authority's
    with pytest.raises(LineageConflictError, match=f"produced by run {OL_RUN}, not run-43"):
        await store.register(parse_registration(_ci("run-43")))


async def test_a_registration_without_a_run_leaves_the_link_provisional(store: Store) -> None:
    await _openlineage(store)
    await store.register(parse_registration(_ci(None, aliases=["prod"])))
    await store.register(parse_registration(_ci("mlflow-run-42")))
    assert await _run_of(store) == "mlflow-run-42"


async def test_two_openlineage_runs_for_one_version_still_conflict(store: Store) -> None:
    await _openlineage(store)
    kept = await _openlineage(store, OTHER_OL_RUN)
    assert kept == [f"model m/1 was produced by run {OL_RUN}, not {OTHER_OL_RUN}"]
    assert await _run_of(store) == OL_RUN
    # Still OpenLineage's only: the authority replaces it.
    await store.register(parse_registration(_ci("mlflow-run-42")))
    assert await _run_of(store) == "mlflow-run-42"


async def test_an_mlflow_lookup_replaces_openlineages_link_too(store: Store) -> None:
    await _openlineage(store)
    # An MLflow lookup is registered with ``keep`` and names the registry's run.
    mlflow = parse_registration({**_ci("mlflow-run-42"), "source": "mlflow"})
    assert await store.register(mlflow, on_conflict="keep") == []
    assert await _run_of(store) == "mlflow-run-42"


async def test_openlineage_naming_a_version_mlflow_told_of_leaves_it_mlflows(
    store: Store,
) -> None:
    # It took the version over (registry, source, origin): the collector then
    # stopped following the version's alias moves in MLflow.
    mlflow = parse_registration(
        {
            **_ci("mlflow-run-42", registry="mlflow", source="models:/m/1", aliases=["prod"]),
            "source": "mlflow",
        }
    )
    await store.register(mlflow, on_conflict="keep")
    await _openlineage(store)
    lineage = await store.model_lineage("m", "1")
    assert lineage is not None
    version = lineage["model_version"]
    assert (version["origin"], version["registry"], version["source"]) == (  # type: ignore[index]
        "mlflow",
        "mlflow",
        "models:/m/1",
    )
    assert version["run_id"] == "mlflow-run-42"  # type: ignore[index]


async def test_openlineage_replacing_on_purpose_still_corrects_the_version(store: Store) -> None:
    await store.register(parse_registration(_ci("ci-run", artifact_digest="sha256:" + "1" * 64)))
    event = _event()
    event["run"]["facets"]["predtrace"]["model"]["artifact_digest"] = "sha256:" + "2" * 64
    await store.register(parse_run_event(event), on_conflict="replace")
    lineage = await store.model_lineage("m", "1")
    assert lineage is not None
    assert lineage["model_version"]["artifact_digest"] == "sha256:" + "2" * 64  # type: ignore[index]


async def test_openlineage_fills_what_nothing_else_said(store: Store) -> None:
    await _openlineage(store)
    lineage = await store.model_lineage("m", "1")
    assert lineage is not None
    assert lineage["model_version"]["origin"] == "openlineage"  # type: ignore[index]


async def test_openlineage_replacing_on_purpose_is_still_provisional(store: Store) -> None:
    await store.register(parse_registration(_ci("mlflow-run-42")))
    await store.register(parse_run_event(_event()), on_conflict="replace")
    assert await _run_of(store) == OL_RUN
    await store.register(parse_registration(_ci("mlflow-run-43")))
    assert await _run_of(store) == "mlflow-run-43"


async def test_a_store_from_before_migration_4_opens_and_links(tmp_path: Path) -> None:
    path = tmp_path / f"old-{secrets.token_hex(4)}.db"
    first = open_store(f"sqlite:///{path}")
    await first.open()
    await first.register(parse_registration(_ci("run-1")))
    await first.close()
    with sqlite3.connect(path) as conn:  # as migration 3 left it
        conn.execute("DROP TABLE provisional_runs")
        conn.execute("DELETE FROM schema_migrations WHERE version >= 4")
    again = open_store(f"sqlite:///{path}")
    await again.open()
    try:
        assert await _run_of(again) == "run-1"
        kept = await _openlineage(again)
        assert kept == [f"model m/1 was produced by run run-1, not {OL_RUN}"]
        with pytest.raises(LineageConflictError):
            await again.register(parse_registration(_ci("run-2")))
    finally:
        await again.close()
    assert max(v for v, _ in MIGRATIONS) == 4


async def test_an_openlineage_link_stored_before_migration_4_gives_way_after_it(
    tmp_path: Path,
) -> None:
    # Review: the migration only made an empty table, so a link OpenLineage
    # made before the upgrade still refused the CI hook with 409.
    path = tmp_path / f"old-{secrets.token_hex(4)}.db"
    first = open_store(f"sqlite:///{path}")
    await first.open()
    await first.register(parse_run_event(_event()))
    await first.register(parse_run_event(_event(OTHER_OL_RUN, model="n")))
    await first.register(parse_registration(_ci("run-9", name="k")))  # the authority's
    await first.close()
    with sqlite3.connect(path) as conn:  # as migration 3 left it
        conn.execute("DROP TABLE provisional_runs")
        conn.execute("DELETE FROM schema_migrations WHERE version >= 4")
    again = open_store(f"sqlite:///{path}")
    await again.open()
    try:
        await again.register(parse_registration(_ci("mlflow-run-42")))
        assert await _run_of(again) == "mlflow-run-42"
        with pytest.raises(LineageConflictError):  # an authority's link stays evidence
            await again.register(parse_registration(_ci("run-10", name="k")))
    finally:
        await again.close()
    with sqlite3.connect(path) as conn:
        rows = sorted(conn.execute("SELECT name, version, run_id FROM provisional_runs"))
    assert rows == [("n", "1", OTHER_OL_RUN)]


@pytest.fixture
async def collector(tmp_path: Path) -> AsyncIterator[RunningCollector]:
    """A real collector (aiohttp on 127.0.0.1:0, SQLite) without tokens."""
    running = await start_collector(
        CollectorConfig(db=f"sqlite:///{tmp_path}/c.db", listen="127.0.0.1:0")
    )
    try:
        yield running
    finally:
        await running.stop()


async def _call(method: str, url: str, body: object = None) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.request(method, url, json=body) as resp:
        return resp.status, await resp.json()


async def test_over_http_the_ci_hook_after_openlineage_is_201(collector: RunningCollector) -> None:
    status, answer = await _call("POST", f"{collector.url}/v1/openlineage", _event())
    assert status == 201, answer
    ci = {**_ci("mlflow-run-42"), "commit": {"sha": SHA}}
    status, answer = await _call("POST", f"{collector.url}/v1/lineage", ci)
    assert status == 201, answer
    assert "conflicts_kept_as_stored" not in answer
    status, lineage = await _call("GET", f"{collector.url}/v1/models/m/versions/1/lineage")
    assert status == 200
    assert lineage["model_version"]["run_id"] == "mlflow-run-42"
    assert lineage["run"]["commit"]["sha"] == SHA
    status, answer = await _call("POST", f"{collector.url}/v1/lineage", _ci("run-43"))
    assert status == 409 and "produced by run mlflow-run-42, not run-43" in answer["error"]
