"""Sans-I/O store plans: query logic written once, run by the SQLite or PostgreSQL engine.

A plan is a generator that yields operations (``Fetch``, ``Exec``, ``Insert``)
and receives their rows back; an engine drives it. So the ingest, lineage and
query logic is the same code on both stores, and the SQLite engine runs a
whole plan inside one worker thread hop (the on-call pivot stays in a few
milliseconds). SQL is written with ``?`` placeholders and portable syntax
(``ON CONFLICT``, ``RETURNING``, ``CASE``); the PostgreSQL engine numbers them.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

Row = tuple[Any, ...]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Fetch:
    """Run one statement and send back its rows (``RETURNING`` rows included)."""

    sql: str
    args: tuple[object, ...] = ()


@dataclass(frozen=True, slots=True)
class Exec:
    """Run one statement; send back ``[(rowcount,)]``."""

    sql: str
    args: tuple[object, ...] = ()


@dataclass(frozen=True, slots=True)
class ExecMany:
    """Run one statement for each argument tuple; send back ``[]``."""

    sql: str
    rows: Sequence[tuple[object, ...]]


@dataclass(frozen=True, slots=True)
class Insert:
    """Bulk-insert rows into ``table`` (PostgreSQL: COPY); send back ``[]``."""

    table: str
    columns: tuple[str, ...]
    rows: Sequence[tuple[object, ...]]


@dataclass(frozen=True, slots=True)
class Serialize:
    """Run the rest of this write after any other holding ``key`` (PostgreSQL:
    ``pg_advisory_xact_lock``; SQLite's single writer serialises every write);
    sends back ``[]``."""

    key: int


Op = Fetch | Exec | ExecMany | Insert | Serialize
Plan = Generator[Op, list[Row], T]

_PLACEHOLDER = re.compile(r"\?")


@lru_cache(maxsize=512)
def numbered(sql: str) -> str:
    """Turn ``?`` placeholders into PostgreSQL's ``$1, $2, ...``."""
    counter = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


def in_list(count: int) -> str:
    """``?, ?, ?`` for an ``IN (...)`` of ``count`` values (at least one)."""
    return ", ".join("?" * max(count, 1))
