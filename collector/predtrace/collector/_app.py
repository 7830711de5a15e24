"""The collector as an aiohttp application: ingest, query API, health, metrics.

``build_app`` wires the store, the MLflow adapter, retention and auth; the
application's startup opens the store and starts retention, its cleanup stops
every background task and closes every client and connection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiohttp import web

from predtrace.collector._api import QueryApi
from predtrace.collector._auth import TokenTable
from predtrace.collector._budget import DecodeSlots, InflightBudget
from predtrace.collector._config import CollectorConfig
from predtrace.collector._errors import StoreError
from predtrace.collector._ingest import IngestHandler
from predtrace.collector._metrics import CollectorMetrics
from predtrace.collector._retention import Retainer
from predtrace.collector._security import Authorizer
from predtrace.collector._service import LineageService
from predtrace.collector.lineage import MlflowConfig, MlflowRegistry
from predtrace.collector.store import Store, open_store
from predtrace.wire import DecodeLimits

log = logging.getLogger("predtrace.collector")


@dataclass(slots=True)
class CollectorParts:
    """The live parts of one collector app (tests and the demo reach in here)."""

    config: CollectorConfig
    store: Store
    service: LineageService
    retainer: Retainer
    metrics: CollectorMetrics
    budget: InflightBudget
    decoding: DecodeSlots


PARTS = web.AppKey("predtrace_collector", CollectorParts)


def _limits(config: CollectorConfig) -> DecodeLimits:
    return DecodeLimits(
        max_bytes=config.max_body_bytes,
        max_decompressed_bytes=config.max_decompressed_bytes,
        max_events=config.max_events,
    )


def build_app(config: CollectorConfig, *, store: Store | None = None) -> web.Application:
    """A ready-to-run collector application (the store opens at startup).

    Raises:
        ConfigError: unreadable tokens file, bad --db or MLflow URL.
    """
    tokens = TokenTable.load(config.tokens_file) if config.tokens_file else None
    if tokens is None:
        log.warning("no tokens file: serving loopback clients only, without authentication")
    store = store or open_store(config.db)
    metrics = CollectorMetrics()
    registry = MlflowRegistry(MlflowConfig(url=config.mlflow_url)) if config.mlflow_url else None
    service = LineageService(store, registry, metrics)
    retainer = Retainer(store, config.retention, metrics)
    budget = InflightBudget(config.max_inflight_bytes, metrics.inflight_bytes)
    decoding = DecodeSlots()
    authorizer = Authorizer(tokens)
    parts = CollectorParts(config, store, service, retainer, metrics, budget, decoding)
    app = web.Application(client_max_size=config.max_json_bytes)
    app[PARTS] = parts
    ingest = IngestHandler(
        store,
        limits=_limits(config),
        budget=budget,
        authorizer=authorizer,
        metrics=metrics,
        retry_after_s=config.retry_after_s,
        body_timeout_s=config.body_timeout_s,
        slots=decoding,
    )
    api = QueryApi(
        service,
        retainer,
        authorizer,
        metrics,
        query_limit=config.query_limit,
        retry_after_s=config.retry_after_s,
        answer_budget_bytes=config.max_answer_bytes,
    )
    app.router.add_post("/v1/batches", ingest.handle)
    app.add_routes(api.routes())
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.on_startup.append(_startup)
    app.on_cleanup.append(_cleanup)
    return app


async def _startup(app: web.Application) -> None:
    parts = app[PARTS]
    await parts.store.open()
    parts.retainer.start()


async def _cleanup(app: web.Application) -> None:
    parts = app[PARTS]
    await parts.retainer.stop()
    await parts.service.close()
    await parts.store.close()


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _readyz(request: web.Request) -> web.Response:
    try:
        await request.app[PARTS].store.ping()
    except StoreError:
        return web.Response(status=503, text="store unavailable")
    return web.Response(text="ready")


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[PARTS].metrics.render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")
