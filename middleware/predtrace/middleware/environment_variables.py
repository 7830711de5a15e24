"""The ``PREDTRACE_*`` environment variables read by ``MiddlewareConfig.from_env``.

Each constant is the name of one variable; its docstring says what it sets.
Booleans accept ``1/true/yes/on`` and ``0/false/no/off``; lists are
comma-separated. A value that does not parse fails at startup, naming the
variable. The OpenTelemetry SDK keeps reading its own ``OTEL_*`` variables.

The deployment (service, deployment id, namespace, pod, node, image) is read
with the sidecar's chain (``predtrace.sidecar.pipeline.deployment_from_env``):
for each field the first variable set, then the Kubernetes downward-API
spellings, then ``OTEL_RESOURCE_ATTRIBUTES``, so one pod is one deployment in
direct and in sidecar mode. A value no event could carry (over 64 KiB, a NUL,
not UTF-8), there or in a ``PREDTRACE_MODEL_*`` variable, fails startup naming
its variable.
"""

from __future__ import annotations

from typing import Final

PREDTRACE_ENABLED: Final = "PREDTRACE_ENABLED"
"""``false`` turns the middleware into a pass-through (default ``true``)."""

PREDTRACE_COLLECTOR_URL: Final = "PREDTRACE_COLLECTOR_URL"
"""Direct mode: the collector's base URL (``http(s)://host:port``)."""

PREDTRACE_COLLECTOR_TOKEN: Final = "PREDTRACE_COLLECTOR_TOKEN"  # noqa: S105 - a variable name
"""Bearer token with the ``ingest`` scope for the collector (never logged)."""

PREDTRACE_COLLECTOR_TIMEOUT: Final = "PREDTRACE_COLLECTOR_TIMEOUT"
"""Seconds per HTTP attempt to the collector (default 10)."""

PREDTRACE_SIDECAR_TARGET: Final = "PREDTRACE_SIDECAR_TARGET"
"""Sidecar mode: the sidecar's gRPC address, ``host:port``."""

PREDTRACE_SIDECAR_TIMEOUT: Final = "PREDTRACE_SIDECAR_TIMEOUT"
"""Seconds per ``RecordBatch`` call to the sidecar (default 5)."""

PREDTRACE_SIDECAR_TLS_CA: Final = "PREDTRACE_SIDECAR_TLS_CA"
"""PEM file of the CA that signed the sidecar's certificate; enables TLS."""

PREDTRACE_SIDECAR_TLS_CERT: Final = "PREDTRACE_SIDECAR_TLS_CERT"
"""PEM client certificate for mTLS to the sidecar (needs the key too)."""

PREDTRACE_SIDECAR_TLS_KEY: Final = "PREDTRACE_SIDECAR_TLS_KEY"
"""PEM private key of the client certificate."""

PREDTRACE_SERVICE_NAME: Final = "PREDTRACE_SERVICE_NAME"
"""Service name of the events and the producer id prefix.

Else ``OTEL_SERVICE_NAME``, else ``service.name`` of ``OTEL_RESOURCE_ATTRIBUTES``.
"""

OTEL_SERVICE_NAME: Final = "OTEL_SERVICE_NAME"
"""The OpenTelemetry service name, used when ``PREDTRACE_SERVICE_NAME`` is unset."""

PREDTRACE_MODEL_NAME: Final = "PREDTRACE_MODEL_NAME"
"""Static model name, used when neither the route nor the handler names one."""

PREDTRACE_MODEL_VERSION: Final = "PREDTRACE_MODEL_VERSION"
"""Static model version."""

PREDTRACE_MODEL_ALIAS: Final = "PREDTRACE_MODEL_ALIAS"
"""Static model alias (e.g. ``champion``)."""

PREDTRACE_MODEL_ID: Final = "PREDTRACE_MODEL_ID"
"""Static registry model id (e.g. ``models:/churn/3``)."""

PREDTRACE_MODEL_DIGEST: Final = "PREDTRACE_MODEL_DIGEST"
"""Static artifact digest, ``sha256:<hex>``."""

PREDTRACE_DEPLOYMENT_ID: Final = "PREDTRACE_DEPLOYMENT_ID"
"""Deployment id carried by every event.

Unset, events carry none and the collector keys the deployment
``namespace/service`` (``service`` without a namespace), as for the sidecar's.
"""

PREDTRACE_K8S_NAMESPACE: Final = "PREDTRACE_K8S_NAMESPACE"
"""Kubernetes namespace (set it from the downward API).

Else ``POD_NAMESPACE``, ``K8S_NAMESPACE``, then ``k8s.namespace.name`` of
``OTEL_RESOURCE_ATTRIBUTES``.
"""

PREDTRACE_K8S_POD_NAME: Final = "PREDTRACE_K8S_POD_NAME"
"""Kubernetes pod name, the sidecar's spelling: wins over ``PREDTRACE_K8S_POD``."""

PREDTRACE_K8S_POD: Final = "PREDTRACE_K8S_POD"
"""Kubernetes pod name (downward API).

``PREDTRACE_K8S_POD_NAME`` wins over it; else ``POD_NAME``, ``K8S_POD_NAME``,
then ``k8s.pod.name`` of ``OTEL_RESOURCE_ATTRIBUTES``.
"""

PREDTRACE_K8S_NODE_NAME: Final = "PREDTRACE_K8S_NODE_NAME"
"""Kubernetes node name, the sidecar's spelling: wins over ``PREDTRACE_K8S_NODE``."""

PREDTRACE_K8S_NODE: Final = "PREDTRACE_K8S_NODE"
"""Kubernetes node name (downward API).

``PREDTRACE_K8S_NODE_NAME`` wins over it; else ``NODE_NAME``, ``K8S_NODE_NAME``,
then ``k8s.node.name`` of ``OTEL_RESOURCE_ATTRIBUTES``.
"""

PREDTRACE_IMAGE_DIGEST: Final = "PREDTRACE_IMAGE_DIGEST"
"""Container image digest, ``sha256:<hex>`` (else ``container.image.id`` of
``OTEL_RESOURCE_ATTRIBUTES``)."""

PREDTRACE_IMAGE_NAME: Final = "PREDTRACE_IMAGE_NAME"
"""Container image name (else ``container.image.name`` of ``OTEL_RESOURCE_ATTRIBUTES``)."""

OTEL_RESOURCE_ATTRIBUTES: Final = "OTEL_RESOURCE_ATTRIBUTES"
"""The OpenTelemetry resource (``k=v,...``, percent-decoded): the deployment fields left unset."""

PREDTRACE_MLFLOW_URL: Final = "PREDTRACE_MLFLOW_URL"
"""MLflow tracking server (``http(s)://host:port``) to stamp spans with the training run id
and events with the artifact digest (``MlflowResolver``); credentials from MLflow's own
``MLFLOW_TRACKING_TOKEN`` or ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``."""

PREDTRACE_ROUTES: Final = "PREDTRACE_ROUTES"
"""Extra prediction routes, comma-separated ``[METHOD ]/path[ PROTOCOL]``.

E.g. ``POST /predict,POST /models/{name}/score``. PROTOCOL is ``http`` (the
default), ``oip-v2-rest`` or ``kserve-v1``: an OIP v2 server mounted under a
prefix is ``POST /api/v2/models/{name}/infer oip-v2-rest``, so its body ``id``,
served version and outputs are read as on the built-in route.
"""

PREDTRACE_BUILTIN_ROUTES: Final = "PREDTRACE_BUILTIN_ROUTES"
"""Whether the OIP v2 REST and KServe v1 routes are predictions (default ``true``)."""

PREDTRACE_ID_HEADER: Final = "PREDTRACE_ID_HEADER"
"""Response header carrying the prediction id (default ``x-prediction-id``).

Not a framing or hop-by-hop header (content-length, transfer-encoding, connection...).
"""

PREDTRACE_OIP_ECHO_ID: Final = "PREDTRACE_OIP_ECHO_ID"
"""Give an OIP v2 request without ``id`` the prediction id, so the answer echoes it (default on).

The body the app gets then has an ``id`` member its client did not send: set
``0`` for an app whose request model forbids unknown fields (it would answer
422) or whose own body limit is within a few bytes of the bodies it takes (413).
"""

PREDTRACE_FINGERPRINT_KEY: Final = "PREDTRACE_FINGERPRINT_KEY"
"""HMAC key (at least 16 characters) of the input fingerprint; unset: no fingerprint."""

PREDTRACE_FEATURES: Final = "PREDTRACE_FEATURES"
"""Allow-list of numeric input features that may leave the process (default none)."""

PREDTRACE_ATTRIBUTES: Final = "PREDTRACE_ATTRIBUTES"
"""Allow-list of event attribute keys a handler may set (default none)."""

PREDTRACE_SAMPLE_RATE: Final = "PREDTRACE_SAMPLE_RATE"
"""Share of predictions whose features and output are captured, 0..1 (default 0.1)."""

PREDTRACE_MAX_BODY_BYTES: Final = "PREDTRACE_MAX_BODY_BYTES"
"""Largest request body read for the fingerprint (default 1 MiB)."""

PREDTRACE_MAX_OUTPUT_BYTES: Final = "PREDTRACE_MAX_OUTPUT_BYTES"
"""Largest response body inspected for the model version and output (default 64 KiB)."""

PREDTRACE_QUEUE_SIZE: Final = "PREDTRACE_QUEUE_SIZE"
"""Events held in memory before the oldest is dropped, 1 to 1,000,000 (default 4096)."""

PREDTRACE_BATCH_SIZE: Final = "PREDTRACE_BATCH_SIZE"
"""Events per exported batch, 1 to 10,000 and at most the queue size (default 512)."""

PREDTRACE_EXPORT_DELAY: Final = "PREDTRACE_EXPORT_DELAY"
"""Seconds between exports of a partial batch, 0.001 to 3600 (default 1)."""

PREDTRACE_SHUTDOWN_TIMEOUT: Final = "PREDTRACE_SHUTDOWN_TIMEOUT"
"""Seconds the shutdown flush may take, finite and > 0 (default 5).

A healthy collector gets all of it. A collector that is down or hung is given
up after ``PREDTRACE_STALL_GRACE`` (an export in flight that long, or a batch
still failing after one more try): what is left is counted as
``dropped.shutdown`` and the worker stops at once instead of at the deadline.
"""

PREDTRACE_STALL_GRACE: Final = "PREDTRACE_STALL_GRACE"
"""Seconds a collector that is down or hung is waited for at shutdown, 0.001 to 3600 (default 2).

Every server worker's stop waits this long at most for a dead collector;
a healthy one keeps the whole ``PREDTRACE_SHUTDOWN_TIMEOUT``.
"""

PREDTRACE_FLUSH_TRACER_PROVIDER: Final = "PREDTRACE_FLUSH_TRACER_PROVIDER"
"""Also force-flush the app's SDK TracerProvider at shutdown (default ``true``)."""
