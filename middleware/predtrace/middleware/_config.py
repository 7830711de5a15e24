"""MiddlewareConfig: every setting of the middleware, validated once at startup.

Built in code or read from ``PREDTRACE_*`` variables with ``from_env``
(``predtrace.middleware.environment_variables`` documents each one). The
runtime (``_runtime``) turns a config into a pipeline; nothing here does I/O
except reading the TLS files named for the sidecar.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from opentelemetry.trace import TracerProvider

from predtrace.middleware import environment_variables as env
from predtrace.middleware._errors import ConfigError
from predtrace.middleware._mlflow import MlflowResolver
from predtrace.middleware._registry import ModelResolver
from predtrace.middleware._routes import BUILTIN_ROUTES, RoutePattern
from predtrace.sidecar.pipeline import (
    CollectorClientConfig,
    DeploymentEnvError,
    Exporter,
    QueueConfig,
    deployment_from_env,
    identity_problem,
)

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
_MIN_KEY_LEN: Final = 16
_MIN_CALL_TIMEOUT_S: Final = 0.5
_HEADER_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
# Headers that frame the message or concern one connection: the server and
# the proxies own them, and the id written there would break the response.
_RESERVED_HEADERS: Final = frozenset(
    {
        "content-length",
        "content-type",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "host",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# Text fields stamped on every event (or span): a value no event could carry
# (over 64 KiB, a NUL, not UTF-8) would cost every event, so it fails startup.
_IDENTITY_FIELDS: Final = (
    "service",
    "model_name",
    "model_version",
    "model_alias",
    "model_id",
    "model_digest",
    "deployment_id",
    "namespace",
    "pod",
    "node",
    "image_digest",
    "image_name",
)
_QUEUE_VARIABLES: Final = {
    "max_queue_size": env.PREDTRACE_QUEUE_SIZE,
    "max_batch_size": env.PREDTRACE_BATCH_SIZE,
    "schedule_delay": env.PREDTRACE_EXPORT_DELAY,
    "stall_grace": env.PREDTRACE_STALL_GRACE,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class MiddlewareConfig:
    """What the prediction middleware does and where its events go.

    Give exactly one destination: ``collector_url`` (direct mode),
    ``sidecar_target`` (the local sidecar over gRPC) or ``exporter`` (any
    object with ``export``/``shutdown``, e.g. ``InMemoryExporter`` in tests).

    ``routes`` adds prediction routes to the built-in OIP v2 REST and KServe
    v1 ones: ``RoutePattern`` objects or text ``"[METHOD ]/path[ PROTOCOL]"``,
    the protocol one of ``oip-v2-rest``, ``kserve-v1`` or ``http`` (the
    default), e.g. ``"POST /api/v2/models/{name}/infer oip-v2-rest"`` for an
    OIP server mounted under ``/api`` (an unknown protocol fails at startup).

    ``oip_echo_id`` (default True): an OIP v2 request body without ``id`` gets
    the prediction id added as its ``id`` before the app sees it, so the
    server's answer echoes the id of the ``x-prediction-id`` header (the
    protocol keeps the response id the request's, and an OIP server accepts
    ``id``). An app whose request model forbids unknown fields (pydantic
    ``extra="forbid"``), or whose own body limit is within a few dozen bytes
    of the body, would then refuse the request (422, 413): set it False
    (``PREDTRACE_OIP_ECHO_ID=0``) for such an app.

    Example:
        >>> MiddlewareConfig(
        ...     sidecar_target="127.0.0.1:4555",
        ...     service="churn-api",
        ...     model_name="churn",
        ...     fingerprint_key="a-long-secret-from-the-vault",
        ...     feature_allowlist=frozenset({"tenure_months"}),
        ... )
    """

    enabled: bool = True
    # -- destination ---------------------------------------------------------
    collector_url: str | None = None
    collector_token: str | None = field(default=None, repr=False)
    collector_timeout: float = 10.0
    sidecar_target: str | None = None
    sidecar_timeout: float = 5.0
    sidecar_tls_ca: str | None = None
    sidecar_tls_cert: str | None = None
    sidecar_tls_key: str | None = None
    exporter: Exporter | None = field(default=None, compare=False)
    queue: QueueConfig = field(default_factory=QueueConfig)
    shutdown_timeout: float = 5.0
    # -- identity ------------------------------------------------------------
    service: str = ""
    model_name: str = ""
    model_version: str = ""
    model_alias: str = ""
    model_id: str = ""
    model_digest: str = ""
    deployment_id: str = ""
    namespace: str = ""
    pod: str = ""
    node: str = ""
    image_digest: str = ""
    image_name: str = ""
    resolver: ModelResolver | None = field(default=None, compare=False)
    # -- which requests, which ids --------------------------------------------
    routes: tuple[RoutePattern | str, ...] = ()
    builtin_routes: bool = True
    id_header: str = "x-prediction-id"
    oip_echo_id: bool = True
    # -- what leaves the process ---------------------------------------------
    fingerprint_key: str | None = field(default=None, repr=False)
    feature_allowlist: frozenset[str] = frozenset()
    attribute_allowlist: frozenset[str] = frozenset()
    sample_rate: float = 0.1
    max_body_bytes: int = 1024 * 1024
    max_output_bytes: int = 64 * 1024
    # -- spans ---------------------------------------------------------------
    tracer_provider: TracerProvider | None = field(default=None, compare=False)
    flush_tracer_provider: bool = True

    def __post_init__(self) -> None:
        self._check_destination()
        if not 0.0 <= self.sample_rate <= 1.0 or math.isnan(self.sample_rate):
            raise ConfigError(f"sample_rate must be within 0..1, got {self.sample_rate}")
        for name in ("max_body_bytes", "max_output_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        for name in ("collector_timeout", "sidecar_timeout", "shutdown_timeout"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number of seconds > 0, got {value}")
        for name in ("collector_timeout", "sidecar_timeout"):
            # Shorter, and a call the receiver completes (spooled, stored) is
            # given up and sent again: every retry stores the batch once more.
            if getattr(self, name) < _MIN_CALL_TIMEOUT_S:
                raise ConfigError(
                    f"{name} must be at least {_MIN_CALL_TIMEOUT_S} s, got {getattr(self, name)}"
                )
        if self.fingerprint_key is not None and len(self.fingerprint_key) < _MIN_KEY_LEN:
            raise ConfigError(f"fingerprint_key must be at least {_MIN_KEY_LEN} characters")
        for name in _IDENTITY_FIELDS if self.enabled else ():
            problem = identity_problem(getattr(self, name))
            if problem is not None:
                raise ConfigError(f"{name} cannot be stamped on events: {problem}")
        _check_id_header(self.id_header)
        # Parse string routes now, so a typo fails at startup.
        self.route_patterns()

    def _check_destination(self) -> None:
        chosen = [
            name
            for name in ("collector_url", "sidecar_target", "exporter")
            if getattr(self, name) is not None
        ]
        if self.enabled and len(chosen) != 1:
            raise ConfigError(
                "MiddlewareConfig needs exactly one of collector_url, sidecar_target or "
                f"exporter (got {', '.join(chosen) or 'none'}); set {env.PREDTRACE_COLLECTOR_URL} "
                f"or {env.PREDTRACE_SIDECAR_TARGET}, or {env.PREDTRACE_ENABLED}=false"
            )
        if self.collector_url is not None:
            try:
                self.collector_client_config()
            except ValueError as exc:
                raise ConfigError(f"{_client_field(str(exc))}: {exc}") from None
        if self.sidecar_target is not None:
            _check_target(self.sidecar_target)
        if (self.sidecar_tls_cert is None) != (self.sidecar_tls_key is None):
            raise ConfigError("sidecar_tls_cert and sidecar_tls_key go together")
        if self.enabled and self.sidecar_target is not None:
            for name in ("sidecar_tls_ca", "sidecar_tls_cert", "sidecar_tls_key"):
                _check_readable(name, getattr(self, name))

    def collector_client_config(self) -> CollectorClientConfig:
        """The pipeline's client config for direct mode (``collector_url`` must be set)."""
        if self.collector_url is None:
            raise ConfigError("collector_url is not set")
        return CollectorClientConfig(
            url=self.collector_url, token=self.collector_token, timeout=self.collector_timeout
        )

    def route_patterns(self) -> tuple[RoutePattern, ...]:
        """User routes (parsed), then the built-in ones when enabled."""
        own = tuple(
            r if isinstance(r, RoutePattern) else RoutePattern.parse(r) for r in self.routes
        )
        return own + BUILTIN_ROUTES if self.builtin_routes else own

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str],
        *,
        exporter: Exporter | None = None,
        resolver: ModelResolver | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> MiddlewareConfig:
        """Read the ``PREDTRACE_*`` variables of ``environ`` (pass ``os.environ``).

        Objects that cannot come from the environment are keyword arguments.
        The deployment (service, namespace, pod, node, image) is read as the
        sidecar reads it (``predtrace.sidecar.pipeline.deployment_from_env``):
        ``PREDTRACE_*``, then the Kubernetes downward-API variables
        (``POD_NAME``...), then ``OTEL_RESOURCE_ATTRIBUTES``, so the same pod
        is the same deployment in direct and in sidecar mode.

        Raises:
            ConfigError: a variable that does not parse, or an invalid combination.
        """
        reader = _EnvReader(environ)
        try:
            return cls._from_reader(reader, environ, exporter, resolver, tracer_provider)
        except ConfigError as exc:
            raise ConfigError(_naming_the_variable(str(exc))) from None

    @classmethod
    def _from_reader(
        cls,
        reader: _EnvReader,
        environ: Mapping[str, str],
        exporter: Exporter | None,
        resolver: ModelResolver | None,
        tracer_provider: TracerProvider | None,
    ) -> MiddlewareConfig:
        enabled = reader.flag(env.PREDTRACE_ENABLED, default=True)
        try:
            # The sidecar's chain: the error names the variable the value came
            # from. Disabled, the middleware stamps nothing: nothing to refuse.
            deployment = deployment_from_env(environ if enabled else {})
        except DeploymentEnvError as exc:
            raise ConfigError(str(exc)) from None
        return cls(
            enabled=enabled,
            collector_url=reader.text(env.PREDTRACE_COLLECTOR_URL),
            collector_token=reader.text(env.PREDTRACE_COLLECTOR_TOKEN),
            collector_timeout=reader.number(env.PREDTRACE_COLLECTOR_TIMEOUT, 10.0),
            sidecar_target=reader.text(env.PREDTRACE_SIDECAR_TARGET),
            sidecar_timeout=reader.number(env.PREDTRACE_SIDECAR_TIMEOUT, 5.0),
            sidecar_tls_ca=reader.text(env.PREDTRACE_SIDECAR_TLS_CA),
            sidecar_tls_cert=reader.text(env.PREDTRACE_SIDECAR_TLS_CERT),
            sidecar_tls_key=reader.text(env.PREDTRACE_SIDECAR_TLS_KEY),
            exporter=exporter,
            queue=reader.queue(),
            shutdown_timeout=reader.number(env.PREDTRACE_SHUTDOWN_TIMEOUT, 5.0),
            service=deployment["service"],
            model_name=reader.str_or_empty(env.PREDTRACE_MODEL_NAME),
            model_version=reader.str_or_empty(env.PREDTRACE_MODEL_VERSION),
            model_alias=reader.str_or_empty(env.PREDTRACE_MODEL_ALIAS),
            model_id=reader.str_or_empty(env.PREDTRACE_MODEL_ID),
            model_digest=reader.str_or_empty(env.PREDTRACE_MODEL_DIGEST),
            deployment_id=deployment["id"],
            namespace=deployment["namespace"],
            pod=deployment["pod"],
            node=deployment["node"],
            image_digest=deployment["image_digest"],
            image_name=deployment["image_name"],
            resolver=resolver or MlflowResolver.from_env(environ),
            routes=tuple(reader.items(env.PREDTRACE_ROUTES)),
            builtin_routes=reader.flag(env.PREDTRACE_BUILTIN_ROUTES, default=True),
            id_header=(reader.text(env.PREDTRACE_ID_HEADER) or "x-prediction-id").lower(),
            oip_echo_id=reader.flag(env.PREDTRACE_OIP_ECHO_ID, default=True),
            fingerprint_key=reader.text(env.PREDTRACE_FINGERPRINT_KEY),
            feature_allowlist=frozenset(reader.items(env.PREDTRACE_FEATURES)),
            attribute_allowlist=frozenset(reader.items(env.PREDTRACE_ATTRIBUTES)),
            sample_rate=reader.number(env.PREDTRACE_SAMPLE_RATE, 0.1),
            max_body_bytes=reader.integer(env.PREDTRACE_MAX_BODY_BYTES, 1024 * 1024),
            max_output_bytes=reader.integer(env.PREDTRACE_MAX_OUTPUT_BYTES, 64 * 1024),
            tracer_provider=tracer_provider,
            flush_tracer_provider=reader.flag(env.PREDTRACE_FLUSH_TRACER_PROVIDER, default=True),
        )


def _check_id_header(name: str) -> None:
    if not name or not set(name) <= _HEADER_CHARS:
        raise ConfigError(
            f"id_header must be a lower-case header name (a-z, 0-9, '-'), got {name!r}"
        )
    if name in _RESERVED_HEADERS:
        raise ConfigError(
            f"id_header ({env.PREDTRACE_ID_HEADER}) must not be {name!r}: a framing or "
            "hop-by-hop header, owned by the server; give the id a header of its own, "
            "such as x-prediction-id"
        )


def _check_readable(name: str, path: str | None) -> None:
    """Startup, not the first export: a TLS file of the sidecar that cannot be read fails here."""
    if path is None:
        return
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None


def _check_target(target: str) -> None:
    host, sep, port = target.rpartition(":")
    if "://" in target:
        raise ConfigError(f"sidecar_target must be 'host:port', not a URL, got {target!r}")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"sidecar_target must be 'host:port', got {target!r}")


# The setting behind each field whose check can fail: an error from the
# environment names the variable to fix, not only the field.
def _client_field(problem: str) -> str:
    """The field a ``CollectorClientConfig`` complaint is about."""
    if problem.startswith("the token"):
        return "collector_token"
    if problem.startswith("collector timeout"):
        return "collector_timeout"
    return "collector_url"


_FIELD_VARIABLES: Final = {
    "collector_url": env.PREDTRACE_COLLECTOR_URL,
    "sidecar_target": env.PREDTRACE_SIDECAR_TARGET,
    "sidecar_tls_ca": env.PREDTRACE_SIDECAR_TLS_CA,
    "sidecar_tls_cert": env.PREDTRACE_SIDECAR_TLS_CERT,
    "sidecar_tls_key": env.PREDTRACE_SIDECAR_TLS_KEY,
    "sample_rate": env.PREDTRACE_SAMPLE_RATE,
    "max_body_bytes": env.PREDTRACE_MAX_BODY_BYTES,
    "max_output_bytes": env.PREDTRACE_MAX_OUTPUT_BYTES,
    "collector_timeout": env.PREDTRACE_COLLECTOR_TIMEOUT,
    "collector_token": env.PREDTRACE_COLLECTOR_TOKEN,
    "sidecar_timeout": env.PREDTRACE_SIDECAR_TIMEOUT,
    "shutdown_timeout": env.PREDTRACE_SHUTDOWN_TIMEOUT,
    "fingerprint_key": env.PREDTRACE_FINGERPRINT_KEY,
    "id_header": env.PREDTRACE_ID_HEADER,
    "model_name": env.PREDTRACE_MODEL_NAME,
    "model_version": env.PREDTRACE_MODEL_VERSION,
    "model_alias": env.PREDTRACE_MODEL_ALIAS,
    "model_id": env.PREDTRACE_MODEL_ID,
    "model_digest": env.PREDTRACE_MODEL_DIGEST,
    "route": env.PREDTRACE_ROUTES,
}


def _naming_the_variable(message: str) -> str:
    """``message`` led by the ``PREDTRACE_*`` variable of the field it is about."""
    for name, variable in _FIELD_VARIABLES.items():
        if message.startswith(name) and variable not in message:
            return f"{variable}: {message}"
    return message


class _EnvReader:
    """Typed reads of environment variables; errors name the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def text(self, name: str) -> str | None:
        value = self._environ.get(name, "").strip()
        return value or None

    def items(self, name: str) -> list[str]:
        return [item.strip() for item in (self.text(name) or "").split(",") if item.strip()]

    def flag(self, name: str, *, default: bool) -> bool:
        value = (self.text(name) or "").lower()
        if not value:
            return default
        if value in _TRUE or value in _FALSE:
            return value in _TRUE
        raise ConfigError(f"{name} must be true or false, got {value!r}")

    def number(self, name: str, default: float) -> float:
        value = self.text(name)
        try:
            number = default if value is None else float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        # float() reads "nan" and "inf": no setting means either (a NaN wait
        # returns at once and spins a core; an infinite one kills the thread).
        if not math.isfinite(number):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return number

    def integer(self, name: str, default: int) -> int:
        value = self.text(name)
        try:
            return default if value is None else int(value)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None

    def queue(self) -> QueueConfig:
        defaults = QueueConfig()
        try:
            return QueueConfig(
                max_queue_size=self.integer(env.PREDTRACE_QUEUE_SIZE, defaults.max_queue_size),
                max_batch_size=self.integer(env.PREDTRACE_BATCH_SIZE, defaults.max_batch_size),
                schedule_delay=self.number(env.PREDTRACE_EXPORT_DELAY, defaults.schedule_delay),
                stall_grace=self.number(env.PREDTRACE_STALL_GRACE, defaults.stall_grace),
            )
        except ConfigError:
            raise
        except ValueError as exc:
            # QueueConfig names its field: name the variable that set it too.
            named = [
                var for key, var in _QUEUE_VARIABLES.items() if f"QueueConfig.{key}" in str(exc)
            ]
            raise ConfigError(f"queue settings ({', '.join(named) or 'defaults'}): {exc}") from None

    def str_or_empty(self, name: str) -> str:
        return self.text(name) or ""
