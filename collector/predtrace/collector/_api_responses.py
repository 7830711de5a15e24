"""What the query API answers with: JSON, errors, bounded answers that say what they left out.

A list answer comes a page at a time (``?limit=``, ``?after=``) and says how
to ask for the next one; a pivot answer is cut by rows or bytes and says how
many predictions it lists of how many, and whether the chains of those left
out were checked. Used by ``QueryApi`` (``_api``) and the lineage
registration (``_api_registration``).
"""

from __future__ import annotations

import json
from typing import Final

from aiohttp import web

from predtrace.collector.store import PivotAnswer
from predtrace.collector.store._chain import Json
from predtrace.collector.store._maintenance import MAX_PAGE_LIMIT, PAGE_LIMIT

CUT_BY: Final = {
    "limit": "the answer's row limit",
    "bytes": "the answer's byte budget",
}


def json_response(
    data: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """``data`` as a JSON answer; what JSON cannot hold is written as its ``str``."""
    return web.json_response(
        data, status=status, headers=headers, dumps=lambda d: json.dumps(d, default=str)
    )


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """``{"error": message}`` with ``status``."""
    return json_response({"error": message}, status, headers)


class BadArgumentError(ValueError):
    """A query argument the API refuses (400 with this reason)."""


def page_args(request: web.Request) -> tuple[int, str | None]:
    """``?limit=`` (rows) and ``?after=`` (the key the page starts after) of a list answer.

    Raises:
        BadArgumentError: a limit that is not a whole number from 1 to MAX_PAGE_LIMIT.
    """
    text = request.query.get("limit", "")
    limit = PAGE_LIMIT
    if text:
        # isdecimal: int() would also read " 5", "5_0" and other digits.
        if not (text.isascii() and text.isdecimal()) or not 1 <= int(text) <= MAX_PAGE_LIMIT:
            raise BadArgumentError(f"limit must be a whole number from 1 to {MAX_PAGE_LIMIT}")
        limit = int(text)
    # ``after=`` empty is a key too: the page after the model with no name.
    return limit, request.query.get("after")


def paged(body: dict[str, object], listed: int, what: str) -> dict[str, object]:
    """``body`` (with ``total``, ``truncated``, ``next_after``) saying how to go on when cut."""
    if body.get("truncated"):
        body["truncated_by"] = "limit"
        body["note"] = (
            f"{listed} of {body['total']} {what} listed ({CUT_BY['limit']}); ask again with"
            " after= next_after for the next page"
        )
    return body


def pivot_body(predictions: list[Json], what: str) -> web.Response | Json:
    """The pivot's answer about ``what`` (404 when nothing matched), saying what it left out."""
    answer = predictions if isinstance(predictions, PivotAnswer) else _as_answer(predictions)
    if not answer.total:
        return error_response(404, f"no predictions for {what}")
    body: dict[str, object] = {
        "query": what,
        "predictions": list(answer),
        "complete": answer.complete,
        "total": answer.total,
        "truncated": answer.cut_by is not None,
    }
    if answer.cut_by is not None:
        checked = (
            "the chains of all of them were checked (see unlisted)"
            if answer.unlisted is not None
            else "too many chains to check them all: completeness unknown"
        )
        body["truncated_by"] = answer.cut_by
        body["unlisted"] = answer.unlisted
        body["note"] = (
            f"{len(answer)} of {answer.total} predictions listed ({CUT_BY[answer.cut_by]});"
            f" {checked}"
        )
    return body


def _as_answer(predictions: list[dict[str, object]]) -> PivotAnswer:
    answer = PivotAnswer()
    answer.extend(predictions)
    answer.total = len(predictions)
    return answer
