"""The middleware's runtime: the pipeline and everything derived once from the config.

Sits between the config and the request path: it builds the exporter named
by the config (collector over HTTP, sidecar over gRPC, or the given object)
behind a bounded ``QueuedExporter``, keeps the per-process constants the
request path reads (routes, tracer, static model, deployment), counts what
goes wrong, and owns start and shutdown. Shutdown flushes the pipeline and
the app's own SDK TracerProvider: under uvicorn a SIGTERM re-raises the signal
after the lifespan shutdown, so atexit hooks never run and anything not
flushed there is lost.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
import weakref
import zlib
from collections import Counter
from typing import Final

from opentelemetry import propagate, trace

from predtrace.middleware._config import MiddlewareConfig
from predtrace.middleware._inputs import new_hmac
from predtrace.middleware._registry import ResolverCache
from predtrace.middleware._routes import RouteMatch, RouteTable
from predtrace.middleware._sidecar_exporter import SidecarGrpcExporter
from predtrace.middleware._spans import (
    ATTR_DEPLOYMENT_ID,
    ATTR_MODEL_ALIAS,
    ATTR_MODEL_DIGEST,
    ATTR_MODEL_ID,
    ATTR_MODEL_NAME,
    ATTR_MODEL_VERSION,
    ATTR_TRAINING_RUN_ID,
)
from predtrace.sidecar.pipeline import (
    CollectorHttpExporter,
    Exporter,
    QueuedExporter,
    RateLimitedLog,
)
from predtrace.wire import DeploymentRef, ModelRef, PredictionEvent

_logger = logging.getLogger("predtrace.middleware")
_RUNTIMES: weakref.WeakSet[PredictionRuntime] = weakref.WeakSet()
TRACER_NAME: Final = "predtrace.middleware"
_CACHE_SIZE: Final = 256
# How long a lifespan shutdown waits for predictions in flight to emit their event.
_INFLIGHT_GRACE_S: Final = 1.0
# The producer id is the service name and a random suffix, within the collector's
# 256 characters: a longer service name (any up to 64 KiB is a valid one) would
# have every batch refused, so only its start names the producer.
_MAX_PRODUCER_PREFIX: Final = 200


def build_exporter(config: MiddlewareConfig) -> Exporter:
    """The exporter the config names (exactly one is set; the config checked that)."""
    if config.exporter is not None:
        return config.exporter
    if config.sidecar_target is not None:
        return SidecarGrpcExporter(
            config.sidecar_target,
            timeout=config.sidecar_timeout,
            tls_ca=config.sidecar_tls_ca,
            tls_cert=config.sidecar_tls_cert,
            tls_key=config.sidecar_tls_key,
        )
    return CollectorHttpExporter(
        config.collector_client_config(),
        producer_prefix=(config.service or "predtrace")[:_MAX_PRODUCER_PREFIX],
    )


class PredictionRuntime:
    """Pipeline, constants and counters shared by every request of one app.

    ``instrument_app`` returns it: ``stats()`` for the counters,
    ``force_flush()`` and ``shutdown()`` for tests and custom servers.
    """

    def __init__(self, config: MiddlewareConfig) -> None:
        self.config = config
        self.routes = RouteTable(config.route_patterns())
        self.pipeline: QueuedExporter | None = (
            QueuedExporter(build_exporter(config), config.queue) if config.enabled else None
        )
        provider = config.tracer_provider or trace.get_tracer_provider()
        self.tracer = provider.get_tracer(TRACER_NAME)
        self.deployment = DeploymentRef(
            id=config.deployment_id,
            service=config.service,
            namespace=config.namespace,
            pod=config.pod,
            node=config.node,
            image_digest=config.image_digest,
            image_name=config.image_name,
        )
        self.key = new_hmac(config.fingerprint_key.encode()) if config.fingerprint_key else None
        self.wants_body = bool(self.key is not None or config.feature_allowlist)
        self.resolver = ResolverCache(config.resolver) if config.resolver else None
        self.id_header = config.id_header.encode("ascii")
        self.sample_all = config.sample_rate >= 1.0
        self.sample_threshold = int(config.sample_rate * 2**32)
        self.counts: Counter[str] = Counter()
        self.log = RateLimitedLog(_logger)
        self.static_attributes = _static_attributes(config)
        self.propagation_fields = _propagation_fields()
        self._span_starts: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}
        self._model_refs: dict[tuple[str, str], ModelRef] = {}
        self._started = False
        self._stopped = False
        # Predictions between their start and their event (event-loop only).
        self.inflight = 0
        self._warned_unstarted = False
        _RUNTIMES.add(self)

    # -- request path helpers --------------------------------------------------

    def emit(self, event: PredictionEvent) -> None:
        """Queue one event (O(1), never raises)."""
        if self.pipeline is not None:
            self.pipeline.emit(event)

    def samples(self, prediction_id: str) -> bool:
        """Whether a prediction's output and features are captured: decided by its id alone."""
        return self.sample_all or (
            self.sample_threshold > 0 and zlib.crc32(prediction_id.encode()) < self.sample_threshold
        )

    def start_model(self, match: RouteMatch) -> tuple[str, str]:
        """(name, version) known when the request starts: the route's, else the config's."""
        return (
            match.name or self.config.model_name,
            match.version or self.config.model_version,
        )

    def span_start(self, model: tuple[str, str]) -> tuple[str, dict[str, str]]:
        """Span name and a fresh copy of the start attributes for a model.

        Deliberately few attributes: each one costs the app's span exporter
        a few microseconds per span (the protocol is in the event instead).
        """
        cached = self._span_starts.get(model)
        if cached is None:
            name, version = model
            attributes = dict(self.static_attributes)
            if name:
                attributes[ATTR_MODEL_NAME] = name
            if version:
                attributes[ATTR_MODEL_VERSION] = version
            cached = (f"predict {name}" if name else "predict", attributes)
            if len(self._span_starts) < _CACHE_SIZE:  # bounded: paths carry model names
                self._span_starts[model] = cached
        return cached[0], dict(cached[1])

    def model_ref(self, name: str, version: str) -> ModelRef:
        """The ModelRef of a model with the static alias/id/digest (shared, read-only)."""
        ref = self._model_refs.get((name, version))
        if ref is None:
            config = self.config
            ref = ModelRef(
                name=name,
                version=version,
                alias=config.model_alias,
                registry_model_id=config.model_id,
                artifact_digest=config.model_digest,
            )
            if len(self._model_refs) < _CACHE_SIZE:
                self._model_refs[(name, version)] = ref
        return ref

    def final_model(
        self,
        start: tuple[str, str],
        override: dict[str, str] | None,
        served: tuple[str, str],
        *,
        succeeded: bool = True,
    ) -> tuple[ModelRef, str]:
        """The model a prediction used, and its training run id ("" when unknown).

        The served name and version (from the answer) win over the ones known
        at the start; what the handler set (``override``) wins over both and
        over the configured alias, id and digest; the resolver fills the rest.
        A model is sent to the registry only when the prediction ``succeeded``
        or its name came from the answer or the handler: a name from the path
        of a failed request (a model that does not exist, any client may send
        one) only reads what the cache already knows.
        """
        served_name, served_version = served
        name, version = served_name or start[0], served_version or start[1]
        if override is None and self.resolver is None:
            return self.model_ref(name, version), ""
        config = self.config
        override = override or {}
        model = ModelRef(
            name=override.get("name") or name,
            version=override.get("version") or version,
            alias=override.get("alias") or config.model_alias,
            registry_model_id=override.get("registry_model_id") or config.model_id,
            artifact_digest=override.get("artifact_digest") or config.model_digest,
        )
        run_id = ""
        if self.resolver is not None and model.name:
            resolved = (
                self.resolver.lookup(model.name, model.version)
                if succeeded or served_name or override.get("name")
                else self.resolver.peek(model.name, model.version)
            )
            if resolved is not None:
                run_id = resolved.run_id
                model.registry_model_id = model.registry_model_id or resolved.registry_model_id
                model.artifact_digest = model.artifact_digest or resolved.artifact_digest
        return model, run_id

    def late_attributes(
        self, start: tuple[str, str], model: ModelRef, run_id: str
    ) -> dict[str, str | int]:
        """Span attributes learnt after the span started (usually none)."""
        config = self.config
        attributes: dict[str, str | int] = {}
        if (model.name, model.version) != start:
            attributes[ATTR_MODEL_NAME] = model.name
            attributes[ATTR_MODEL_VERSION] = model.version
        if model.alias != config.model_alias:
            attributes[ATTR_MODEL_ALIAS] = model.alias
        if model.registry_model_id != config.model_id:
            attributes[ATTR_MODEL_ID] = model.registry_model_id
        if model.artifact_digest != config.model_digest:
            attributes[ATTR_MODEL_DIGEST] = model.artifact_digest
        if run_id:
            attributes[ATTR_TRAINING_RUN_ID] = run_id
        return attributes

    def failed(self, stage: str, exc: BaseException) -> None:
        """Count an internal error of ``stage``; log it rate-limited (type only, no data)."""
        self.counts[f"error.{stage}"] += 1
        self.log.warning(stage, "predtrace middleware error in %s: %s", stage, type(exc).__name__)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the pipeline and resolve the static model. Idempotent; blocking.

        After ``shutdown`` it starts afresh (the same app served again: a
        second lifespan, a second ``TestClient``), with a new pipeline whose
        counts go on from the last one's.
        """
        if self._started and not self._stopped:
            return
        if self._stopped:
            self._reopen()
        self._started, self._stopped = True, False
        self.propagation_fields = _propagation_fields()
        if self.pipeline is not None:
            self.pipeline.start()
        if self.resolver is not None and self.config.model_name:
            self.resolver.prime(self.config.model_name, self.config.model_version)

    def _reopen(self) -> None:
        # New objects rather than reopened ones: the old worker may still own
        # the old exporter (an export that outlived the shutdown deadline). A
        # user's exporter object is the same one, already shut down once.
        config = self.config
        old = self.pipeline
        if old is not None:
            exporter = build_exporter(config)
            self.pipeline = QueuedExporter(exporter, config.queue, counters=old.counters)
        if self.resolver is not None:
            self.resolver = self.resolver.reopened()

    async def astart(self) -> None:
        """``start`` off the event loop (a registry lookup may block)."""
        await asyncio.to_thread(self.start)

    def force_flush(self, timeout: float | None = None) -> bool:
        """Export every queued event now; return whether it finished in time."""
        if self.pipeline is None:
            return True
        return self.pipeline.force_flush(timeout or self.config.shutdown_timeout)

    def shutdown(self, timeout: float | None = None) -> None:
        """Flush the pipeline, then the app's SDK TracerProvider, within ``timeout``.

        Safe twice. Events still queued at the deadline are counted as
        dropped (reason ``shutdown``) and logged. Blocking: from a coroutine
        use ``ashutdown``.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._shutdown(timeout)
            return
        # Called from inside an event loop: exporters run their own loop to
        # close their sessions, which cannot happen in this thread.
        worker = threading.Thread(target=self._shutdown, args=(timeout,), name="predtrace-stop")
        worker.start()
        worker.join()

    def _shutdown(self, timeout: float | None) -> None:
        if self._stopped:
            return
        self._stopped = True
        deadline = time.monotonic() + (timeout or self.config.shutdown_timeout)
        if self.pipeline is not None:
            self.pipeline.shutdown(max(0.1, deadline - time.monotonic()))
            self._log_summary()
        if self.config.flush_tracer_provider:
            self._flush_tracer_provider(max(0.1, deadline - time.monotonic()))
        if self.resolver is not None:
            self.resolver.close()

    async def ashutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - a flush deadline, not a cancel scope
        """``shutdown`` for the lifespan: runs in a thread, never blocks the loop.

        First it lets the predictions still in flight emit their events (up
        to 1 s, within ``timeout``): a server that cancels the requests it
        could not finish (``uvicorn --timeout-graceful-shutdown``) starts the
        lifespan shutdown before they have run their last step.
        """
        total = timeout or self.config.shutdown_timeout
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + min(_INFLIGHT_GRACE_S, total / 2)
        # Polled, and only here: an Event to set would cost every request its end.
        while self.inflight > 0 and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        await asyncio.to_thread(self._shutdown, max(0.1, total - (loop.time() - start)))

    @property
    def started(self) -> bool:
        """Whether ``start`` ran (the lifespan startup, or a direct call)."""
        return self._started

    def note_unstarted(self) -> None:
        """A prediction came before any lifespan startup: say once what that costs."""
        if self._warned_unstarted:
            return
        self._warned_unstarted = True
        _logger.warning(
            "predtrace: a prediction was served before the app's lifespan started: the "
            "server runs without lifespan (uvicorn --lifespan off), or the instrumented "
            "app is mounted inside another app (Starlette runs no lifespan of a mounted "
            "app). Events still queued when the server stops on SIGTERM will be lost: "
            "instrument the outermost app, with lifespan on."
        )

    def _flush_tracer_provider(self, timeout: float) -> None:
        provider = self.config.tracer_provider or trace.get_tracer_provider()
        flush = getattr(provider, "force_flush", None)
        if not callable(flush):
            return  # the API's proxy or no-op provider: nothing buffered
        try:
            flush(int(timeout * 1000))
        except Exception as exc:  # noqa: BLE001 - shutdown must finish
            self.failed("tracer_flush", exc)

    def _log_summary(self) -> None:
        assert self.pipeline is not None  # noqa: S101 - checked by the caller
        snap = self.pipeline.counters.snapshot()
        level = logging.WARNING if snap["dropped"] else logging.INFO
        _logger.log(
            level,
            "predtrace shutdown: %d events exported, %d dropped %s",
            snap["exported"],
            snap["dropped"],
            {k: v for k, v in snap.items() if k.startswith("dropped.")},
        )

    def stats(self) -> dict[str, int]:
        """Pipeline counters (``enqueued``, ``exported``, ``dropped.<reason>``) and
        middleware counters (``error.<stage>``, ``body_too_large``, ...)."""
        flat = self.pipeline.counters.snapshot() if self.pipeline is not None else {}
        flat.update(self.counts)
        if self.resolver is not None:
            flat["resolver.failures"] = self.resolver.failures
            flat["resolver.overflow"] = self.resolver.overflow
        return flat


def _static_attributes(config: MiddlewareConfig) -> dict[str, str]:
    pairs = {
        ATTR_MODEL_ALIAS: config.model_alias,
        ATTR_MODEL_ID: config.model_id,
        ATTR_MODEL_DIGEST: config.model_digest,
        ATTR_DEPLOYMENT_ID: config.deployment_id,
    }
    return {k: v for k, v in pairs.items() if v}


def _propagation_fields() -> frozenset[bytes]:
    """Header names the global propagator reads (ASGI header names are lower-case)."""
    fields = propagate.get_global_textmap().fields
    return frozenset(f.lower().encode("latin-1") for f in fields)


@atexit.register
def _shutdown_at_exit() -> None:
    # A normal interpreter exit (not a re-raised SIGTERM: the lifespan covers that).
    for runtime in list(_RUNTIMES):
        runtime.shutdown()
