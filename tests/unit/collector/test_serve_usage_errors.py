"""`collector serve`: bad settings are usage errors that name the flag and its variable.

Every check here runs before the collector listens (so a regression that lets a
bad value through would serve until the timeout); store errors name the store.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from predtrace.collector import CollectorConfig, ConfigError
from predtrace.collector._cli import collector_group
from predtrace.collector._cli_collector import token_command
from predtrace.collector._cli_registration import register_command
from predtrace.collector.store import open_store

LISTEN = ["--listen", "127.0.0.1:0"]


def _serve(*flags: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(collector_group, ["serve", *flags], env=env)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("port", ["notaport", "99999", "0", "-1"])
def test_a_postgres_url_with_a_bad_port_is_a_usage_error_naming_db(port: str) -> None:
    result = _serve("--db", f"postgresql://user:pw@127.0.0.1:{port}/x", *LISTEN)
    assert result.exit_code == 2, result.output
    assert "--db: the port must be a number in 1..65535" in result.stderr
    assert "Traceback" not in result.output and "pw" not in result.stderr


@pytest.mark.timeout(10)
@pytest.mark.parametrize("password", ["Hunter2#x", "Hunter2/x", "Hunter2?x"])
def test_a_password_that_cuts_the_url_is_refused_without_showing_it(password: str) -> None:
    # urlsplit ends the host part at '#', '/' or '?': the password was read
    # as the port, and quoted ("not 'Hunter2'").
    db = f"postgresql://app:{password}@127.0.0.1:5432/db"
    result = _serve("--db", db, *LISTEN)
    assert result.exit_code == 2, result.output
    assert "--db: the URL's user name or password holds '/', '?' or '#'" in result.stderr
    assert "Hunter2" not in result.output
    with pytest.raises(ConfigError) as raised:
        open_store(db)  # the library's way in
    assert "Hunter2" not in str(raised.value)


def test_an_at_sign_in_a_query_value_is_no_password() -> None:
    for db in (
        "postgresql://localhost/db?user=admin@srv",
        "postgresql://h/db?application_name=a@b",
    ):
        assert CollectorConfig(db=db).db == db


def test_a_postgres_url_with_several_good_hosts_is_accepted() -> None:
    for db in ("postgresql://u:p@[::1]:5432,127.0.0.1:5433/x?schema=s", "postgres://h:/x"):
        assert CollectorConfig(db=db).db == db
    with pytest.raises(ConfigError, match="not '6543x'"):
        CollectorConfig(db="postgresql://127.0.0.1:5432,127.0.0.1:6543x/x")


@pytest.mark.timeout(10)
def test_a_url_given_to_listen_is_refused_before_any_lookup(tmp_path: Path) -> None:
    result = _serve("--db", f"sqlite:///{tmp_path}/c.db", "--listen", "http://127.0.0.1:0")
    assert result.exit_code == 2
    assert "--listen is HOST:PORT, not a URL" in result.stderr


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("PREDTRACE_COLLECTOR_DB", "mysql://x", "unsupported --db (PREDTRACE_COLLECTOR_DB)"),
        ("PREDTRACE_COLLECTOR_DB", "sqlite://", "--db (PREDTRACE_COLLECTOR_DB): a sqlite"),
        ("PREDTRACE_COLLECTOR_LISTEN", "bad", "--listen (PREDTRACE_COLLECTOR_LISTEN) must be"),
        (
            "PREDTRACE_COLLECTOR_MAX_BODY_BYTES",
            "0",
            "max_body_bytes (PREDTRACE_COLLECTOR_MAX_BODY_BYTES) must be > 0",
        ),
        (
            "PREDTRACE_COLLECTOR_MAX_ANSWER_BYTES",
            "-1",
            "max_answer_bytes (PREDTRACE_COLLECTOR_MAX_ANSWER_BYTES) must be > 0, got -1",
        ),
        (
            "PREDTRACE_COLLECTOR_MAX_CONNECTIONS",
            "0",
            "max_connections (PREDTRACE_COLLECTOR_MAX_CONNECTIONS) must be > 0",
        ),
        (
            "PREDTRACE_COLLECTOR_MAX_INFLIGHT_BYTES",
            "1",
            "max_inflight_bytes (PREDTRACE_COLLECTOR_MAX_INFLIGHT_BYTES) must be >=",
        ),
    ],
)
def test_an_error_from_a_variable_names_the_variable(
    variable: str, value: str, named: str, tmp_path: Path
) -> None:
    flags = {
        "PREDTRACE_COLLECTOR_DB": ["--db", f"sqlite:///{tmp_path}/c.db"],
        "PREDTRACE_COLLECTOR_LISTEN": LISTEN,
    }
    given = [f for name, pair in flags.items() if name != variable for f in pair]
    result = _serve(*given, env={variable: value})
    assert result.exit_code == 2, result.output
    assert named in result.stderr


def test_a_flag_wins_over_its_variable_and_its_errors_name_the_flag_only() -> None:
    env = {"PREDTRACE_COLLECTOR_LISTEN": "bad", "PREDTRACE_COLLECTOR_DB": "mysql://x"}
    config = CollectorConfig.from_env(env, listen="127.0.0.1:0", db="store.db")
    assert (config.listen, config.db, config.from_environment) == ("127.0.0.1:0", "store.db", ())
    with pytest.raises(ConfigError, match=r"^--listen must be HOST:PORT"):
        CollectorConfig.from_env({}, listen="bad")


def test_serve_help_lists_the_variables_it_reads() -> None:
    text = _serve("--help").output
    for variable in (
        "PREDTRACE_COLLECTOR_DB",
        "PREDTRACE_COLLECTOR_LISTEN",
        "PREDTRACE_COLLECTOR_TOKENS",
        "PREDTRACE_COLLECTOR_TLS_CERT",
        "PREDTRACE_COLLECTOR_TLS_KEY",
        "PREDTRACE_COLLECTOR_MAX_BODY_BYTES",
        "PREDTRACE_COLLECTOR_MAX_INFLIGHT_BYTES",
        "PREDTRACE_COLLECTOR_MAX_ANSWER_BYTES",
        "PREDTRACE_COLLECTOR_MAX_CONNECTIONS",
        "PREDTRACE_RETENTION_PREDICTIONS_DAYS",
        "PREDTRACE_RETENTION_BATCHES_DAYS",
        "MLFLOW_TRACKING_URI",
    ):
        assert variable in text, variable


def test_every_option_of_token_and_lineage_register_has_help() -> None:
    for command in (token_command, register_command):
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, (command.name, param.name)


@pytest.mark.timeout(10)
def test_a_sqlite_file_that_is_a_folder_is_named(tmp_path: Path) -> None:
    result = _serve("--db", f"sqlite:///{tmp_path}", *LISTEN)
    assert result.exit_code == 1
    assert f"cannot open the --db file {tmp_path}:" in result.stderr


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port held bound but not listening: a connection is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.timeout(30)
def test_a_postgres_server_it_cannot_reach_is_named_without_the_password(
    closed_port: int,
) -> None:
    pytest.importorskip("asyncpg")
    result = _serve("--db", f"postgresql://u:secretpw@127.0.0.1:{closed_port}/x", *LISTEN)
    assert result.exit_code == 1
    assert f"--db store postgresql://127.0.0.1:{closed_port}/x:" in result.stderr
    assert "secretpw" not in result.output


@pytest.mark.timeout(10)
def test_a_sqlite_url_with_options_is_refused_not_made_a_file_name(tmp_path: Path) -> None:
    # Was: a file named "c.db?mode=ro", created beside the one meant.
    result = _serve("--db", f"sqlite:///{tmp_path}/c.db?mode=ro", *LISTEN)
    assert result.exit_code == 2, result.output
    assert "--db: a sqlite URL takes no options" in result.stderr
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="takes no options"):
        open_store(f"sqlite:///{tmp_path}/c.db?mode=ro")
