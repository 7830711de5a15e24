"""MLflow lookups kept within bounds: memory, loop time, requests, odd answers.

Against the fake MLflow of ``test_service`` on 127.0.0.1: the registry keeps
no registration in its cache, reads big answers off the loop and only so far,
shares one lookup per key, lets a lookup a query's deadline cut fill the
store, and treats any failure reading an answer as a failed lookup.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import tracemalloc
from typing import Any

import pytest

from predtrace.collector import _lookups
from predtrace.collector._errors import RegistryError, StoreError
from predtrace.collector._service import LineageService
from predtrace.collector.lineage import MlflowConfig, MlflowRegistry, Registration, _mlflow
from predtrace.collector.lineage._mlflow import RegistryBackoffError
from predtrace.collector.store import Store

from .test_service import RUN, Clock, FakeMlflow, clock, mlflow, service

__all__ = ["clock", "mlflow", "service"]  # the fixtures, used by name


def _big_run(run_id: str) -> dict[str, Any]:
    """A run whose params are at the per-field bounds: about 0.5 MB of values."""
    params = [{"key": f"p{i}", "value": f"{run_id}-{i}".ljust(2000, "v")} for i in range(256)]
    return {**RUN, "info": {**RUN["info"], "run_id": run_id}, "data": {"params": params}}


async def _until(check: Any, seconds: float = 5.0) -> None:
    """Poll ``check`` (an awaitable factory) until it is true, within ``seconds``."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "not done in time"
        await asyncio.sleep(0.02)


async def test_the_lookup_cache_keeps_no_registration_however_big_the_answer(
    mlflow: FakeMlflow, clock: Clock
) -> None:
    registry = MlflowRegistry(MlflowConfig(url=mlflow.url), clock=clock)
    for i in range(20):
        mlflow.versions[("m", str(i))] = {"run_id": f"r-{i}"}
        mlflow.runs[f"r-{i}"] = _big_run(f"r-{i}")
    try:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20):
            assert await registry.lookup("m", str(i)) is not None
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        await registry.close()
    assert not any(isinstance(v, Registration) for e in registry._cache.values() for v in e)
    assert held < 2_000_000  # 20 answers of ~0.5 MB each were not kept
    assert registry.cached("m", "3") == (True, True)


async def test_a_big_answer_is_read_off_the_loop_and_a_long_list_only_so_far(
    mlflow: FakeMlflow, clock: Clock, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    threads: list[threading.Thread] = []
    build = _mlflow.registration_from_mlflow

    def recording(*args: Any) -> Registration:
        threads.append(threading.current_thread())
        return build(*args)

    monkeypatch.setattr(_mlflow, "registration_from_mlflow", recording)
    mlflow.versions[("m", "1")] = {}
    mlflow.runs["r-1"] = {**RUN, "data": {"params": [{}] * 100_000}}
    registry = MlflowRegistry(MlflowConfig(url=mlflow.url), clock=clock)
    try:
        with caplog.at_level(logging.WARNING, "predtrace.collector.mlflow"):
            assert await registry.lookup("m", "1") is not None
    finally:
        await registry.close()
    assert threads and threads[0] is not threading.main_thread()
    assert "run.data.params entries past 512 x99488" in caplog.text


async def test_a_lookup_slower_than_the_deadline_fills_the_store_and_marks_nothing_down(
    service: LineageService, store: Store, mlflow: FakeMlflow
) -> None:
    mlflow.versions.update({("m", "1"): {}, ("m", "2"): {}})
    mlflow.delay = 0.2  # two requests: 0.4 s, past the 0.3 s deadline
    with pytest.raises(RegistryError, match="did not answer within the query's"):
        await service.model_lineage("m", "1")
    assert not isinstance(await _raised(service.model_lineage("m", "2")), RegistryBackoffError)
    await _until(lambda: store.model_lineage("m", "1"))
    lineage = await service.model_lineage("m", "1")
    assert lineage is not None and lineage["run"]["id"] == "r-1"  # type: ignore[index]
    assert sum("version=1" in r for r in mlflow.requests) == 1


async def _raised(call: Any) -> BaseException | None:
    try:
        await call
    except RegistryError as exc:
        return exc
    return None


async def test_concurrent_queries_for_one_version_share_one_lookup(
    service: LineageService, mlflow: FakeMlflow
) -> None:
    mlflow.versions[("m", "7")] = {}
    mlflow.delay = 0.05
    answers = await asyncio.gather(*(service.model_lineage("m", "7") for _ in range(4)))
    assert all(a is not None for a in answers)
    paths = [r.split("?")[0] for r in mlflow.requests]
    assert paths == ["/api/2.0/mlflow/model-versions/get", "/api/2.0/mlflow/runs/get"]


async def test_a_metric_no_float_holds_is_left_out_not_a_failure(
    service: LineageService, mlflow: FakeMlflow
) -> None:
    mlflow.versions[("m", "1")] = {}
    metrics = [{"key": "huge", "value": 10**400}, {"key": "auc", "value": 0.9}]
    mlflow.runs["r-1"] = {**RUN, "data": {**RUN["data"], "metrics": metrics}}
    lineage = await service.model_lineage("m", "1")
    assert lineage is not None and lineage["run"]["metrics"] == {"auc": 0.9}  # type: ignore[index]


async def test_an_unexpected_error_reading_an_answer_is_a_failed_lookup_with_backoff(
    service: LineageService, mlflow: FakeMlflow, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    def broken(*args: Any) -> Registration:
        raise ZeroDivisionError

    monkeypatch.setattr(_mlflow, "registration_from_mlflow", broken)
    mlflow.versions[("m", "1")] = {}
    with pytest.raises(RegistryError, match="unexpected ZeroDivisionError"):
        await service.model_lineage("m", "1")
    asked = len(mlflow.requests)
    with pytest.raises(RegistryBackoffError, match="unexpected ZeroDivisionError"):
        await service.model_lineage("m", "1")
    assert len(mlflow.requests) == asked
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)


async def test_dataset_inputs_without_a_digest_are_counted_in_the_warning(
    service: LineageService, mlflow: FakeMlflow, caplog: Any
) -> None:
    mlflow.versions[("m", "1")] = {}
    inputs = [{"dataset": {"name": "train", "digest": ""}}, {"dataset": {"name": "test"}}]
    mlflow.runs["r-1"] = {**RUN, "inputs": {"dataset_inputs": inputs}}
    with caplog.at_level(logging.WARNING, "predtrace.collector.mlflow"):
        lineage = await service.model_lineage("m", "1")
    assert lineage is not None
    assert "dataset without a digest x2" in caplog.text


async def test_a_version_mlflow_has_is_not_asked_again_while_its_answer_is_fresh(
    service: LineageService, mlflow: FakeMlflow
) -> None:
    # Predictions naming an alias from before it moved stay unexplained: each
    # pivot of them fetched the alias's version again, two requests a query.
    mlflow.versions[("m", "2")] = {}
    for _ in range(5):
        found, failures = await service._fetch_versions({("m", "2")}, service._deadline())
        assert (found, failures) == (True, {})
    assert len(mlflow.requests) == 2  # model-versions/get and runs/get, once


async def test_a_lookup_another_query_still_waits_for_is_not_cancelled_at_a_deadline(
    service: LineageService, mlflow: FakeMlflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With no room in the background, a lookup cut at one query's deadline
    # was cancelled under a second query that had joined it: that one failed
    # early, though the answer was coming within its own deadline.
    monkeypatch.setattr(_lookups, "MAX_BACKGROUND", 0)
    service.registry_deadline_s = 1.0  # margins of half a second on a busy machine
    mlflow.versions[("m", "1")] = {}
    mlflow.hang = True  # nothing answered until released
    first = asyncio.ensure_future(service.model_lineage("m", "1"))
    second: asyncio.Future[Any] | None = None
    try:
        await _until(_async(lambda: len(mlflow.requests) == 1))
        await asyncio.sleep(0.5)  # the second joins halfway through the first's wait
        second = asyncio.ensure_future(service.model_lineage("m", "1"))
        with pytest.raises(RegistryError, match="did not answer within the query's"):
            await first
        mlflow.release.set()  # within the second's own deadline
        lineage = await second
    finally:
        for query in (first, second):
            if query is not None:
                query.cancel()
    assert lineage is not None and lineage["run"]["id"] == "r-1"  # type: ignore[index]
    assert sum("version=1" in r for r in mlflow.requests) == 1


def _async(check: Any) -> Any:
    """``check`` as the awaitable factory ``_until`` polls."""

    async def poll() -> bool:
        return bool(check())

    return poll


async def test_a_store_failure_while_storing_an_answer_is_the_stores_not_the_registrys() -> None:
    # The shared lookup stores what it found: a StoreError there was logged
    # as "MLflow lookup raised StoreError" and counted as a registry error.
    async def failing() -> bool:
        raise StoreError("store unavailable")

    task = asyncio.ensure_future(failing())
    await asyncio.gather(task, return_exceptions=True)
    with pytest.raises(StoreError):
        _lookups._outcome(task)
