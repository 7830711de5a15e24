"""The serving process: accept() failures logged once in a while, the descriptor limit raised."""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import subprocess
import sys
from typing import Any

import pytest

from predtrace.cli._serving import AcceptErrorLog

_ACCEPT_FAILED = {
    "message": "socket.accept() out of system resource",
    "exception": OSError(errno.EMFILE, "Too many open files"),
}


def test_accept_failures_make_one_warning_line_an_interval_not_a_traceback_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # asyncio reports each failed accept() as an ERROR with a traceback, a
    # hundred a loop iteration: 659 MB of log in two minutes under a flood.
    caplog.set_level(logging.DEBUG)
    loop = asyncio.new_event_loop()
    try:
        handler = AcceptErrorLog(interval=3600)
        for _ in range(1000):
            handler(loop, dict(_ACCEPT_FAILED))
    finally:
        loop.close()
    records = [r for r in caplog.records if "accept" in r.getMessage()]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING and records[0].exc_info is None
    assert "Too many open files" in records[0].getMessage()
    assert handler.left_out == 999


def test_the_next_line_counts_the_failures_left_out(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    try:
        handler = AcceptErrorLog(interval=0)
        handler(loop, dict(_ACCEPT_FAILED))
        handler.interval = 3600
        handler(loop, dict(_ACCEPT_FAILED))
        handler.interval = 0
        handler(loop, dict(_ACCEPT_FAILED))
    finally:
        loop.close()
    lines = [r.getMessage() for r in caplog.records if "accept" in r.getMessage()]
    assert len(lines) == 2 and lines[1].endswith("(1 more since the last one)")


def test_other_loop_errors_go_to_the_handler_that_was_there_before() -> None:
    seen: list[dict[str, Any]] = []
    loop = asyncio.new_event_loop()
    try:
        handler = AcceptErrorLog(lambda _loop, context: seen.append(context))
        handler(loop, {"message": "Task exception was never retrieved"})
        handler(loop, dict(_ACCEPT_FAILED))
    finally:
        loop.close()
    assert seen == [{"message": "Task exception was never retrieved"}]


def test_the_open_files_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"hard limit {hard}: nothing to raise")
    # In a child: the test process keeps its own limit.
    code = (
        "import resource\n"
        "from predtrace.cli._serving import raise_fd_limit\n"
        "limit = resource.RLIMIT_NOFILE\n"
        "resource.setrlimit(limit, (256, resource.getrlimit(limit)[1]))\n"
        "raised = raise_fd_limit()\n"
        "print(raised, resource.getrlimit(limit)[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    raised, now = map(int, out.stdout.split())
    assert raised == now > 256
    assert hard in (now, resource.RLIM_INFINITY)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == soft  # ours is untouched
