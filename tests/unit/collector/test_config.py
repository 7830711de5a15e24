"""Collector settings: flags and environment, validated at startup."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from predtrace.collector import CollectorConfig, ConfigError, RetentionPolicy, _app, open_store
from predtrace.collector._api import QueryApi
from predtrace.collector._app import build_app
from predtrace.collector._cli import collector_group
from predtrace.collector._config import MAX_RETENTION_DAYS, parse_listen


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


NOT_A_RETENTION = [math.nan, math.inf, -math.inf, 1e300, 1e10, MAX_RETENTION_DAYS + 1]


@pytest.mark.parametrize("days", NOT_A_RETENTION, ids=repr)
def test_retention_days_not_finite_or_past_a_century_are_refused_naming_the_setting(
    days: float,
) -> None:
    with pytest.raises(ConfigError, match=r"predictions retention \(--retention-days"):
        RetentionPolicy(predictions_days=days)
    with pytest.raises(ConfigError, match="PREDTRACE_RETENTION_BATCHES_DAYS"):
        RetentionPolicy(batches_days=days)
    with pytest.raises(ConfigError, match="chain events retention"):
        RetentionPolicy(chain_events_days=days)


@pytest.mark.parametrize("text", ["nan", "inf", "1e400", "1e10"])
def test_retention_days_from_the_environment_are_refused_at_startup(text: str) -> None:
    with pytest.raises(ConfigError, match="PREDTRACE_RETENTION_PREDICTIONS_DAYS"):
        CollectorConfig.from_env({"PREDTRACE_RETENTION_PREDICTIONS_DAYS": text})


@pytest.mark.parametrize("interval", [math.nan, math.inf])
def test_a_retention_interval_that_is_not_finite_is_refused(interval: float) -> None:
    with pytest.raises(ConfigError, match="retention interval"):
        RetentionPolicy(predictions_days=1, interval_s=interval)


@pytest.mark.timeout(10)  # without the check it would serve until killed
@pytest.mark.parametrize("days", ["nan", "1e10"])
def test_serve_refuses_retention_days_that_would_break_every_pass_before_it_listens(
    days: str, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path}/c.db"
    flags = ["serve", "--db", db, "--listen", "127.0.0.1:0", "--retention-days", days]
    result = CliRunner().invoke(collector_group, flags)
    assert result.exit_code == 2  # a usage error (DESIGN §7), as sidecar serve answers
    assert "predictions retention (--retention-days" in result.stderr


def test_the_retention_days_flag_sets_predictions_only_and_keeps_the_batches_setting() -> None:
    environ = {
        "PREDTRACE_RETENTION_BATCHES_DAYS": "90",
        "PREDTRACE_RETENTION_PREDICTIONS_DAYS": "7",
    }
    config = CollectorConfig.from_env(environ, retention_days=30.0)
    assert (config.retention.predictions_days, config.retention.batches_days) == (30.0, 90.0)
    assert CollectorConfig.from_env(environ).retention.predictions_days == 7.0


@pytest.mark.timeout(10)  # without the check it would serve until killed
def test_serve_refuses_zero_retention_days_instead_of_ignoring_them(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/c.db"
    flags = ["serve", "--db", db, "--listen", "127.0.0.1:0", "--retention-days", "0"]
    result = CliRunner().invoke(collector_group, flags)
    assert result.exit_code == 2
    assert "predictions retention (--retention-days" in result.stderr


@pytest.mark.timeout(10)
def test_serve_names_a_bad_db_scheme_as_usage_and_a_ready_file_path_it_cannot_write(
    tmp_path: Path,
) -> None:
    scheme = CliRunner().invoke(
        collector_group, ["serve", "--db", "mysql://x/y", "--listen", "127.0.0.1:0"]
    )
    assert scheme.exit_code == 2
    assert "unsupported --db URL scheme 'mysql'" in scheme.stderr
    ready = tmp_path / "missing-dir" / "ready"
    flags = ["serve", "--db", f"sqlite:///{tmp_path}/c.db", "--listen", "127.0.0.1:0"]
    result = CliRunner().invoke(collector_group, [*flags, "--ready-file", str(ready)])
    assert result.exit_code == 1
    assert f"cannot start the collector: {ready.parent}" in result.stderr  # not "cannot listen"
    assert "cannot listen" not in result.stderr


def test_the_query_answer_budget_comes_from_the_environment_and_reaches_the_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"PREDTRACE_COLLECTOR_MAX_ANSWER_BYTES": str(3 * 1024 * 1024)}
    config = CollectorConfig.from_env(env, db=f"sqlite:///{tmp_path}/c.db")
    assert config.max_answer_bytes == 3 * 1024 * 1024
    built: list[QueryApi] = []

    class Recorded(QueryApi):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(_app, "QueryApi", Recorded)
    build_app(config)
    assert [api.answers.budget.cap for api in built] == [3 * 1024 * 1024]
    with pytest.raises(ConfigError, match="PREDTRACE_COLLECTOR_MAX_ANSWER_BYTES must be"):
        CollectorConfig.from_env({"PREDTRACE_COLLECTOR_MAX_ANSWER_BYTES": "lots"})
    with pytest.raises(ConfigError, match="max_answer_bytes must be > 0"):
        CollectorConfig(max_answer_bytes=0)
