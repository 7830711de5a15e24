"""Environment variables the sidecar reads (flags of ``predtrace sidecar serve`` win).

Each constant is the name of one variable; ``SidecarConfig.from_env`` reads them.
"""

from __future__ import annotations

from typing import Final

COLLECTOR_URL: Final = "PREDTRACE_COLLECTOR_URL"
"""Collector base URL, e.g. ``https://collector:8443``."""
TOKEN: Final = "PREDTRACE_TOKEN"  # noqa: S105 - the variable's name, not a secret
"""Bearer token for the collector (never logged; refused over plaintext to a remote host)."""
SPOOL_DIR: Final = "PREDTRACE_SPOOL_DIR"
"""The durable spool directory."""
SPOOL_MAX_BYTES: Final = "PREDTRACE_SPOOL_MAX_BYTES"
"""The spool's byte cap (``2GiB``); past it the oldest events are dropped and counted."""
LISTEN: Final = "PREDTRACE_SIDECAR_LISTEN"
"""HOST:PORT of the sidecar gRPC API."""
PRODUCER_ID: Final = "PREDTRACE_PRODUCER_ID"
"""Producer id of this sidecar; by default one is made once and kept in the spool directory."""
EDGE: Final = "PREDTRACE_EDGE"
"""Edge mode (long outages, bigger batches, backoff capped at 5 minutes): ``1``, ``true``,
``yes`` or ``on``; ``0``, ``false``, ``no``, ``off`` or unset: not. Anything else fails startup."""
OTLP_LISTEN: Final = "PREDTRACE_OTLP_LISTEN"
"""HOST:PORT of the OTLP/gRPC receiver."""
OTLP_EXPORT: Final = "PREDTRACE_OTLP_EXPORT"
"""URL of the OTLP/HTTP receiver every span is forwarded to (needs ``PREDTRACE_OTLP_LISTEN``)."""
METRICS_LISTEN: Final = "PREDTRACE_METRICS_LISTEN"
"""HOST:PORT of the Prometheus ``/metrics`` listener."""
TLS_CERT: Final = "PREDTRACE_SIDECAR_TLS_CERT"
"""PEM certificate chain: TLS on the gRPC, OTLP and OIP proxy listeners (not metrics)."""
TLS_KEY: Final = "PREDTRACE_SIDECAR_TLS_KEY"
"""PEM private key of the TLS certificate."""
TLS_CLIENT_CA: Final = "PREDTRACE_SIDECAR_TLS_CLIENT_CA"
"""PEM CA that signs client certificates (mTLS on the gRPC API)."""
COLLECTOR_CA: Final = "PREDTRACE_COLLECTOR_CA"
"""PEM CA to trust for an https collector (else the system's)."""
ALLOW_FEATURES: Final = "PREDTRACE_ALLOW_FEATURES"
"""Comma-separated globs of feature names that may leave (empty: none).

A second gate after the middleware's ``PREDTRACE_FEATURES``: a feature the
middleware sends is removed here unless allowed too (counted in
``predtrace_sidecar_redacted_total``).
"""
ALLOW_ATTRIBUTES: Final = "PREDTRACE_ALLOW_ATTRIBUTES"
"""Comma-separated globs of attribute keys that may leave (empty: none)."""
REDACT: Final = "PREDTRACE_REDACT"
"""Newline-separated regular expressions redacted from kept attribute values."""
DEPLOYMENT_ID: Final = "PREDTRACE_DEPLOYMENT_ID"
"""Deployment id stamped on events."""
SERVICE_NAME: Final = "PREDTRACE_SERVICE_NAME"
"""Service name (else ``OTEL_SERVICE_NAME``)."""
IMAGE_DIGEST: Final = "PREDTRACE_IMAGE_DIGEST"
"""Container image digest, ``sha256:...``."""
IMAGE_NAME: Final = "PREDTRACE_IMAGE_NAME"
"""Container image name."""
K8S_NAMESPACE: Final = ("PREDTRACE_K8S_NAMESPACE", "POD_NAMESPACE", "K8S_NAMESPACE")
"""Downward-API variables naming the namespace (first set wins)."""
K8S_POD: Final = ("PREDTRACE_K8S_POD_NAME", "PREDTRACE_K8S_POD", "POD_NAME", "K8S_POD_NAME")
"""Downward-API variables naming the pod (first set wins).

``PREDTRACE_K8S_POD`` is the middleware's spelling; when both it and
``PREDTRACE_K8S_POD_NAME`` are set, ``PREDTRACE_K8S_POD_NAME`` wins.
"""
K8S_NODE: Final = ("PREDTRACE_K8S_NODE_NAME", "PREDTRACE_K8S_NODE", "NODE_NAME", "K8S_NODE_NAME")
"""Downward-API variables naming the node (first set wins).

``PREDTRACE_K8S_NODE`` is the middleware's spelling; when both it and
``PREDTRACE_K8S_NODE_NAME`` are set, ``PREDTRACE_K8S_NODE_NAME`` wins.
"""
