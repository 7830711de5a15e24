"""Registry stamping: resolved once per model, off the request path, failures retried."""

from __future__ import annotations

import threading
import time

from predtrace.middleware import MiddlewareConfig, ResolvedModel, StaticResolver
from predtrace.middleware._registry import ResolverCache
from predtrace.middleware.testing import call_asgi
from predtrace.sidecar.testing import InMemoryExporter

from .conftest import Instrument, fastapi_app


class GatedResolver:
    """Blocks each lookup until released; counts calls; can fail."""

    def __init__(self, result: ResolvedModel | None, fail: bool = False) -> None:
        self.result = result
        self.fail = fail
        self.calls: list[tuple[str, str]] = []
        self.release = threading.Event()
        self.done = threading.Event()

    def resolve(self, name: str, version: str) -> ResolvedModel | None:
        self.calls.append((name, version))
        self.release.wait(5)
        self.done.set()
        if self.fail:
            raise ConnectionError("registry down")
        return self.result


def _wait_until(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        time.sleep(0.001)


def test_lookup_never_waits_for_the_registry_and_resolves_each_model_once() -> None:
    resolver = GatedResolver(ResolvedModel(run_id="run-1"))
    cache = ResolverCache(resolver)
    try:
        assert cache.lookup("m", "1") is None  # the registry is blocked: no waiting
        assert cache.lookup("m", "1") is None
        resolver.release.set()
        _wait_until(lambda: cache.lookup("m", "1") is not None)
        assert cache.lookup("m", "1") == ResolvedModel(run_id="run-1")
        assert resolver.calls == [("m", "1")]
    finally:
        cache.close()


def test_failure_is_counted_and_retried_after_the_interval() -> None:
    resolver = GatedResolver(None, fail=True)
    resolver.release.set()
    cache = ResolverCache(resolver, retry_interval=0.0)
    try:
        cache.lookup("m", "1")
        _wait_until(lambda: cache.failures >= 1)
        resolver.fail, resolver.result = False, ResolvedModel(run_id="r")
        _wait_until(lambda: cache.lookup("m", "1") is not None)
        assert len(resolver.calls) >= 2
    finally:
        cache.close()


def test_cache_is_bounded_and_counts_overflow() -> None:
    resolver = GatedResolver(None)
    resolver.release.set()
    cache = ResolverCache(resolver, max_models=3)
    try:
        for i in range(10):
            cache.lookup(f"m{i}", "1")
        assert cache.overflow == 7
    finally:
        cache.close()


async def test_run_id_is_stamped_on_span_and_digest_on_event(
    instrument: Instrument, tracing: object, events: InMemoryExporter
) -> None:
    resolver = StaticResolver(
        {("iris", "7"): ResolvedModel(run_id="run-9", artifact_digest="sha256:aa")}
    )
    app = fastapi_app()
    runtime = instrument(app, resolver=resolver, model_version="7")
    runtime.start()  # primes nothing: no static model name; the first request queues it
    headers = [("content-type", "application/json")]
    await call_asgi(app, "POST", "/v2/models/iris/infer", b'{"inputs": []}', headers)
    assert runtime.resolver is not None
    _wait_until(lambda: runtime.resolver.lookup("iris", "7") is not None)  # type: ignore[union-attr]
    await call_asgi(app, "POST", "/v2/models/iris/infer", b'{"inputs": []}', headers)
    runtime.force_flush(5)
    first, second = events.events
    assert first.model.artifact_digest == "" and second.model.artifact_digest == "sha256:aa"
    spans = tracing[1].get_finished_spans()  # type: ignore[index]
    assert "predtrace.training.run_id" not in spans[0].attributes
    assert spans[1].attributes["predtrace.training.run_id"] == "run-9"


def test_static_model_is_resolved_at_startup() -> None:
    resolver = StaticResolver({("churn", "3"): ResolvedModel(run_id="r-3")})
    from predtrace.middleware import PredictionRuntime  # noqa: PLC0415

    runtime = PredictionRuntime(
        MiddlewareConfig(
            exporter=InMemoryExporter(), resolver=resolver, model_name="churn", model_version="3"
        )
    )
    try:
        runtime.start()
        assert runtime.resolver is not None
        assert runtime.resolver.lookup("churn", "3") == ResolvedModel(run_id="r-3")
    finally:
        runtime.shutdown(1)


def test_static_resolver_returns_none_for_unknown_models() -> None:
    assert StaticResolver({}).resolve("a", "1") is None


def test_a_closed_cache_reopened_resolves_new_models_and_keeps_what_it_knew() -> None:
    # An app started again after its shutdown (a second lifespan) goes on resolving.
    resolver = GatedResolver(ResolvedModel(run_id="run-1"))
    resolver.release.set()
    cache = ResolverCache(resolver)
    cache.prime("m", "1")
    cache.close()
    assert cache.lookup("n", "1") is None  # closed: never asked
    reopened = cache.reopened()
    try:
        assert reopened.lookup("m", "1") == ResolvedModel(run_id="run-1")  # not asked again
        _wait_until(lambda: reopened.lookup("n", "1") is not None)
        assert resolver.calls == [("m", "1"), ("n", "1")]
    finally:
        reopened.close()
