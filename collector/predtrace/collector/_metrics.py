"""The collector's Prometheus metrics (``/metrics``), on a registry of its own.

Every refusal is counted by reason, so an operator sees what producers are
being told (413, 400, 503) without reading logs. Every label has a fixed set
of values: text a client sends (a registration's ``source``) is kept in the
store, never in a label, so ``/metrics`` stays the same size however much is
registered.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

REGISTRATION_KINDS: Final = ("api", "openlineage", "mlflow")
"""How lineage arrived: ``POST /v1/lineage``, ``POST /v1/openlineage``, an MLflow lookup."""

REGISTRY_RESULTS: Final = ("found", "missing", "error", "timeout", "skipped")
"""Outcomes of an MLflow lookup: ``skipped`` = not asked, a recent failure is remembered."""


class CollectorMetrics:
    """Counters and histograms of one collector instance."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.batches = Counter(
            "predtrace_collector_batches", "Batches received, by outcome", ["outcome"], registry=r
        )
        self.events = Counter(
            "predtrace_collector_events", "Events received, by outcome", ["outcome"], registry=r
        )
        self.ingest_bytes = Counter(
            "predtrace_collector_ingest_bytes", "Request body bytes of accepted batches", registry=r
        )
        self.inflight_bytes = Gauge(
            "predtrace_collector_inflight_bytes",
            "Bytes held by ingests now: bodies, inflated payloads and their decoding",
            registry=r,
        )
        self.answer_bytes = Gauge(
            "predtrace_collector_answer_bytes",
            "Bytes of query answers being built or sent now (a budget apart from ingest's)",
            registry=r,
        )
        self.chain = Counter(
            "predtrace_collector_chain",
            "Hash-chain status of stored batches",
            ["status"],
            registry=r,
        )
        self.store_seconds = Histogram(
            "predtrace_collector_store_seconds",
            "Store commit latency of one batch",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.query_seconds = Histogram(
            "predtrace_collector_query_seconds",
            "Query API latency",
            ["query"],
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
        )
        self.registrations = Counter(
            "predtrace_collector_lineage_registrations",
            "Lineage registrations by how they arrived (api, openlineage, mlflow)",
            ["source"],
            registry=r,
        )
        self.registry_lookups = Counter(
            "predtrace_collector_registry_lookups",
            "MLflow lookups of model versions and aliases by result"
            " (found, missing, error, timeout, skipped)",
            ["result"],
            registry=r,
        )
        self.lineage_conflicts = Counter(
            "predtrace_collector_lineage_conflicts",
            "Registrations that contradicted stored lineage and left it as stored,"
            " by how they arrived (api, openlineage, mlflow)",
            ["source"],
            registry=r,
        )
        for kind in REGISTRATION_KINDS:
            self.registrations.labels(kind)
            self.lineage_conflicts.labels(kind)
        for result in REGISTRY_RESULTS:
            self.registry_lookups.labels(result)
        self.retention_removed = Counter(
            "predtrace_collector_retention_removed",
            "Rows removed by retention",
            ["kind"],
            registry=r,
        )

        self.connections_refused = Counter(
            "predtrace_collector_connections_refused",
            "Connections closed as soon as accepted: as many as max_connections were open",
            registry=r,
        )

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
