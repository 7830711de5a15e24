"""Collector settings: flags and environment, validated at startup."""

from __future__ import annotations

import pytest

from predtrace.collector import CollectorConfig, ConfigError, RetentionPolicy, open_store
from predtrace.collector._config import parse_listen


def test_settings_come_from_the_environment_and_flags_win() -> None:
    env = {
        "PREDTRACE_COLLECTOR_DB": "sqlite:////tmp/x.db",
        "PREDTRACE_COLLECTOR_LISTEN": "0.0.0.0:9000",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "PREDTRACE_RETENTION_PREDICTIONS_DAYS": "30",
    }
    config = CollectorConfig.from_env(env, listen="127.0.0.1:0")
    assert (config.db, config.listen, config.mlflow_url) == (
        "sqlite:////tmp/x.db",
        "127.0.0.1:0",
        "http://127.0.0.1:5000",
    )
    assert config.retention.predictions_days == 30


def test_a_non_http_mlflow_tracking_uri_is_ignored() -> None:
    assert (
        CollectorConfig.from_env({"MLFLOW_TRACKING_URI": "file:///tmp/mlruns"}).mlflow_url is None
    )


@pytest.mark.parametrize("listen", ["8700", ":80", "host:http", "h:70000"])
def test_a_bad_listen_address_is_refused(listen: str) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_listen(listen)


def test_ipv6_listen_addresses_parse() -> None:
    assert parse_listen("[::1]:0") == ("::1", 0)


@pytest.mark.parametrize("url", ["mysql://x", "sqlite://", "sqlite:///:memory:"])
def test_unsupported_db_urls_are_refused(url: str) -> None:
    with pytest.raises(ConfigError):
        open_store(url)


def test_retention_days_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="predictions retention"):
        RetentionPolicy(predictions_days=0)
