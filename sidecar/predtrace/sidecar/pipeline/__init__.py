"""The event pipeline core: source -> processors -> queued exporter -> exporter.

Used in-process by the middleware and, behind the durable spool, by the
sidecar. ``QueuedExporter.emit`` is safe on a request path: O(1), bounded,
never raising. ``deployment_from_env`` is the one reading of the deployment
identity (Kubernetes downward API, ``OTEL_*``, ``PREDTRACE_*``) both share.
"""

from predtrace.sidecar.pipeline._clock import Clock, SystemClock
from predtrace.sidecar.pipeline._collector_http import (
    BATCH_CONTENT_TYPE,
    CollectorClient,
    CollectorClientConfig,
    CollectorHttpExporter,
    is_loopback_host,
    new_producer_id,
    parse_retry_after,
)
from predtrace.sidecar.pipeline._counters import PipelineCounters, RateLimitedLog
from predtrace.sidecar.pipeline._deployment import (
    DEPLOYMENT_FIELDS,
    DEPLOYMENT_SOURCES,
    DeploymentEnvError,
    deployment_from_env,
    identity_problem,
    resource_attributes,
)
from predtrace.sidecar.pipeline._errors import (
    ExportError,
    PermanentExportError,
    RetryableExportError,
)
from predtrace.sidecar.pipeline._queued import QueueConfig, QueuedExporter
from predtrace.sidecar.pipeline._retry import RetryPolicy
from predtrace.sidecar.pipeline._stages import Exporter, ExportResult, OutgoingBatch, Processor

__all__ = [
    "BATCH_CONTENT_TYPE",
    "DEPLOYMENT_FIELDS",
    "DEPLOYMENT_SOURCES",
    "Clock",
    "CollectorClient",
    "CollectorClientConfig",
    "CollectorHttpExporter",
    "DeploymentEnvError",
    "ExportError",
    "ExportResult",
    "Exporter",
    "OutgoingBatch",
    "PermanentExportError",
    "PipelineCounters",
    "Processor",
    "QueueConfig",
    "QueuedExporter",
    "RateLimitedLog",
    "RetryPolicy",
    "RetryableExportError",
    "SystemClock",
    "deployment_from_env",
    "identity_problem",
    "is_loopback_host",
    "new_producer_id",
    "parse_retry_after",
    "resource_attributes",
]
