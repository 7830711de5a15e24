"""The MLflow registry adapter: lineage read over MLflow's REST API, cached.

Model name + version (or alias) -> ``model-versions/get`` (source, run id,
aliases) -> ``runs/get`` (params, metrics, tags with ``mlflow.source.git.commit``
and the repo URL, dataset inputs with digest and source). No ``mlflow`` import:
plain HTTP with aiohttp. Answers are cached for ``ttl`` seconds (misses for
``negative_ttl``) and refreshed on the next lookup after that; so are the
aliases MLflow names. A failed lookup is not tried again for ``negative_ttl``
seconds, nor is anything while MLflow is unreachable. Every answer is
type-checked: JSON of an unexpected shape is a ``RegistryError`` naming what
was wrong, never a half-read registration.

Values are held to the shapes the registration API enforces (``_values``),
but MLflow is a registry we do not control: rather than lose the link for
one odd value, a dataset without a usable digest, a commit or artifact digest
that is not one, or a param or tag holding control characters is left out, a
name or URL is cut to its bound with such characters shown as U+FFFD, and
one log line per lookup counts what was left out or changed. Only the ids
the link is made of (model name, version, aliases, run id) still fail it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import aiohttp

from predtrace.collector._errors import ConfigError, LineageError, RegistryError
from predtrace.collector.lineage._model import (
    CommitNode,
    DatasetNode,
    ModelVersionNode,
    Registration,
    RunNode,
)
from predtrace.collector.lineage._values import (
    MAX_ITEMS,
    MAX_NAME,
    MAX_TEXT,
    check_text,
    clean_text,
    is_token,
)

_API: Final = "/api/2.0/mlflow"
_MAX_RESPONSE: Final = 8 * 1024 * 1024
_CHUNK: Final = 64 * 1024
_COMMIT_TAG: Final = "mlflow.source.git.commit"
_REPO_TAGS: Final = ("mlflow.source.git.repoURL", "mlflow.gitRepoURL")
# What MLflow answers (400 or 404) when it has no such model, version, run or
# alias: a version that is not a number, an alias that was never set.
_MISSING_CODES: Final = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})

# Run tags MLflow writes for itself, kilobytes of JSON each: never shown, not kept.
_SKIPPED_TAGS: Final = ("mlflow.log-model",)

log = logging.getLogger("predtrace.collector.mlflow")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


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


def _kind(value: object) -> str:
    """What a JSON value is, in words (for error messages)."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return "text" if isinstance(value, str) else "null"


def _object(value: object, where: str, *, required: bool = False) -> Mapping[str, Any]:
    """``value`` as a JSON object ({} for null unless ``required``).

    Raises:
        RegistryError: anything else, naming ``where``.
    """
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise RegistryError(f"MLflow sent {where} as {_kind(value)}, not an object")
    return value


def _array(value: object, where: str) -> list[Any]:
    """``value`` as a JSON list ([] for null); RegistryError naming ``where`` otherwise."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise RegistryError(f"MLflow sent {where} as {_kind(value)}, not a list")
    return value


def _text(value: object, where: str) -> str:
    """``value`` as text ("" for null; a number as its digits); RegistryError otherwise."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise RegistryError(f"MLflow sent {where} as {_kind(value)}, not text")


class _Cleaned:
    """What one lookup left out or changed of MLflow's answer, by kind; logged once."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def note(self, what: str) -> None:
        """Count one value left out or changed."""
        self.counts[what] += 1

    def text(self, value: str, what: str, limit: int) -> str:
        """``value`` cut to ``limit``, control characters as U+FFFD (counted if changed)."""
        cleaned = clean_text(value, limit)
        if cleaned != value:
            self.note(what)
        return cleaned

    def token(self, value: str, what: str) -> str:
        """``value`` if it has a digest's or commit's shape, else "" (counted)."""
        if value and not is_token(value):
            self.note(what)
            return ""
        return value

    def log(self, name: str, version: str) -> None:
        """One line naming what was left out or changed, if anything."""
        if self.counts:
            kinds = ", ".join(f"{what} x{count}" for what, count in sorted(self.counts.items()))
            log.warning(
                "MLflow lineage of %s/%s: %d value(s) left out or changed: %s",
                name,
                version,
                self.counts.total(),
                kinds,
            )


def _fits(text: str, limit: int, *, multiline: bool = False) -> bool:
    """Whether ``text`` passes ``check_text`` within ``limit``."""
    try:
        check_text(text, "", limit=limit, multiline=multiline)
    except LineageError:
        return False
    return True


def _kv(items: object, where: str, cleaned: _Cleaned, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """MLflow's ``[{key, value}]`` lists as a dict, but keys starting with ``skip``.

    An entry whose key or value holds control characters, or whose key is
    over ``MAX_NAME``, is left out; a value over ``MAX_TEXT`` is cut (counted).

    Raises:
        RegistryError: not a list of objects with text keys and values.
    """
    out: dict[str, str] = {}
    for item in _array(items, where):
        entry = _object(item, f"an entry of {where}", required=True)
        key = _text(entry.get("key"), f"a key of {where}")
        value = _text(entry.get("value"), f"the value of {where} {key[:64]!r}")
        if not key or key.startswith(skip):
            continue
        kept = value[:MAX_TEXT]
        if len(out) >= MAX_ITEMS or not (
            _fits(key, MAX_NAME) and _fits(kept, MAX_TEXT, multiline=True)
        ):
            cleaned.note(f"{where} entry")
            continue
        if kept != value:
            cleaned.note(f"{where} value cut")
        out[key] = kept
    return out


def _metrics(items: object, cleaned: _Cleaned) -> dict[str, float]:
    """``run.data.metrics``: finite numbers by key (MLflow's "NaN" text is left out).

    Raises:
        RegistryError: not a list of objects with a text key each.
    """
    out: dict[str, float] = {}
    for item in _array(items, "run.data.metrics"):
        entry = _object(item, "an entry of run.data.metrics", required=True)
        key = _text(entry.get("key"), "a key of run.data.metrics")
        if not key:
            raise RegistryError("MLflow sent a metric without a key")
        value = entry.get("value")
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not math.isfinite(value):
            continue
        if len(out) < MAX_ITEMS and _fits(key, MAX_NAME):
            out[key] = float(value)
        else:
            cleaned.note("run.data.metrics entry")
    return out


def _dataset_source(raw: str) -> str:
    """MLflow stores a dataset's source as JSON (``{"uri": ...}``); keep the location."""
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):
        return raw
    if isinstance(parsed, dict):
        for key in ("uri", "url", "path", "table_name"):
            if isinstance(parsed.get(key), str):
                return str(parsed[key])
    return raw


def _datasets(inputs: object, cleaned: _Cleaned) -> tuple[DatasetNode, ...]:
    """``run.inputs.dataset_inputs`` with a digest each (one of another shape: left out).

    Raises:
        RegistryError: not the shape MLflow documents.
    """
    out = []
    where = "run.inputs.dataset_inputs"
    for item in _array(_object(inputs, "run.inputs").get("dataset_inputs"), where):
        entry = _object(item, f"an entry of {where}", required=True)
        dataset = _object(entry.get("dataset"), f"{where}[].dataset")
        digest = cleaned.token(
            _text(dataset.get("digest"), f"{where}[].dataset.digest"), "dataset digest"
        )
        if digest:
            context = _kv(entry.get("tags"), f"{where}[].tags", cleaned).get(
                "mlflow.data.context", ""
            )
            name = _text(dataset.get("name"), f"{where}[].dataset.name")
            source = _dataset_source(_text(dataset.get("source"), f"{where}[].dataset.source"))
            out.append(
                DatasetNode(
                    digest=digest,
                    name=cleaned.text(name, "dataset name", MAX_NAME),
                    source=cleaned.text(source, "dataset source", MAX_TEXT),
                    context=cleaned.text(context, "dataset context", MAX_NAME),
                )
            )
    if len(out) > MAX_ITEMS:
        cleaned.note(f"datasets past {MAX_ITEMS}")
    return tuple(out[:MAX_ITEMS])


def _aliases(value: object) -> tuple[str, ...]:
    """``model_version.aliases``: a list of alias names, each once."""
    out: dict[str, None] = {}
    for item in _array(value, "model_version.aliases"):
        if not isinstance(item, str):
            raise RegistryError(f"MLflow sent an alias as {_kind(item)}, not text")
        out[check_text(item, "model_version.aliases[]", required=True, limit=MAX_NAME)] = None
    return tuple(out)[:MAX_ITEMS]


def registration_from_mlflow(
    model_version: Mapping[str, Any], run: Mapping[str, Any] | None, base_url: str
) -> Registration:
    """Build a ``Registration`` from MLflow's model-version and run JSON.

    Values of another shape than the API accepts are left out or cleaned,
    and one warning counts them (see the module's docstring).

    Raises:
        RegistryError: the JSON is not of the shape MLflow documents, or an
            id the link is made of is one no store keeps or no terminal
            should print; the message names MLflow and the field.
    """
    cleaned = _Cleaned()
    try:
        registration = _registration(
            _object(model_version, "model_version", required=True), run, base_url, cleaned
        )
    except LineageError as exc:
        raise RegistryError(f"MLflow sent unusable lineage: {exc}") from None
    if registration.model is not None:
        cleaned.log(registration.model.name, registration.model.version)
    return registration


def _model(model_version: Mapping[str, Any], cleaned: _Cleaned) -> ModelVersionNode:
    name = _text(model_version.get("name"), "model_version.name")
    version = _text(model_version.get("version"), "model_version.version")
    tags = _kv(model_version.get("tags"), "model_version.tags", cleaned)
    registry_id = _text(model_version.get("model_id"), "model_version.model_id")
    return ModelVersionNode(
        name=name,
        version=version,
        registry="mlflow",
        registry_id=cleaned.text(registry_id or f"{name}/{version}", "model id", MAX_NAME),
        source=cleaned.text(
            _text(model_version.get("source"), "model_version.source"), "model source", MAX_TEXT
        ),
        aliases=_aliases(model_version.get("aliases")),
        artifact_digest=cleaned.token(tags.get("predtrace.artifact_digest", ""), "artifact digest"),
    )


def _registration(
    model_version: Mapping[str, Any],
    run: Mapping[str, Any] | None,
    base_url: str,
    cleaned: _Cleaned,
) -> Registration:
    model = _model(model_version, cleaned)
    if run is None:
        return Registration(model=model, source="mlflow")
    run = _object(run, "run", required=True)
    info, data = _object(run.get("info"), "run.info"), _object(run.get("data"), "run.data")
    tags = _kv(data.get("tags"), "run.data.tags", cleaned, skip=_SKIPPED_TAGS)
    run_id = _text(info.get("run_id"), "run.info.run_id") or _text(
        model_version.get("run_id"), "model_version.run_id"
    )
    commit_sha = cleaned.token(tags.get(_COMMIT_TAG, ""), "commit")
    repo = next((tags[t] for t in _REPO_TAGS if tags.get(t)), "")
    experiment = _text(info.get("experiment_id"), "run.info.experiment_id")
    url = f"{base_url.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    run_name = _text(info.get("run_name"), "run.info.run_name")
    return Registration(
        model=model,
        run=RunNode(
            run_id=run_id,
            registry="mlflow",
            name=cleaned.text(run_name, "run name", MAX_NAME),
            url=cleaned.text(url, "run url", MAX_TEXT),
            params=_kv(data.get("params"), "run.data.params", cleaned),
            metrics=_metrics(data.get("metrics"), cleaned),
            tags=tags,
        ),
        datasets=_datasets(run.get("inputs"), cleaned),
        commit=CommitNode(sha=commit_sha, repo=cleaned.text(repo, "commit repo", MAX_TEXT))
        if commit_sha
        else None,
        source="mlflow",
    )


def _put(cache: OrderedDict[K, V], key: K, value: V, limit: int) -> None:
    """Store ``value`` as the newest entry; drop the oldest beyond ``limit``."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)


class MlflowRegistry:
    """Reads lineage from an MLflow tracking server; one per event loop.

    ``lookup`` answers from the cache while fresh, else asks MLflow; a missing
    model version is remembered as None for ``negative_ttl`` seconds, and so
    is a failed lookup (it raises again, without a request, until then). While
    MLflow is down (unreachable, or ``mark_down`` after a caller's deadline)
    nothing is asked for ``negative_ttl`` seconds.
    """

    def __init__(
        self, config: MlflowConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        self._cache: OrderedDict[tuple[str, str], tuple[float, Registration | None]] = OrderedDict()
        self._aliases: OrderedDict[tuple[str, str], tuple[float, str | None]] = OrderedDict()
        self._failures: OrderedDict[tuple[str, str, str], tuple[float, str]] = OrderedDict()
        self._down: tuple[float, str] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0

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
        if status == 200:
            return _parse(body, path)
        if status == 404 or (status == 400 and _error_code(body) in _MISSING_CODES):
            return None
        raise RegistryError(f"MLflow answered {status} for {path}")

    def mark_down(self, reason: str) -> None:
        """Ask MLflow nothing for ``negative_ttl`` seconds (lookups raise ``reason``)."""
        self._down = (self._clock(), reason)

    def _check_backoff(self, key: tuple[str, str, str]) -> None:
        """Raise RegistryBackoffError while MLflow is down or ``key`` failed recently."""
        now, ttl = self._clock(), self.config.negative_ttl
        for entry in (self._down, self._failures.get(key)):
            if entry is not None and now - entry[0] < ttl:
                next_try = math.ceil(ttl - (now - entry[0]))
                raise RegistryBackoffError(f"{entry[1]} (next try in {next_try} s)")

    def _failed(self, key: tuple[str, str, str], reason: str) -> None:
        _put(self._failures, key, (self._clock(), reason), self.config.max_entries)

    def cached(self, name: str, version: str) -> tuple[bool, Registration | None]:
        """Return (fresh, value) from the cache without any request."""
        entry = self._cache.get((name, version))
        if entry is None:
            return False, None
        fetched, value = entry
        ttl = self.config.ttl if value is not None else self.config.negative_ttl
        return self._clock() - fetched < ttl, value

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

        Raises:
            RegistryBackoffError: the same lookup failed, or MLflow was down,
                less than ``negative_ttl`` seconds ago (nothing asked).
            RegistryError: MLflow unreachable, answering errors or malformed JSON.
        """
        fresh, value = self.cached(name, version)
        if fresh:
            return value
        key = ("version", name, version)
        self._check_backoff(key)
        try:
            registration = await self._fetch(name, version)
        except RegistryError as exc:
            self._failed(key, str(exc))
            raise
        self._failures.pop(key, None)
        _put(self._cache, (name, version), (self._clock(), registration), self.config.max_entries)
        if registration is not None and registration.model is not None:
            for alias in registration.model.aliases:
                self._remember_alias(name, alias, version)
        return registration

    async def _fetch(self, name: str, version: str) -> Registration | None:
        found = await self._get("/model-versions/get", {"name": name, "version": version})
        if found is None:
            return None
        model_version = _object(
            found.get("model_version"), "model-versions/get's model_version", required=True
        )
        answered = _text(model_version.get("name"), "model_version.name")
        if not answered:
            raise RegistryError(f"MLflow sent model version {name}/{version} without a name")
        if answered != name:
            raise RegistryError(f"MLflow answered model {answered[:64]!r} when asked for {name!r}")
        if _text(model_version.get("version"), "model_version.version") != version:
            return None  # MLflow read "01" as 1: no version is spelled as asked
        run = None
        run_id = _text(model_version.get("run_id"), "model_version.run_id")
        if run_id:
            got = await self._get("/runs/get", {"run_id": run_id})
            if got is not None:  # a deleted run: the model version without it
                run = _object(got.get("run"), "runs/get's run", required=True)
        return registration_from_mlflow(model_version, run, self.config.url)

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
        self._check_backoff(key)
        try:
            version = await self._fetch_alias(name, alias)
        except RegistryError as exc:
            self._failed(key, str(exc))
            raise
        self._failures.pop(key, None)
        self._remember_alias(name, alias, version)
        if version is not None:
            self._forget_stale(name, alias, version)
        return version

    async def _fetch_alias(self, name: str, alias: str) -> str | None:
        found = await self._get("/registered-models/alias", {"name": name, "alias": alias})
        if found is None:
            return None
        model_version = _object(
            found.get("model_version"), "registered-models/alias's model_version", required=True
        )
        answered = _text(model_version.get("name"), "model_version.name")
        if answered and answered != name:
            raise RegistryError(f"MLflow answered model {answered[:64]!r} when asked for {name!r}")
        version = _text(model_version.get("version"), "model_version.version")
        if not version:
            raise RegistryError(f"MLflow's answer for alias {alias!r} names no version")
        try:
            return check_text(version, "model_version.version")
        except LineageError as exc:
            raise RegistryError(f"MLflow sent unusable lineage: {exc}") from None

    def _forget_stale(self, name: str, alias: str, version: str) -> None:
        """Drop cached versions of ``name`` whose aliases contradict alias -> version."""
        for (cached_name, cached_version), (_, value) in list(self._cache.items()):
            if cached_name != name or value is None or value.model is None:
                continue
            if (alias in value.model.aliases) != (cached_version == version):
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
        raise RegistryError(f"MLflow sent {_kind(parsed)} for {path}, not a JSON object")
    return parsed
