"""The configs of single pipeline stages: the shipper, redaction, the deployment stamp.

Each is what a user sets for one stage (by flags or ``PREDTRACE_*``
variables), validated in ``__post_init__`` at startup; ``SidecarConfig``
(``_config``) holds one of each.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from predtrace.sidecar import environment_variables as ev
from predtrace.sidecar._errors import ConfigError
from predtrace.sidecar.pipeline import (
    DEPLOYMENT_FIELDS,
    DeploymentEnvError,
    RetryPolicy,
    deployment_from_env,
    identity_problem,
)

MAX_BATCH_EVENTS = 10_000  # the collector's decoder bound (proto/FORMAT.md)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShipperConfig:
    """How the shipper batches and retries.

    Example:
        >>> ShipperConfig(max_batch_events=5000, linger=0.2)
        >>> ShipperConfig.edge()   # long outages: capped backoff of 5 minutes
    """

    max_batch_events: int = 5000
    max_batch_bytes: int = 4 * 1024 * 1024
    linger: float = 0.2
    compress: bool = True
    compress_level: int = 1  # level 6 saves ~2 % of bytes for twice the CPU
    retry: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(initial_backoff=0.5, max_backoff=30.0)
    )
    poison_attempts: int = 5
    quarantine_max_bytes: int | None = None
    """Byte cap of ``quarantine/`` (oldest files removed past it); None: a tenth of the spool's."""

    def __post_init__(self) -> None:
        # Named by the flags of ``sidecar serve``, which set them.
        if not 1 <= self.max_batch_events <= MAX_BATCH_EVENTS:
            raise ConfigError(
                f"--batch-max-events must be between 1 and {MAX_BATCH_EVENTS}, "
                f"not {self.max_batch_events}"
            )
        if self.max_batch_bytes < 1024:
            raise ConfigError("max_batch_bytes must be at least 1 KiB")
        if not 0 <= self.linger <= 60:  # NaN fails too: it compares false
            raise ConfigError(f"--batch-linger must be between 0 and 60 seconds, not {self.linger}")
        if not 1 <= self.compress_level <= 9:
            raise ConfigError("compress_level must be in [1, 9]")
        if self.retry.max_attempts is not None:
            raise ConfigError("the shipper never gives up for elapsed time: max_attempts=None")
        if self.poison_attempts < 1:
            raise ConfigError(f"--poison-attempts must be at least 1, not {self.poison_attempts}")
        if self.quarantine_max_bytes is not None and self.quarantine_max_bytes < 0:
            raise ConfigError("--quarantine-max-bytes must be >= 0")

    @classmethod
    def edge(cls, **overrides: Any) -> ShipperConfig:
        """Settings for devices offline for days: bigger batches, backoff capped at 5 min."""
        values: dict[str, Any] = {
            "max_batch_events": MAX_BATCH_EVENTS,
            "linger": 1.0,
            "retry": RetryPolicy(initial_backoff=1.0, max_backoff=300.0),
        }
        values.update(overrides)
        return cls(**values)


def _globs(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _check_patterns(patterns: tuple[str, ...], what: str) -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{what}: bad redaction pattern {pattern!r}: {exc}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class RedactionConfig:
    """What may leave the model server's machine; runs before the spool.

    Privacy by default: with the empty allow-lists no feature and no
    attribute is kept. Names are shell-style globs (``*`` keeps all);
    ``patterns`` are regular expressions whose matches in the kept
    attribute values and output labels are replaced by ``[redacted]``.
    """

    allow_features: tuple[str, ...] = ()
    allow_attributes: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_patterns(self.patterns, "--redact")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RedactionConfig:
        """Read ``PREDTRACE_ALLOW_FEATURES``/``_ATTRIBUTES`` (comma globs), ``PREDTRACE_REDACT``.

        Raises:
            ConfigError: a pattern of ``PREDTRACE_REDACT`` is no regular expression (named).
        """
        patterns = tuple(p for p in environ.get(ev.REDACT, "").split("\n") if p)
        _check_patterns(patterns, f"--redact ({ev.REDACT})")
        return cls(
            allow_features=_globs(environ.get(ev.ALLOW_FEATURES, "")),
            allow_attributes=_globs(environ.get(ev.ALLOW_ATTRIBUTES, "")),
            patterns=patterns,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploymentConfig:
    """Who serves: stamped on events (empty fields only) and on forwarded spans' resources."""

    id: str = ""
    service: str = ""
    namespace: str = ""
    pod: str = ""
    node: str = ""
    image_digest: str = ""
    image_name: str = ""

    def __post_init__(self) -> None:
        for name in DEPLOYMENT_FIELDS:
            problem = identity_problem(getattr(self, name))
            if problem is not None:
                raise ConfigError(f"the deployment's {name} cannot be stamped on events: {problem}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> DeploymentConfig:
        """Read the Kubernetes downward-API variables, ``OTEL_*`` and ``PREDTRACE_*``.

        The chain the middleware reads too (``predtrace.sidecar.pipeline.deployment_from_env``).

        Raises:
            ConfigError: a value no event could carry (over 64 KiB, a NUL), named
                by its variable: at startup, not on every event after it.
        """
        try:
            return cls(**deployment_from_env(environ))
        except DeploymentEnvError as exc:
            raise ConfigError(str(exc)) from None
