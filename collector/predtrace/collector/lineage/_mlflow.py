"""The MLflow registry adapter: lineage read over MLflow's REST API, cached.

Model name + version (or alias) -> ``model-versions/get`` (source, run id,
aliases) -> ``runs/get`` (params, metrics, tags with ``mlflow.source.git.commit``
and the repo URL, dataset inputs with digest and source). No ``mlflow`` import:
plain HTTP with aiohttp. Answers are cached for ``ttl`` seconds (misses for
``negative_ttl``) and refreshed on the next lookup after that.
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from predtrace.collector._errors import ConfigError, RegistryError
from predtrace.collector.lineage._model import (
    MAX_ITEMS,
    MAX_TEXT,
    CommitNode,
    DatasetNode,
    ModelVersionNode,
    Registration,
    RunNode,
)

_API = "/api/2.0/mlflow"
_MAX_RESPONSE = 8 * 1024 * 1024
_COMMIT_TAG = "mlflow.source.git.commit"
_REPO_TAGS = ("mlflow.source.git.repoURL", "mlflow.gitRepoURL")


@dataclass(frozen=True, slots=True, kw_only=True)
class MlflowConfig:
    """Where the MLflow tracking server is and how long its answers stay fresh.

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


def _kv(items: object) -> dict[str, str]:
    """MLflow's ``[{key, value}]`` lists as a dict, dropping oversized entries."""
    out: dict[str, str] = {}
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict):
            key, value = str(item.get("key", "")), str(item.get("value", ""))
            if key and len(key) <= MAX_TEXT and len(out) < MAX_ITEMS and "\x00" not in value:
                out[key] = value[:MAX_TEXT]
    return out


def _metrics(items: object) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items if isinstance(items, list) else []:
        value = item.get("value") if isinstance(item, dict) else None
        if isinstance(value, int | float) and math.isfinite(value) and len(out) < MAX_ITEMS:
            out[str(item["key"])[:MAX_TEXT]] = float(value)
    return out


def _dataset_source(raw: str) -> str:
    """MLflow stores a dataset's source as JSON (``{"uri": ...}``); keep the location."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        return raw[:MAX_TEXT]
    if isinstance(parsed, dict):
        for key in ("uri", "url", "path", "table_name"):
            if isinstance(parsed.get(key), str):
                return str(parsed[key])[:MAX_TEXT]
    return raw[:MAX_TEXT]


def _datasets(inputs: Mapping[str, Any]) -> tuple[DatasetNode, ...]:
    out = []
    for item in inputs.get("dataset_inputs") or []:
        dataset = item.get("dataset") or {}
        digest = str(dataset.get("digest") or "")[:MAX_TEXT]
        if digest:
            context = _kv(item.get("tags")).get("mlflow.data.context", "")
            out.append(
                DatasetNode(
                    digest=digest,
                    name=str(dataset.get("name") or "")[:MAX_TEXT],
                    source=_dataset_source(str(dataset.get("source") or "")),
                    context=context,
                )
            )
    return tuple(out[:MAX_ITEMS])


def registration_from_mlflow(
    model_version: Mapping[str, Any], run: Mapping[str, Any] | None, base_url: str
) -> Registration:
    """Build a ``Registration`` from MLflow's model-version and run JSON."""
    name, version = str(model_version["name"]), str(model_version["version"])
    model = ModelVersionNode(
        name=name,
        version=version,
        registry="mlflow",
        registry_id=str(model_version.get("model_id") or f"{name}/{version}")[:MAX_TEXT],
        source=str(model_version.get("source") or "")[:MAX_TEXT],
        aliases=tuple(str(a) for a in model_version.get("aliases") or ()),
        artifact_digest=_kv(model_version.get("tags")).get("predtrace.artifact_digest", ""),
    )
    if run is None:
        return Registration(model=model, source="mlflow")
    info, data = run.get("info") or {}, run.get("data") or {}
    tags = _kv(data.get("tags"))
    run_id = str(info.get("run_id") or model_version.get("run_id"))
    commit_sha = tags.get(_COMMIT_TAG, "")
    repo = next((tags[t] for t in _REPO_TAGS if tags.get(t)), "")
    experiment = info.get("experiment_id", "")
    return Registration(
        model=model,
        run=RunNode(
            run_id=run_id,
            registry="mlflow",
            name=str(info.get("run_name") or ""),
            url=f"{base_url.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}",
            params=_kv(data.get("params")),
            metrics=_metrics(data.get("metrics")),
            tags={k: v for k, v in tags.items() if not k.startswith("mlflow.log-model")},
        ),
        datasets=_datasets(run.get("inputs") or {}),
        commit=CommitNode(sha=commit_sha, repo=repo) if commit_sha else None,
        source="mlflow",
    )


class MlflowRegistry:
    """Reads lineage from an MLflow tracking server; one per event loop.

    ``lookup`` answers from the cache while fresh, else asks MLflow; a missing
    model version is remembered as None for ``negative_ttl`` seconds.
    """

    def __init__(
        self, config: MlflowConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        self._cache: OrderedDict[tuple[str, str], tuple[float, Registration | None]] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0

    async def _get(self, path: str, params: Mapping[str, str]) -> Mapping[str, Any] | None:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.config.timeout)
            self._session = aiohttp.ClientSession(timeout=timeout)
        self.requests += 1
        url = self.config.url.rstrip("/") + _API + path
        try:
            async with self._session.get(url, params=dict(params)) as resp:
                body = await resp.content.read(_MAX_RESPONSE)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RegistryError(f"MLflow unreachable: {type(exc).__name__}") from None
        if status == 404 or (status == 400 and b"RESOURCE_DOES_NOT_EXIST" in body):
            return None
        if status != 200:
            raise RegistryError(f"MLflow answered {status} for {path}")
        try:
            parsed = json.loads(body)
        except ValueError:
            raise RegistryError(f"MLflow sent invalid JSON for {path}") from None
        return parsed if isinstance(parsed, dict) else None

    def cached(self, name: str, version: str) -> tuple[bool, Registration | None]:
        """Return (fresh, value) from the cache without any request."""
        entry = self._cache.get((name, version))
        if entry is None:
            return False, None
        fetched, value = entry
        ttl = self.config.ttl if value is not None else self.config.negative_ttl
        return self._clock() - fetched < ttl, value

    async def lookup(self, name: str, version: str) -> Registration | None:
        """The lineage of model ``name`` version ``version``, or None if MLflow lacks it.

        Raises:
            RegistryError: MLflow unreachable or answering errors.
        """
        fresh, value = self.cached(name, version)
        if fresh:
            return value
        found = await self._get("/model-versions/get", {"name": name, "version": version})
        model_version = (found or {}).get("model_version")
        registration = None
        if isinstance(model_version, dict):
            run = None
            if model_version.get("run_id"):
                got = await self._get("/runs/get", {"run_id": str(model_version["run_id"])})
                run = (got or {}).get("run")
            registration = registration_from_mlflow(model_version, run, self.config.url)
        self._remember((name, version), registration)
        return registration

    def _remember(self, key: tuple[str, str], value: Registration | None) -> None:
        self._cache[key] = (self._clock(), value)
        self._cache.move_to_end(key)
        while len(self._cache) > self.config.max_entries:
            self._cache.popitem(last=False)

    async def resolve_alias(self, name: str, alias: str) -> str | None:
        """The version an alias points at now, or None.

        Raises:
            RegistryError: MLflow unreachable or answering errors.
        """
        found = await self._get("/registered-models/alias", {"name": name, "alias": alias})
        model_version = (found or {}).get("model_version")
        return str(model_version["version"]) if isinstance(model_version, dict) else None

    async def close(self) -> None:
        """Close the HTTP session. Safe twice."""
        if self._session is not None:
            await self._session.close()
            self._session = None
