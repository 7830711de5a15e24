"""What an operator sets on the collector: flags of ``predtrace collector serve`` or env.

Validated at startup (fail fast); every environment variable is a constant below.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

from predtrace.cli._serving import MAX_CONNECTIONS
from predtrace.collector._errors import ConfigError

PREDTRACE_COLLECTOR_DB: Final = "PREDTRACE_COLLECTOR_DB"
PREDTRACE_COLLECTOR_LISTEN: Final = "PREDTRACE_COLLECTOR_LISTEN"
PREDTRACE_COLLECTOR_TOKENS: Final = "PREDTRACE_COLLECTOR_TOKENS"
PREDTRACE_COLLECTOR_TLS_CERT: Final = "PREDTRACE_COLLECTOR_TLS_CERT"
PREDTRACE_COLLECTOR_TLS_KEY: Final = "PREDTRACE_COLLECTOR_TLS_KEY"
PREDTRACE_COLLECTOR_MAX_BODY_BYTES: Final = "PREDTRACE_COLLECTOR_MAX_BODY_BYTES"
PREDTRACE_COLLECTOR_MAX_INFLIGHT_BYTES: Final = "PREDTRACE_COLLECTOR_MAX_INFLIGHT_BYTES"
PREDTRACE_COLLECTOR_MAX_ANSWER_BYTES: Final = "PREDTRACE_COLLECTOR_MAX_ANSWER_BYTES"
PREDTRACE_COLLECTOR_MAX_CONNECTIONS: Final = "PREDTRACE_COLLECTOR_MAX_CONNECTIONS"
PREDTRACE_RETENTION_PREDICTIONS_DAYS: Final = "PREDTRACE_RETENTION_PREDICTIONS_DAYS"
PREDTRACE_RETENTION_BATCHES_DAYS: Final = "PREDTRACE_RETENTION_BATCHES_DAYS"
MLFLOW_TRACKING_URI: Final = "MLFLOW_TRACKING_URI"

DEFAULT_PORT: Final = 8700
DEFAULT_LISTEN: Final = f"127.0.0.1:{DEFAULT_PORT}"
DEFAULT_DB: Final = "sqlite:///predtrace-collector.db"
# The longest retention accepted. A pass's cutoff is "now - days" in int64
# nanoseconds, which reach back only to 1677 (about 350 years from now): any more
# overflows the store's columns and fails every pass. A century is beyond any
# record kept here; an operator who wants more means "for ever" and omits it.
MAX_RETENTION_DAYS: Final = 100 * 365.25


def parse_listen(listen: str, what: str = "--listen") -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:0`` for IPv6; port 0 picks a free one).

    ``what`` names the setting in errors.

    Raises:
        ConfigError: not HOST:PORT with a port in 0..65535 (a URL included).
    """
    if "/" in listen:
        raise ConfigError(f"{what} is HOST:PORT, not a URL, got {listen!r}")
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} must be HOST:PORT, got {listen!r}")
    return host, int(port)


def check_db_url(db: str, what: str = "--db") -> None:
    """Refuse a ``--db`` value ``open_store`` could not open (``what`` names the setting).

    Checked at startup so that the message can name where the value came
    from; ``open_store`` refuses the same URLs for library callers.

    Raises:
        ConfigError: an unsupported scheme, a sqlite URL without a file, a bad port.
    """
    parts = urlsplit(db)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme in ("postgresql", "postgres"):
        if credentials_cut(db):
            raise ConfigError(f"{what}: {CREDENTIALS_CUT}")
        port = _bad_postgres_port(parts.netloc)
        if port is not None:
            raise ConfigError(f"{what}: the port must be a number in 1..65535, not {port!r}")
    elif scheme == "sqlite":
        path = db[len("sqlite:///") :] if db.startswith("sqlite:///") else ""
        if not path or path == ":memory:":
            raise ConfigError(f"{what}: a sqlite URL needs a file: sqlite:////abs/path.db")
        if "?" in path:  # it would be part of the file's name
            raise ConfigError(f"{what}: a sqlite URL takes no options: sqlite:////abs/path.db")
    elif scheme:
        raise ConfigError(
            f"unsupported {what} URL scheme {parts.scheme!r}: use sqlite or postgresql"
        )


CREDENTIALS_CUT: Final = (
    "the URL's user name or password holds '/', '?' or '#': percent-encode them (%2F, %3F, %23)"
)


def credentials_cut(url: str) -> bool:
    """Whether ``url``'s user name or password holds a character that ends its host part.

    ``urlsplit`` ends the host part at the first '/', '?' or '#': the rest of
    the password would be read as a path, or (quoted in an error) as a port.
    """
    rest = url.partition("://")[2]
    # An '@' past the first '=' is a query value's (?user=admin@server).
    at, equals = rest.find("@"), rest.find("=")
    return at >= 0 and (equals < 0 or at < equals) and "@" not in urlsplit(url).netloc


def _bad_postgres_port(netloc: str) -> str | None:
    # Each host of host1:5432,host2:5433, after any user:password@ (never shown);
    # "host:" is asyncpg's default port, as libpq's.
    for hostport in netloc.rpartition("@")[2].split(","):
        rest = hostport.rpartition("]")[2] if hostport.startswith("[") else hostport
        port = rest.rpartition(":")[2] if ":" in rest else ""
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            return port[:20]
    return None


def _days(value: float | None, name: str) -> None:
    # "not 0 < value <= max" also refuses nan, for which every comparison is false.
    if value is not None and not 0 < value <= MAX_RETENTION_DAYS:
        raise ConfigError(
            f"{name} must be a number of days > 0 and <= {MAX_RETENTION_DAYS:g} "
            f"(100 years), got {value!r} (omit it to keep for ever)"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RetentionPolicy:
    """How long each kind of record is kept (None: forever). Lineage nodes are kept.

    Example:
        >>> RetentionPolicy(predictions_days=30, batches_days=90)
    """

    predictions_days: float | None = None
    batches_days: float | None = None
    chain_events_days: float | None = None
    interval_s: float = 3600.0
    chunk: int = 2000

    def __post_init__(self) -> None:
        _days(
            self.predictions_days,
            f"predictions retention (--retention-days, {PREDTRACE_RETENTION_PREDICTIONS_DAYS})",
        )
        _days(self.batches_days, f"batches retention ({PREDTRACE_RETENTION_BATCHES_DAYS})")
        _days(self.chain_events_days, "chain events retention")
        if not 0 < self.interval_s < math.inf or self.chunk < 1:
            raise ConfigError("retention interval must be a finite number > 0 and chunk >= 1")

    @property
    def enabled(self) -> bool:
        """Whether anything is ever removed."""
        return any(
            d is not None
            for d in (self.predictions_days, self.batches_days, self.chain_events_days)
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectorConfig:
    """Settings of one collector.

    Example:
        >>> CollectorConfig(db="sqlite:////var/lib/predtrace.db", listen="0.0.0.0:8700",
        ...                 tokens_file="/etc/predtrace/tokens.toml")
    """

    db: str = DEFAULT_DB
    listen: str = DEFAULT_LISTEN
    tokens_file: str | None = None
    mlflow_url: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    max_decompressed_bytes: int = 64 * 1024 * 1024
    max_events: int = 10_000
    max_inflight_bytes: int = 128 * 1024 * 1024
    max_answer_bytes: int = 64 * 1024 * 1024  # query answers being built or sent (``_answers``)
    max_json_bytes: int = 1024 * 1024
    max_connections: int = MAX_CONNECTIONS  # served at once; more are closed (``_server``)
    retry_after_s: int = 1
    body_timeout_s: float = 30.0  # a batch body must arrive within this (else 408)
    query_limit: int = 1000
    retention: RetentionPolicy = RetentionPolicy()
    from_environment: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)
    """(field, variable) of the settings read from the environment: errors name both."""

    def _what(self, name: str, label: str) -> str:
        """``label``, with the variable it came from when the environment set it."""
        for field_name, variable in self.from_environment:
            if field_name == name:
                return f"{label} ({variable})"
        return label

    def __post_init__(self) -> None:
        what = self._what
        parse_listen(self.listen, what("listen", "--listen"))
        if not self.db:
            raise ConfigError("--db is required")
        check_db_url(self.db, what("db", "--db"))
        for name in (
            "max_body_bytes",
            "max_decompressed_bytes",
            "max_events",
            "max_json_bytes",
            "max_answer_bytes",
            "max_connections",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{what(name, name)} must be > 0, got {getattr(self, name)}")
        if self.max_inflight_bytes < self.max_body_bytes:
            raise ConfigError(
                f"{what('max_inflight_bytes', 'max_inflight_bytes')} must be >= "
                f"{what('max_body_bytes', 'max_body_bytes')}"
            )
        if self.retry_after_s < 1 or self.query_limit < 1:
            raise ConfigError("retry_after_s and query_limit must be >= 1")
        if not self.body_timeout_s > 0:
            raise ConfigError("body_timeout_s must be > 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            cert, key = what("tls_cert", "--tls-cert"), what("tls_key", "--tls-key")
            raise ConfigError(f"TLS needs both {cert} and {key}")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The listener's TLS context (TLS 1.2+), or None for plaintext.

        Raises:
            ConfigError: the certificate or key cannot be loaded.
        """
        if self.tls_cert is None or self.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load the TLS certificate {self.tls_cert} and key: {exc}"
            ) from None
        return context

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: object) -> CollectorConfig:
        """Settings from environment variables; keyword overrides win (CLI flags).

        Raises:
            ConfigError: a variable holds an invalid value.
        """
        given = {k: v for k, v in overrides.items() if v is not None}
        values: dict[str, object] = {}
        read: list[tuple[str, str]] = []
        for key, name in (
            ("db", PREDTRACE_COLLECTOR_DB),
            ("listen", PREDTRACE_COLLECTOR_LISTEN),
            ("tokens_file", PREDTRACE_COLLECTOR_TOKENS),
            ("mlflow_url", MLFLOW_TRACKING_URI),
            ("tls_cert", PREDTRACE_COLLECTOR_TLS_CERT),
            ("tls_key", PREDTRACE_COLLECTOR_TLS_KEY),
            ("max_body_bytes", PREDTRACE_COLLECTOR_MAX_BODY_BYTES),
            ("max_inflight_bytes", PREDTRACE_COLLECTOR_MAX_INFLIGHT_BYTES),
            ("max_answer_bytes", PREDTRACE_COLLECTOR_MAX_ANSWER_BYTES),
            ("max_connections", PREDTRACE_COLLECTOR_MAX_CONNECTIONS),
        ):
            if key not in given and environ.get(name):
                text = environ[name]
                values[key] = _int(text, name) if key.startswith("max_") else text
                read.append((key, name))
        # --retention-days replaces the predictions' setting only: the
        # batches' one from the environment still holds.
        flag_days = given.pop("retention_days", None)
        values["retention"] = RetentionPolicy(
            predictions_days=(
                float(flag_days)  # type: ignore[arg-type]  # a float flag when given
                if flag_days is not None
                else _float(environ, PREDTRACE_RETENTION_PREDICTIONS_DAYS)
            ),
            batches_days=_float(environ, PREDTRACE_RETENTION_BATCHES_DAYS),
        )
        if not str(values.get("mlflow_url", "http://")).startswith(("http://", "https://")):
            del values["mlflow_url"]  # file: or databricks tracking URIs have no REST registry
        values.update(given)
        return cls(**values, from_environment=tuple(read))  # type: ignore[arg-type]


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name} must be an integer") from None


def _float(environ: Mapping[str, str], name: str) -> float | None:
    text = environ.get(name)
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number of days, got {text[:32]!r}") from None
