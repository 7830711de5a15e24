"""Commit names, shared by lineage registration and the impact query.

A CI hook may register a full sha where MLflow or a user gives a short one,
in either case. Registration merges the forms of one commit (``same_commit``);
impact by commit finds the runs built from any of them, and refuses a short
sha that several stored commits begin with (``AmbiguousCommitError``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

MIN_SHORT_SHA: Final = 7
"""Git's shortest default abbreviation: a shorter prefix agrees with no other form."""


def same_commit(a: str, b: str) -> bool:
    """Whether two commit names agree: equal, or hex shas one a prefix of the other.

    Case does not matter; a prefix counts only from 7 hex digits (git's
    shortest default abbreviation), so "1" does not agree with every sha.
    """
    a, b = a.lower(), b.lower()
    if a == b:
        return True
    short, full = sorted((a, b), key=len)
    return len(short) >= MIN_SHORT_SHA and _is_hex(a) and _is_hex(b) and full.startswith(short)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


class AmbiguousCommitError(LookupError):
    """A short sha that names several stored commits: which one is meant is not known.

    Refused as git refuses an ambiguous short object name, rather than
    summing the impact of unrelated commits.
    """

    def __init__(self, given: str, commits: list[str]) -> None:
        self.given, self.commits = given, commits
        super().__init__(
            f"commit {given} is ambiguous: it is a prefix of {len(commits)} commits"
            f" ({', '.join(commits)}); give more digits"
        )


def distinct_commits(shas: Sequence[str]) -> list[str]:
    """The commits among stored forms of shas: a form that is a prefix of another is that one."""
    commits: dict[str, str] = {}  # lower case -> as stored
    for sha in sorted(shas, key=len, reverse=True):
        if not any(known.startswith(sha.lower()) for known in commits):
            commits[sha.lower()] = sha
    return sorted(commits.values())
