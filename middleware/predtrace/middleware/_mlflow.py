"""``MlflowResolver``: stamps predictions with the MLflow run behind the model version.

Asks the MLflow tracking server's REST API (no ``mlflow`` import), from the
``ResolverCache``'s background thread only, never on the request path:

* ``GET /api/2.0/mlflow/model-versions/get?name=N&version=V`` gives the run id,
  the source and, in MLflow 3, the logged model id;
* a version given as ``@alias`` (or an alias-only config) goes through
  ``GET /api/2.0/mlflow/registered-models/alias`` first.

MLflow keeps no digest of the artifact itself; a model version tagged
``predtrace.artifact_digest`` (e.g. by the CI job that built it) provides one.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any, Final

from predtrace.middleware import environment_variables as env
from predtrace.middleware._errors import ConfigError
from predtrace.middleware._registry import ResolvedModel

DIGEST_TAG: Final = "predtrace.artifact_digest"
"""Model-version tag read as the artifact digest."""

_API: Final = "/api/2.0/mlflow"
_MAX_ANSWER_BYTES: Final = 1024 * 1024


class MlflowError(Exception):
    """The tracking server could not answer (retried later by the cache)."""


class MlflowResolver:
    """A ``ModelResolver`` backed by an MLflow tracking server's model registry.

    Args:
        tracking_uri: ``http(s)://host:port`` of the tracking server.
        token: bearer token (``MLFLOW_TRACKING_TOKEN``); or ``username`` and
            ``password`` for basic auth. Never logged.
        timeout: seconds per HTTP request.

    Example:
        >>> config = MiddlewareConfig(resolver=MlflowResolver("http://127.0.0.1:5000"), ...)
    """

    def __init__(
        self,
        tracking_uri: str,
        *,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        parsed = urllib.parse.urlsplit(tracking_uri)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(
                f"MLflow tracking URI must be http(s)://host:port, got {tracking_uri!r}"
            )
        if timeout <= 0:
            raise ConfigError("MLflow timeout must be positive")
        self._base = tracking_uri.rstrip("/") + _API
        self._timeout = timeout
        self._headers = {"Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        elif username is not None:
            pair = f"{username}:{password or ''}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> MlflowResolver | None:
        """The resolver ``PREDTRACE_MLFLOW_URL`` asks for, or None when it is unset.

        Credentials come from MLflow's own variables (``MLFLOW_TRACKING_TOKEN``, or
        ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``).

        Raises:
            ConfigError: the URL is not http(s)://host:port.
        """
        url = environ.get(env.PREDTRACE_MLFLOW_URL, "").strip()
        if not url:
            return None
        try:
            return cls(
                url,
                token=environ.get("MLFLOW_TRACKING_TOKEN") or None,
                username=environ.get("MLFLOW_TRACKING_USERNAME"),
                password=environ.get("MLFLOW_TRACKING_PASSWORD"),
            )
        except ConfigError as exc:
            raise ConfigError(f"{env.PREDTRACE_MLFLOW_URL}: {exc}") from None

    def resolve(self, name: str, version: str) -> ResolvedModel | None:
        """Run id, artifact digest and model id of ``name`` at ``version`` (or ``@alias``).

        Returns None when the registry does not know the model or version.

        Raises:
            MlflowError: the server is unreachable or answered something unusable.
        """
        if not name or not version:
            return None
        if version.startswith("@"):
            found = self._get("registered-models/alias", name=name, alias=version[1:])
        else:
            found = self._get("model-versions/get", name=name, version=version)
        if found is None:
            return None
        model_version = found.get("model_version")
        if not isinstance(model_version, dict):
            raise MlflowError("MLflow answer has no model_version")
        tags = {
            str(t.get("key")): str(t.get("value"))
            for t in model_version.get("tags") or []
            if isinstance(t, dict)
        }
        number = str(model_version.get("version") or version)
        return ResolvedModel(
            run_id=str(model_version.get("run_id") or ""),
            artifact_digest=tags.get(DIGEST_TAG, ""),
            registry_model_id=str(model_version.get("model_id") or f"models:/{name}/{number}"),
        )

    def _get(self, path: str, **params: str) -> dict[str, Any] | None:
        url = f"{self._base}/{path}?{urllib.parse.urlencode(params)}"
        request = urllib.request.Request(url, headers=self._headers)  # noqa: S310 - http(s) only
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as resp:  # noqa: S310
                body = resp.read(_MAX_ANSWER_BYTES + 1)
        except urllib.error.HTTPError as exc:
            if exc.code == 404 or _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise MlflowError(f"MLflow answered {exc.code} for {path}") from None
        except (OSError, ValueError) as exc:
            raise MlflowError(f"MLflow unreachable: {type(exc).__name__}") from None
        if len(body) > _MAX_ANSWER_BYTES:
            raise MlflowError(f"MLflow answer for {path} is larger than 1 MiB")
        try:
            answer = json.loads(body)
        except ValueError:
            raise MlflowError(f"MLflow answer for {path} is not JSON") from None
        if not isinstance(answer, dict):
            raise MlflowError(f"MLflow answer for {path} is not an object")
        return answer


def _error_code(exc: urllib.error.HTTPError) -> str:
    """MLflow's ``error_code`` from an error answer (it says 400 for a missing version)."""
    try:
        answer = json.loads(exc.read(64 * 1024))
    except (OSError, ValueError):
        return ""
    return str(answer.get("error_code", "")) if isinstance(answer, dict) else ""
