"""A collector command's call: its connection options, its failures, its printed answer.

Shared by the query commands (``_cli``) and ``lineage register``
(``_cli_registration``): the ``--collector``/``--token``/``--retry-for`` and
``-o`` options, the client, what each kind of failed answer says and exits
with (DESIGN §7: 1 not found, chain broken or collector unreachable; 2 usage
error), and the answer printed as a rich table or JSON. rich loads only when
a table is printed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import click

from predtrace.collector._client import (
    DEFAULT_URL,
    PREDTRACE_COLLECTOR_URL,
    PREDTRACE_TOKEN,
    Answer,
    CollectorUnreachableError,
    QueryClient,
    UnreadableAnswerError,
)
from predtrace.collector._errors import CollectorError
from predtrace.collector._terminal import printable

OUTPUT_OPTION = click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True
)


def connection_options(func: Callable[..., None]) -> Callable[..., None]:
    """``func`` with the ``--collector``, ``--token`` and ``--retry-for`` options."""
    func = click.option(
        "--retry-for",
        type=click.FloatRange(0, 86400),
        default=30.0,
        show_default=True,
        metavar="SECONDS",
        help="keep retrying this long while the collector answers 429/502/503/504 "
        "(busy, or restarting behind a proxy), honouring its Retry-After; 0: fail at once "
        "(a refused connection always fails at once)",
    )(func)
    func = click.option(
        "--token",
        envvar=PREDTRACE_TOKEN,
        default=None,
        help=f"bearer token [env {PREDTRACE_TOKEN}]",
    )(func)
    return click.option(
        "--collector",
        envvar=PREDTRACE_COLLECTOR_URL,
        default=DEFAULT_URL,
        show_default=True,
        help=f"collector URL [env {PREDTRACE_COLLECTOR_URL}]",
    )(func)


def query_client(collector: str, token: str | None, retry_for: float) -> QueryClient:
    """The client of the connection options; a bad ``--collector`` is a usage error."""
    try:
        return QueryClient(collector, token, retry_for=retry_for, on_retry=_say_retry)
    except CollectorError as exc:
        raise click.UsageError(str(exc)) from None


def _say_retry(reason: str, wait: float) -> None:
    click.echo(f"predtrace: {printable(reason)}; retrying in {wait:.1f} s", err=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Say ``message`` on stderr and exit with ``code``."""
    click.echo(f"predtrace: {printable(message)}", err=True)
    sys.exit(code)


def call(request: Callable[[], Answer]) -> Answer:
    """The collector's answer to ``request``; what is no answer about the query exits."""
    try:
        answer = request()
    except (CollectorUnreachableError, UnreadableAnswerError) as exc:
        fail(str(exc))
    if answer.status == 404 and not answer.json:
        # The collector says "not found" in JSON; a text or HTML 404 is another
        # server, or a path in --collector: not an answer about the id asked.
        fail(
            f"HTTP 404 without a collector's answer ({answer.error[:80]}): is --collector "
            "the collector's base URL (http://host:port, no path)?"
        )
    if answer.status in (401, 403):
        fail(f"not allowed: {answer.error} (set --token or {PREDTRACE_TOKEN})")
    if answer.status == 400:
        raise click.UsageError(answer.error)
    return answer


def call_ok(request: Callable[[], Answer], what: str) -> Answer:
    """``call`` for writes: any answer but 2xx is a failure, said as such."""
    answer = call(request)
    if not 200 <= answer.status < 300:
        fail(f"{what} failed: the collector answered {answer.status}: {answer.error}")
    return answer


def show(
    output: str,
    answer: Mapping[str, Any],
    render: Callable[[Any, Any], None],
    required: tuple[str, ...],
) -> None:
    """Print ``answer``; an answer without the ``required`` keys is an error (exit 1).

    ``--collector`` may name another service that answers JSON: its answer
    must not end in a traceback.
    """
    lacking = [key for key in required if key not in answer]
    if lacking:
        fail(f"the answer is not a predtrace collector's: it has no {lacking[0]!r}")
    if output == "json":
        click.echo(json.dumps(answer, indent=2, default=str))
        return
    from predtrace.collector._render import terminal_console  # noqa: PLC0415 - rich on demand

    try:
        render(terminal_console(), answer)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        fail(f"the answer is not in the shape a predtrace collector gives ({type(exc).__name__})")


def renderer(name: str) -> Callable[[Any, Any], None]:
    """The table renderer ``name`` of ``_render``, imported only now."""
    from predtrace.collector import _render as module  # noqa: PLC0415 - rich loads lazily

    return getattr(module, name)  # type: ignore[no-any-return]


def exit_if_broken(missing: list[tuple[str, str]]) -> None:
    """Name each missing hop on stderr and exit 1; nothing when none is missing."""
    if missing:
        for where, reason in missing:
            click.echo(printable(f"chain broken: {where}: {reason}"), err=True)
        sys.exit(1)
