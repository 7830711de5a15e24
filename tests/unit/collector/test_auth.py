"""Tokens: hashed in the file, scopes, producer binding, never echoed."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request
from click.testing import CliRunner

from predtrace.collector import ConfigError, Scope, TokenTable, hash_token, new_token
from predtrace.collector._auth import bearer, is_loopback
from predtrace.collector._cli import collector_group
from predtrace.collector._security import Authorizer, AuthRefusal
from predtrace.wire import restarted_producer_id


def _table(tmp_path: Path, body: str) -> TokenTable:
    path = tmp_path / "tokens.toml"
    path.write_text(body)
    return TokenTable.load(path)


def test_a_token_is_found_by_its_hash_with_its_scopes_and_producers(tmp_path: Path) -> None:
    token = new_token()
    table = _table(
        tmp_path,
        f'[[token]]\nname = "edge"\nsha256 = "{hash_token(token)}"\n'
        'scopes = ["ingest"]\nproducers = ["edge-*"]\n',
    )
    entry = table.authenticate(token)
    assert entry is not None and entry.name == "edge"
    assert entry.allows(Scope.INGEST) and not entry.allows(Scope.READ)
    assert entry.allows_producer("edge-7") and not entry.allows_producer("pod-1")
    assert table.authenticate(token + "x") is None


def test_a_made_token_for_a_producer_also_allows_its_restarted_id_and_nothing_else(
    tmp_path: Path,
) -> None:
    made = CliRunner().invoke(
        collector_group, ["token", "--name", "edge", "--scope", "ingest", "--producer", "edge-7"]
    )
    assert made.exit_code == 0, made.output
    token = made.stderr.rsplit(" ", 1)[-1].strip()
    entry = _table(tmp_path, made.stdout).authenticate(token)
    assert entry is not None
    assert entry.allows_producer("edge-7")
    assert entry.allows_producer(restarted_producer_id("edge-7"))
    for other in ("edge-70", "edge-7-rabc", "edge-7-r0a1b2c3", "edge-8-r0a1b2c", "x-edge-7"):
        assert not entry.allows_producer(other), other


def test_a_binding_is_only_its_patterns_no_implied_restart_ids(tmp_path: Path) -> None:
    token = new_token()
    table = _table(
        tmp_path,
        f'[[token]]\nsha256 = "{hash_token(token)}"\nscopes = ["ingest"]\nproducers = ["edge"]\n',
    )
    entry = table.authenticate(token)
    assert entry is not None
    assert entry.allows_producer("edge") and not entry.allows_producer("edge-r000001")


def test_admin_carries_every_scope_and_producer(tmp_path: Path) -> None:
    token = new_token()
    table = _table(tmp_path, f'[[token]]\nsha256 = "{hash_token(token)}"\nscopes = ["admin"]\n')
    entry = table.authenticate(token)
    assert entry is not None
    assert all(entry.allows(s) for s in Scope) and entry.allows_producer("any")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("", "no \\[\\[token\\]\\] entries"),
        ('[[token]]\nsha256 = "abc"\nscopes = ["read"]\n', "64 lower-case hex"),
        (f'[[token]]\nsha256 = "{"a" * 64}"\nscopes = ["root"]\n', "scopes are"),
        (f'[[token]]\nsha256 = "{"a" * 64}"\nscopes = []\n', "at least one scope"),
        ("not toml [", "cannot read tokens file"),
        (
            f'[[token]]\nsha256 = "{"a" * 64}"\nscopes = ["ingest"]\nproducers = [""]\n',
            "a producer glob is empty",
        ),
    ],
)
def test_a_bad_tokens_file_fails_at_startup(tmp_path: Path, body: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        _table(tmp_path, body)


def test_bearer_header_and_loopback_parsing() -> None:
    assert bearer("Bearer abc") == "abc"
    assert bearer("Basic abc") is None and bearer(None) is None and bearer("Bearer ") is None
    assert is_loopback("127.0.0.1") and is_loopback("::1")
    assert not is_loopback("10.0.0.1") and not is_loopback(None)


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [("127.0.0.1", True), ("::1", True), ("10.1.2.3", False), ("192.0.2.7", False)],
)
def test_without_tokens_only_loopback_peers_are_served(peer: str, allowed: bool) -> None:
    class _Transport:
        def get_extra_info(self, name: str, default: object = None) -> object:
            return (peer, 40000) if name == "peername" else default

    request = make_mocked_request("GET", "/v1/traces/x", transport=_Transport())
    assert request.remote == peer
    authorizer = Authorizer(None)
    if allowed:
        assert authorizer.check(request, Scope.READ) is None
    else:
        with pytest.raises(AuthRefusal) as refused:
            authorizer.check(request, Scope.INGEST)
        assert refused.value.status == 403
        assert "only loopback clients" in refused.value.reason


def test_with_tokens_the_answer_never_quotes_the_token(tmp_path: Path) -> None:
    token = new_token()
    table = _table(tmp_path, f'[[token]]\nsha256 = "{hash_token(token)}"\nscopes = ["read"]\n')
    wrong = new_token()
    request = make_mocked_request(
        "POST", "/v1/batches", headers={"Authorization": f"Bearer {wrong}"}
    )
    with pytest.raises(AuthRefusal) as refused:
        Authorizer(table).check(request, Scope.INGEST)
    assert refused.value.status == 401 and wrong not in refused.value.reason
    good = make_mocked_request("POST", "/v1/batches", headers={"Authorization": f"Bearer {token}"})
    with pytest.raises(AuthRefusal) as scoped:
        Authorizer(table).check(good, Scope.INGEST)
    assert scoped.value.status == 403 and token not in scoped.value.reason


def test_a_made_token_entry_loads_whatever_its_name_holds(tmp_path: Path) -> None:
    # json.dumps wrote "🚀" as a surrogate pair, which TOML refuses: the
    # collector would not start with the entry it had just printed.
    name = 'edge 🚀 "east"\x7f\\'
    made = CliRunner().invoke(
        collector_group,
        ["token", "--name", name, "--scope", "ingest", "--producer", "édge-🚀"],
    )
    assert made.exit_code == 0, made.output
    token = made.stderr.rsplit(" ", 1)[-1].strip()
    entry = _table(tmp_path, made.stdout).authenticate(token)
    assert entry is not None and entry.name == name
    assert entry.allows_producer("édge-🚀")


def test_a_token_for_an_empty_producer_is_not_made() -> None:
    # It matched no producer id: the token could send nothing.
    result = CliRunner().invoke(
        collector_group, ["token", "--name", "t", "--scope", "ingest", "--producer", ""]
    )
    assert result.exit_code == 2, result.output
    assert "a producer id glob must not be empty" in result.output
    assert "sha256" not in result.output
