"""The MLflow registry adapter: lineage read over MLflow's REST API, cached.

Model name + version (or alias) -> ``model-versions/get`` (source, run id,
aliases) -> ``runs/get`` (params, metrics, tags with ``mlflow.source.git.commit``
and the repo URL, dataset inputs with digest and source). No ``mlflow`` import:
plain HTTP with aiohttp. When MLflow answered, whether it found the version,
and the version's aliases are remembered (``cached``; the store holds the
registration: a run's answer can be megabytes); a miss answers the next
lookup for ``negative_ttl`` seconds, a hit does not (callers that hold the
registration skip the lookup while it is fresh, ``ttl``). Aliases MLflow
names are remembered for ``ttl`` seconds. JSON is decoded and read in a worker thread, off the loop.
A failed lookup is not tried again for ``negative_ttl`` seconds, nor is
anything while MLflow is unreachable. Every answer is
type-checked: JSON of an unexpected shape is a ``RegistryError`` naming what
was wrong, never a half-read registration.

MlflowRegistry (this module) asks MLflow and caches the answers;
``_mlflow_json`` reads them into a ``Registration``, leaving out or cleaning
a value of another shape than the registration API accepts.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import aiohttp

from predtrace.collector._errors import ConfigError, LineageError, RegistryError
from predtrace.collector.lineage._mlflow_json import (
    as_object,
    as_text,
    kind_of,
    registration_from_mlflow,
)
from predtrace.collector.lineage._model import Registration
from predtrace.collector.lineage._values import check_text

# Imported from here, wherever they are defined.
__all__ = ["MlflowConfig", "MlflowRegistry", "RegistryBackoffError", "registration_from_mlflow"]

_API: Final = "/api/2.0/mlflow"
_MAX_RESPONSE: Final = 8 * 1024 * 1024
_CHUNK: Final = 64 * 1024
# What MLflow answers (400 or 404) when it has no such model, version, run or
# alias: a version that is not a number, an alias that was never set.
_MISSING_CODES: Final = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_Answer = tuple[float, bool, tuple[str, ...]]
"""What is kept of a model version's lookup: (fetched at, found, its aliases)."""


class RegistryBackoffError(RegistryError):
    """MLflow not asked: it, or this very lookup, failed less than ``negative_ttl`` ago."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MlflowConfig:
    """Where the MLflow tracking server is and how long its answers stay fresh.

    ``negative_ttl`` covers both "MLflow has no such version" and "the lookup
    failed" (unreachable, an error, a malformed answer).

    Example:
        >>> MlflowConfig(url="http://127.0.0.1:5000", ttl=300)
    """

    url: str
    timeout: float = 5.0
    ttl: float = 300.0
    negative_ttl: float = 30.0
    max_entries: int = 4096

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"MLflow URL must be http(s)://host[:port], got {self.url!r}")
        if self.timeout <= 0 or self.ttl < 0 or self.negative_ttl < 0 or self.max_entries < 1:
            raise ConfigError("MLflow timeout must be > 0, TTLs >= 0, max_entries >= 1")


def _put(cache: OrderedDict[K, V], key: K, value: V, limit: int) -> None:
    """Store ``value`` as the newest entry; drop the oldest beyond ``limit``."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)


class MlflowRegistry:
    """Reads lineage from an MLflow tracking server; one per event loop.

    ``lookup`` asks MLflow, but answers None without a request while a miss
    is fresh (``negative_ttl`` seconds); a failed lookup, of any kind, raises
    again without a request until then. While MLflow is down (unreachable,
    or ``mark_down`` when it sent nothing in a caller's deadline) nothing is
    asked for ``negative_ttl`` seconds. ``answers`` counts MLflow's HTTP
    answers, so that a caller can tell a hung MLflow from a slow one.
    """

    def __init__(
        self, config: MlflowConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        self._cache: OrderedDict[tuple[str, str], _Answer] = OrderedDict()
        self._aliases: OrderedDict[tuple[str, str], tuple[float, str | None]] = OrderedDict()
        self._failures: OrderedDict[tuple[str, str, str], tuple[float, str]] = OrderedDict()
        self._down: tuple[float, str] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0
        self.answers = 0

    async def _get(self, path: str, params: Mapping[str, str]) -> Mapping[str, Any] | None:
        """MLflow's JSON object for ``path``, or None when it has no such thing.

        Raises:
            RegistryError: unreachable (MLflow is then marked down), an error
                status, or an answer that is not a JSON object.
        """
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.config.timeout)
            self._session = aiohttp.ClientSession(timeout=timeout)
        self.requests += 1
        url = self.config.url.rstrip("/") + _API + path
        try:
            async with self._session.get(url, params=dict(params)) as resp:
                body = await _read(resp, path)
                status = resp.status
        except TimeoutError:
            self.mark_down(f"MLflow did not answer within {self.config.timeout:g} s")
            raise RegistryError(f"MLflow did not answer within {self.config.timeout:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            self.mark_down(f"MLflow unreachable: {type(exc).__name__}")
            raise RegistryError(f"MLflow unreachable: {type(exc).__name__}") from None
        self._down = None
        self.answers += 1
        if status == 200:
            return await asyncio.to_thread(_parse, body, path)
        if status == 404 or (status == 400 and _error_code(body) in _MISSING_CODES):
            return None
        raise RegistryError(f"MLflow answered {status} for {path}")

    def mark_down(self, reason: str) -> None:
        """Ask MLflow nothing for ``negative_ttl`` seconds (lookups raise ``reason``)."""
        self._down = (self._clock(), reason)

    def check_backoff(self, key: tuple[str, str, str]) -> None:
        """Raise RegistryBackoffError while MLflow is down or ``key`` failed recently.

        ``key``: ("version", name, version) or ("alias", name, alias).
        """
        now, ttl = self._clock(), self.config.negative_ttl
        for entry in (self._down, self._failures.get(key)):
            if entry is not None and now - entry[0] < ttl:
                next_try = math.ceil(ttl - (now - entry[0]))
                raise RegistryBackoffError(f"{entry[1]} (next try in {next_try} s)")

    def _failed(self, key: tuple[str, str, str], reason: str) -> None:
        _put(self._failures, key, (self._clock(), reason), self.config.max_entries)

    def _unexpected(self, key: tuple[str, str, str], exc: Exception) -> RegistryError:
        """A failure of another kind than RegistryError: remembered like one, no traceback."""
        error = RegistryError(f"unexpected {type(exc).__name__} reading MLflow's answer")
        self._failed(key, str(error))
        return error

    def cached(self, name: str, version: str) -> tuple[bool, bool]:
        """Return (fresh, found) of MLflow's last answer, without any request."""
        entry = self._cache.get((name, version))
        if entry is None:
            return False, False
        fetched, found, _ = entry
        ttl = self.config.ttl if found else self.config.negative_ttl
        return self._clock() - fetched < ttl, found

    def cached_alias(self, name: str, alias: str) -> tuple[bool, str | None]:
        """Return (fresh, version) of an alias as MLflow last named it, without any request."""
        entry = self._aliases.get((name, alias))
        if entry is None:
            return False, None
        fetched, version = entry
        ttl = self.config.ttl if version is not None else self.config.negative_ttl
        return self._clock() - fetched < ttl, version

    async def lookup(self, name: str, version: str) -> Registration | None:
        """The lineage of model ``name`` version ``version``, or None if MLflow lacks it.

        A version found is not kept here: callers ask again only when their
        store lacks it (and ``cached`` tells them when it is stale).

        Raises:
            RegistryBackoffError: the same lookup failed, or MLflow was down,
                less than ``negative_ttl`` seconds ago (nothing asked).
            RegistryError: MLflow unreachable, answering errors or malformed
                JSON, or reading its answer failed in any other way.
        """
        fresh, found = self.cached(name, version)
        if fresh and not found:
            return None
        key = ("version", name, version)
        self.check_backoff(key)
        try:
            registration = await self._fetch(name, version)
        except RegistryError as exc:
            self._failed(key, str(exc))
            raise
        except Exception as exc:  # noqa: BLE001 -- a bug reading an answer is a failed lookup
            raise self._unexpected(key, exc) from None
        self._failures.pop(key, None)
        aliases = registration.model.aliases if registration and registration.model else ()
        answer = (self._clock(), registration is not None, aliases)
        _put(self._cache, (name, version), answer, self.config.max_entries)
        for alias in aliases:
            self._remember_alias(name, alias, version)
        return registration

    async def _fetch(self, name: str, version: str) -> Registration | None:
        found = await self._get("/model-versions/get", {"name": name, "version": version})
        if found is None:
            return None
        model_version = as_object(
            found.get("model_version"), "model-versions/get's model_version", required=True
        )
        answered = as_text(model_version.get("name"), "model_version.name")
        if not answered:
            raise RegistryError(f"MLflow sent model version {name}/{version} without a name")
        if answered != name:
            raise RegistryError(f"MLflow answered model {answered[:64]!r} when asked for {name!r}")
        if as_text(model_version.get("version"), "model_version.version") != version:
            return None  # MLflow read "01" as 1: no version is spelled as asked
        run = None
        run_id = as_text(model_version.get("run_id"), "model_version.run_id")
        if run_id:
            got = await self._get("/runs/get", {"run_id": run_id})
            if got is not None:  # a deleted run: the model version without it
                run = as_object(got.get("run"), "runs/get's run", required=True)
        return await asyncio.to_thread(
            registration_from_mlflow, model_version, run, self.config.url
        )

    def _remember_alias(self, name: str, alias: str, version: str | None) -> None:
        _put(self._aliases, (name, alias), (self._clock(), version), self.config.max_entries)

    async def resolve_alias(self, name: str, alias: str) -> str | None:
        """The version an alias points at now (cached for ``ttl``), or None.

        A cached model version whose aliases disagree with the answer is
        dropped, so that the next ``lookup`` carries the alias where it is now.

        Raises:
            RegistryBackoffError: see ``lookup``.
            RegistryError: MLflow unreachable, answering errors or malformed JSON.
        """
        fresh, version = self.cached_alias(name, alias)
        if fresh:
            return version
        key = ("alias", name, alias)
        self.check_backoff(key)
        try:
            version = await self._fetch_alias(name, alias)
        except RegistryError as exc:
            self._failed(key, str(exc))
            raise
        except Exception as exc:  # noqa: BLE001 -- a bug reading an answer is a failed lookup
            raise self._unexpected(key, exc) from None
        self._failures.pop(key, None)
        self._remember_alias(name, alias, version)
        if version is not None:
            self._forget_stale(name, alias, version)
        return version

    async def _fetch_alias(self, name: str, alias: str) -> str | None:
        found = await self._get("/registered-models/alias", {"name": name, "alias": alias})
        if found is None:
            return None
        model_version = as_object(
            found.get("model_version"), "registered-models/alias's model_version", required=True
        )
        answered = as_text(model_version.get("name"), "model_version.name")
        if answered and answered != name:
            raise RegistryError(f"MLflow answered model {answered[:64]!r} when asked for {name!r}")
        version = as_text(model_version.get("version"), "model_version.version")
        if not version:
            raise RegistryError(f"MLflow's answer for alias {alias!r} names no version")
        try:
            return check_text(version, "model_version.version")
        except LineageError as exc:
            raise RegistryError(f"MLflow sent unusable lineage: {exc}") from None

    def _forget_stale(self, name: str, alias: str, version: str) -> None:
        """Drop cached versions of ``name`` whose aliases contradict alias -> version."""
        for (cached_name, cached_version), (_, found, aliases) in list(self._cache.items()):
            if cached_name != name or not found:
                continue
            if (alias in aliases) != (cached_version == version):
                del self._cache[(cached_name, cached_version)]

    async def close(self) -> None:
        """Close the HTTP session. Safe twice."""
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read(resp: aiohttp.ClientResponse, path: str) -> bytes:
    """The whole body, up to ``_MAX_RESPONSE`` bytes (RegistryError past it)."""
    body = bytearray()
    async for chunk in resp.content.iter_chunked(_CHUNK):
        body += chunk
        if len(body) > _MAX_RESPONSE:
            raise RegistryError(f"MLflow's answer for {path} exceeds {_MAX_RESPONSE} bytes")
    return bytes(body)


def _error_code(body: bytes) -> object:
    """The ``error_code`` of MLflow's error answer (None when unreadable)."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return parsed.get("error_code") if isinstance(parsed, dict) else None


def _parse(body: bytes, path: str) -> Mapping[str, Any]:
    """A JSON object (RegistryError for anything else)."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        raise RegistryError(f"MLflow sent invalid JSON for {path}") from None
    if not isinstance(parsed, dict):
        raise RegistryError(f"MLflow sent {kind_of(parsed)} for {path}, not a JSON object")
    return parsed
