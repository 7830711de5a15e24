"""Bearer-token auth of the collector: scopes, producer binding, hashed storage.

The tokens file (TOML) holds only SHA-256 hashes of tokens, never tokens::

    [[token]]
    name = "edge-fleet"
    sha256 = "9f86d0..."           # predtrace collector token new prints this
    scopes = ["ingest"]
    producers = ["edge-*"]         # glob patterns; omit for any producer

Scopes: ``ingest`` (POST batches and lineage), ``read`` (queries), ``admin``
(everything). A presented token is hashed and compared with every entry in
constant time; it is never logged or echoed. With no tokens file the collector
answers loopback clients only.
"""

from __future__ import annotations

import enum
import fnmatch
import hashlib
import hmac
import ipaddress
import secrets
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from predtrace.collector._errors import ConfigError

_HASH_LEN: Final = 64


class Scope(enum.StrEnum):
    """What a token may do."""

    INGEST = "ingest"
    READ = "read"
    ADMIN = "admin"


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token, as stored in the tokens file."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A new random token (256 bits)."""
    return "pt_" + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenEntry:
    """One token's hash, scopes and allowed producers (empty: any producer)."""

    name: str
    sha256: str
    scopes: frozenset[Scope]
    producers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.sha256) != _HASH_LEN or not all(c in "0123456789abcdef" for c in self.sha256):
            raise ConfigError(f"token {self.name!r}: sha256 must be 64 lower-case hex digits")
        if not self.scopes:
            raise ConfigError(f"token {self.name!r}: give at least one scope")

    def allows(self, scope: Scope) -> bool:
        """Whether this token carries ``scope`` (admin carries all)."""
        return Scope.ADMIN in self.scopes or scope in self.scopes

    def allows_producer(self, producer_id: str) -> bool:
        """Whether this token may send batches as ``producer_id``."""
        if not self.producers or Scope.ADMIN in self.scopes:
            return True
        return any(fnmatch.fnmatchcase(producer_id, p) for p in self.producers)


def _entry(raw: object, index: int) -> TokenEntry:
    if not isinstance(raw, dict):
        raise ConfigError(f"token #{index}: must be a table")
    try:
        scopes = frozenset(Scope(s) for s in raw.get("scopes", []))
    except ValueError:
        raise ConfigError(f"token #{index}: scopes are ingest, read, admin") from None
    producers = raw.get("producers", [])
    if not isinstance(producers, list) or not all(isinstance(p, str) for p in producers):
        raise ConfigError(f"token #{index}: producers must be a list of strings")
    if any(not p.strip() for p in producers):
        raise ConfigError(f"token #{index}: a producer glob is empty (it matches no producer)")
    return TokenEntry(
        name=str(raw.get("name", f"#{index}")),
        sha256=str(raw.get("sha256", "")).lower(),
        scopes=scopes,
        producers=tuple(producers),
    )


class TokenTable:
    """The configured tokens; ``authenticate`` compares in constant time."""

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self.entries = tuple(entries)
        self._digests = [bytes.fromhex(e.sha256) for e in self.entries]

    @classmethod
    def load(cls, path: str | Path) -> TokenTable:
        """Read a tokens file.

        Raises:
            ConfigError: unreadable file or an invalid entry (the message never
                quotes a hash).
        """
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"cannot read tokens file {path} (--tokens, PREDTRACE_COLLECTOR_TOKENS): {exc}"
            ) from None
        raw = data.get("token", [])
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"tokens file {path} has no [[token]] entries")
        return cls(_entry(item, i) for i, item in enumerate(raw))

    def authenticate(self, token: str) -> TokenEntry | None:
        """The entry of a presented token, or None; the same work for every entry."""
        # Header bytes that are not UTF-8 arrive as surrogates: they hash like
        # any other wrong token instead of raising.
        presented = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found: TokenEntry | None = None
        for entry, digest in zip(self.entries, self._digests, strict=True):
            if hmac.compare_digest(presented, digest):
                found = entry
        return found


def is_loopback(address: str | None) -> bool:
    """Whether a peer address is on this machine."""
    if not address:
        return False
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return address in ("localhost", "unix")


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
