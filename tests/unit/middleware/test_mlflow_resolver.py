"""MlflowResolver's configuration and failure modes (the real server is in integration)."""

from __future__ import annotations

import socket

import pytest

from predtrace.middleware import ConfigError, MiddlewareConfig, MlflowResolver
from predtrace.middleware._mlflow import MlflowError


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("url", ["file:///tmp/mlruns", "sqlite:///mlflow.db", "mlflow:5000", ""])
def test_a_non_http_tracking_uri_fails_at_startup(url: str) -> None:
    with pytest.raises(ConfigError, match="http"):
        MlflowResolver(url)


def test_from_env_is_off_without_the_variable_and_names_it_when_wrong() -> None:
    assert MlflowResolver.from_env({"MLFLOW_TRACKING_URI": "http://x:5000"}) is None
    base = {"PREDTRACE_COLLECTOR_URL": "http://127.0.0.1:8700"}
    with pytest.raises(ConfigError, match="PREDTRACE_MLFLOW_URL"):
        MiddlewareConfig.from_env({**base, "PREDTRACE_MLFLOW_URL": "file:///mlruns"})
    assert MiddlewareConfig.from_env(base).resolver is None
    config = MiddlewareConfig.from_env({**base, "PREDTRACE_MLFLOW_URL": "http://127.0.0.1:5000"})
    assert isinstance(config.resolver, MlflowResolver)


def test_an_unreachable_server_raises_for_the_cache_to_retry() -> None:
    resolver = MlflowResolver(f"http://127.0.0.1:{_closed_port()}", timeout=2)
    with pytest.raises(MlflowError, match="unreachable"):
        resolver.resolve("churn", "1")


def test_nothing_to_ask_without_a_name_and_version() -> None:
    resolver = MlflowResolver(f"http://127.0.0.1:{_closed_port()}")
    assert resolver.resolve("churn", "") is None
    assert resolver.resolve("", "1") is None
