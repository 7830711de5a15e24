"""Prometheus metrics of the sidecar, read from the live status at scrape time.

One ``CollectorRegistry`` per sidecar (never the process-global default), so
several sidecars can run in one test process. Served on its own listener at
``/metrics``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Final, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from predtrace.cli._serving import IDLE_TIMEOUT_S, MAX_FIELD_SIZE, MAX_HEADERS, listen_error
from predtrace.sidecar._config import join_hostport, parse_hostport
from predtrace.sidecar._otlp_export import SPAN_DROP_REASONS
from predtrace.sidecar._processors import redaction_counts

if TYPE_CHECKING:
    from predtrace.sidecar._app import SidecarApp

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

EVENT_DROP_REASONS: Final = (
    "byte_cap",  # the spool's byte cap: its oldest undelivered events (spool writer)
    "corrupt",  # damaged spool records skipped (spool reader, recovery)
    "torn",  # a record torn by a crash mid-write (spool recovery)
    "missing_segment",  # a spool segment file gone (spool recovery)
    "rejected",  # events the collector refused in its acknowledgement (shipper)
    "quarantined",  # events of a batch moved to quarantine (shipper)
    "invalid",  # events the intake refused (event_problem, unreadable)
    "processor",  # a processor raised on the event (intake)
    "oip_buffer",  # the OIP proxy's recording buffer was full or closed
)
"""Every reason ``predtrace_sidecar_dropped_events_total`` counts: each shown from 0."""


class SidecarMetrics(Collector):
    """Turns one status snapshot into metric families on each scrape."""

    def __init__(self, app: SidecarApp) -> None:
        self._app = app

    def collect(self) -> Iterator[Metric]:
        """Yield every sidecar metric (``predtrace_sidecar_*``)."""
        view = self._app.status_view()
        spool = view.spool
        yield _gauge("queue_depth", "Events spooled and not yet delivered", spool.records)
        yield _gauge("spool_bytes", "Bytes of spool segments on disk", spool.bytes)
        yield _gauge("spool_byte_cap", "The spool's byte cap", spool.byte_cap)
        yield _gauge(
            "writer_pending_bytes", "Bytes waiting for the spool writer", spool.pending_bytes
        )
        yield _gauge(
            "stream_held_bytes",
            "Message bytes of open Record streams' chunks not yet handed to the spool (8 MiB "
            "at most)",
            view.stream_held_bytes,
        )
        age = 0.0
        if view.oldest_unsent_ns:
            age = max(0.0, (self._app.now_ns() - view.oldest_unsent_ns) / 1e9)
        yield _gauge("oldest_unsent_age_seconds", "Age of the oldest undelivered event", age)
        shipper = view.shipper
        yield _counter("received_events", "Events received by the intake", view.intake.received)
        yield _counter(
            "duplicate_batches",
            "RecordBatch retries of a batch already spooled (same batch_id): answered with "
            "the first call's ack, not spooled again",
            view.intake.duplicate_batches,
        )
        yield _counter("exported_events", "Events the collector accepted", shipper.exported)
        yield _counter("exported_batches", "Batches the collector acknowledged", shipper.batches)
        yield _counter(
            "retried_batches", "Delivery attempts that failed and were retried", shipper.retried
        )
        yield _counter("quarantined_batches", "Batches moved to quarantine", shipper.quarantined)
        yield _gauge(
            "quarantine_bytes", "Bytes of quarantined batches kept", shipper.quarantine_bytes
        )
        yield _gauge(
            "quarantine_byte_cap", "The quarantine's byte cap", shipper.quarantine_byte_cap
        )
        yield _counter(
            "quarantine_evicted_batches",
            "Quarantined batches removed, oldest first, to stay under the quarantine's cap",
            shipper.quarantine_evicted,
        )
        yield _counter(
            "split_batches",
            "Batches the collector or a proxy refused as too large (413), sent again in parts",
            shipper.split,
        )
        yield _counter(
            "producer_renumbered",
            "Switches to a derived producer id after the collector refused a reused seq (409)",
            shipper.renumbered,
        )
        yield _gauge(
            "batch_max_events",
            "Events per batch in force (lowered by a 413)",
            shipper.max_batch_events,
        )
        yield _gauge(
            "batch_max_bytes",
            "Event bytes per batch in force (lowered by a 413)",
            shipper.max_batch_bytes,
        )
        yield from _spool_counters(view.spool_counters)
        yield _by_label(
            "dropped_events",
            f"Events dropped, by reason ({', '.join(EVENT_DROP_REASONS)})",
            "reason",
            _from_zero(EVENT_DROP_REASONS, view.dropped()),
        )
        yield _by_label(
            "redacted",
            "Features and attributes removed by the sidecar's allow-lists (--allow-feature, "
            "--allow-attribute), a gate after the middleware's, by what",
            "what",
            redaction_counts(self._app.processors),
        )
        yield _by_label(
            "refused_requests",
            "Requests refused whole, by reason (malformed, too_many_events, bad_packed_events, "
            "bad_batch_id): none of a batch's events is spooled; a Record stream over the "
            "event limit has spooled its earlier chunks (its trailing metadata says how many)",
            "reason",
            view.intake.refused_requests,
        )
        if self._app.config.oip_proxies:
            yield _counter(
                "oip_invalid_caller_ids",
                "OIP calls whose caller id could not be a prediction id (recorded under a new one)",
                view.oip_invalid_caller_ids,
            )
            yield _counter(
                "oip_unreadable_requests",
                "ModelInfer requests the proxy could not read (passed on untouched)",
                view.oip_unreadable_requests,
            )
            yield _counter(
                "oip_ids_not_added",
                "ModelInfer requests left without the id the proxy assigns: no room under "
                "the message limit (recorded under that id all the same)",
                view.oip_ids_not_added,
            )
            yield _counter(
                "oip_budget_waits",
                "Calls that waited for room under the OIP proxy's in-flight byte budgets "
                "(16 --max-message-bytes of ModelInfer requests held for the model server, "
                "4 of other methods' requests)",
                view.oip_budget_waits,
            )
            yield _counter(
                "oip_slow_refusals",
                "OIP proxy calls refused (UNAVAILABLE, retryable): their request had not arrived "
                "0.25 s after the proxy had room for it, while as many others as their budget "
                "has messages were arriving slowly (16 for ModelInfer, 4 for the other methods); "
                "or a streaming call while 32 were passing through",
                view.oip_slow_refusals,
            )
            yield _gauge(
                "oip_inflight_bytes",
                "Bytes of requests the OIP proxy holds for the model server now",
                view.oip_inflight_bytes,
            )
        if view.otlp_busy_refusals is not None:
            yield _by_label(
                "otlp_busy_refusals",
                "OTLP exports refused, retryable (gRPC UNAVAILABLE, HTTP 503), because the "
                "receiver's in-flight byte budget was spent, by transport",
                "transport",
                view.otlp_busy_refusals,
            )
        if view.otlp_connections_refused is not None:
            yield _counter(
                "otlp_connections_refused",
                "OTLP/HTTP connections closed as soon as accepted: 1,024 were open",
                view.otlp_connections_refused,
            )
        if view.otlp_duplicate_exports is not None:
            yield _counter(
                "otlp_duplicate_exports",
                "OTLP exports with the bytes of one already taken (a sender's retry after its "
                "deadline): answered with that export's answer, its predictions not spooled again",
                view.otlp_duplicate_exports,
            )
        if view.otlp_forward is not None:
            forward = view.otlp_forward
            yield _counter(
                "otlp_forwarded_spans", "Spans forwarded to the OTLP backend", forward.forwarded
            )
            yield _by_label(
                "otlp_dropped_spans",
                "Spans the OTLP forwarder dropped, by reason "
                f"({', '.join(SPAN_DROP_REASONS)}; best effort: the predictions in them "
                "were spooled before forwarding)",
                "reason",
                _from_zero(SPAN_DROP_REASONS, forward.dropped),
            )


def _from_zero(reasons: Iterable[str], counts: Mapping[str, int]) -> dict[str, int]:
    """``counts`` with every known reason present (0 until it happens): rate() sees the first."""
    return {**dict.fromkeys(reasons, 0), **counts}


def _spool_counters(counts: dict[str, int]) -> Iterator[Metric]:
    """Writes the spool refused, and damage it found (a full disk shows here)."""
    yield _by_label(
        "spool_refused_writes",
        "Spool writes refused, never acknowledged (disk_full and io_error: per failed "
        "group commit; busy: per append while the writer is behind; cap: per append the "
        "byte cap has no room for)",
        "reason",
        {
            reason: counts.get(key, 0)
            for reason, key in (
                ("disk_full", "disk_full"),
                ("io_error", "write_errors"),
                ("busy", "busy"),
                ("cap", "cap_refused"),
            )
        },
    )
    yield _counter(
        "spool_corrupt_regions",
        "Damaged regions found in spool segments",
        counts.get("corrupt_regions", 0),
    )
    yield _counter(
        "spool_index_rebuilds",
        "Spool indexes rebuilt from segments",
        counts.get("index_rebuilds", 0),
    )
    yield _counter(
        "spool_state_slots_bad",
        "Spool state slots found unreadable",
        counts.get("state_slots_bad", 0),
    )


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"predtrace_sidecar_{name}", doc, value=value)


_K = TypeVar("_K", bound=str)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"predtrace_sidecar_{name}", doc, value=value)


def _by_label(name: str, doc: str, label: str, counts: Mapping[_K, int]) -> CounterMetricFamily:
    """A counter family with one sample per ``label`` value, sorted by it."""
    family = CounterMetricFamily(f"predtrace_sidecar_{name}", doc, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([value], count)
    return family


class MetricsServer:
    """``GET /metrics`` on its own aiohttp listener."""

    def __init__(self, app: SidecarApp) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SidecarMetrics(app))
        self._runner: web.AppRunner | None = None

    async def start(self, listen: str) -> str:
        """Listen; return the bound ``host:port``."""
        web_app = web.Application()
        web_app.router.add_get("/metrics", self._scrape)
        self._runner = web.AppRunner(
            web_app,
            access_log=None,
            shutdown_timeout=1.0,
            keepalive_timeout=IDLE_TIMEOUT_S,
            max_headers=MAX_HEADERS,
            max_field_size=MAX_FIELD_SIZE,
        )
        await self._runner.setup()
        host, port = parse_hostport(listen, "--metrics-listen")
        try:
            await web.TCPSite(self._runner, host, port).start()
        except OSError as exc:
            raise listen_error(listen, "--metrics-listen", exc) from None
        return join_hostport(host, self._runner.addresses[0][1])

    async def _scrape(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def stop(self) -> None:
        """Stop listening. Safe twice."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
