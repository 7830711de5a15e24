"""A collector URL with ``user:password@`` is a usage error that never quotes the credentials.

The query CLI used to pass such a URL to urllib, which took
``admin:s3cret@127.0.0.1`` for a host name: exit 1 with "cannot reach the
collector at http://admin:s3cret@...: Name or service not known", the
password on stderr and the blame on DNS. The README says such a URL is
refused in favour of a bearer token; now it is (exit 2), and the message
says to give --token or PREDTRACE_TOKEN, quoting the URL without them.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from predtrace.cli import main
from predtrace.collector._client import QueryClient, without_userinfo
from predtrace.collector._errors import ConfigError

SECRET_URLS = [
    "http://admin:s3cret@127.0.0.1:9",
    "https://admin:s3cret@collector.example:8443/",
    "http://s3cret@127.0.0.1:9",  # a token put where a user name goes
    "http://admin:s3/cret@127.0.0.1:9",  # "/" ends urlsplit's host part before the "@"
    "http://admin:s3?cret@127.0.0.1:9",
    "http://admin:s3cret@[::1:9",  # an unbalanced IPv6 bracket: urlsplit raises
    "http://admin:s3cret@127.0.0.1:99999",  # and a port out of range
]


@pytest.mark.parametrize("url", SECRET_URLS)
def test_the_client_refuses_a_url_with_credentials_without_quoting_them(url: str) -> None:
    with pytest.raises(ConfigError) as raised:
        QueryClient(url, "pt_token")
    message = str(raised.value)
    assert "s3" not in message and "cret" not in message and "admin" not in message
    assert "must not carry a user name or password" in message
    assert "--token or PREDTRACE_TOKEN" in message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://admin:s3cret@127.0.0.1:8700", "http://127.0.0.1:8700"),
        ("http://admin:s3/cret@host:1/x", "http://host:1/x"),
        ("http://a@b@host", "http://host"),
        ("http://127.0.0.1:8700", "http://127.0.0.1:8700"),
        ("admin:s3cret@host", "host"),
    ],
)
def test_without_userinfo_keeps_only_what_follows_the_last_at(url: str, shown: str) -> None:
    assert without_userinfo(url) == shown


@pytest.mark.parametrize(
    "command",
    [["completeness"], ["trace", "4bf92f3577b34da6a3ce929d0e0e4736"], ["model", "lineage", "m/1"]],
)
def test_the_cli_says_to_use_a_token_exits_2_and_never_prints_the_password(
    command: list[str],
) -> None:
    url = "http://admin:s3cret@127.0.0.1:9"
    for how in ("option", "environment"):
        if how == "option":
            result = CliRunner().invoke(main, [*command, "--collector", url, "--retry-for", "0"])
        else:
            env = {"PREDTRACE_COLLECTOR_URL": url}
            result = CliRunner().invoke(main, [*command, "--retry-for", "0"], env=env)
        assert result.exit_code == 2, (how, result.output)
        assert "s3cret" not in result.output and "admin" not in result.output
        assert "cannot reach" not in result.output
        assert "give a bearer token with --token or PREDTRACE_TOKEN" in result.stderr
        assert "'http://127.0.0.1:9'" in result.stderr


def test_lineage_register_refuses_it_too() -> None:
    args = ["lineage", "register", "--model", "m/1", "--retry-for", "0"]
    result = CliRunner().invoke(main, [*args, "--collector", "http://ci:pw-123@127.0.0.1:9"])
    assert result.exit_code == 2
    assert "pw-123" not in result.output and "--token or PREDTRACE_TOKEN" in result.stderr
