"""tune_gc: the servers' garbage-collector settings once they are up."""

from __future__ import annotations

import gc
import logging
import sys
import time
import weakref
from collections.abc import Iterator

import pytest
from aiohttp import ClientConnectionResetError
from aiohttp.http_exceptions import LineTooLong

from predtrace.cli._serving import GC_GEN0_THRESHOLD, _ClientErrorLog, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_startup_objects_are_frozen_and_young_collections_are_rarer() -> None:
    _, gen1, gen2 = gc.get_threshold()
    tune_gc()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (GC_GEN0_THRESHOLD, gen1, gen2)


@pytest.mark.usefixtures("restored_gc")
def test_cyclic_garbage_is_still_collected_after_tuning() -> None:
    tune_gc()

    class Node:
        other: object = None

    a, b = Node(), Node()
    a.other, b.other = b, a
    collected: list[object] = []
    ref = weakref.ref(a, collected.append)
    del a, b
    gc.collect()
    assert ref() is None and collected


def _bad_request_record() -> logging.LogRecord:
    try:
        raise LineTooLong("Got more than 8190 bytes when reading: b'aaaa'", "8190")
    except LineTooLong:
        exc_info = sys.exc_info()
    return logging.LogRecord(
        "aiohttp.server",
        logging.ERROR,
        __file__,
        1,
        "Error handling request from %s",
        ("127.0.0.1",),
        exc_info,
    )


def test_client_errors_become_one_warning_a_second_with_the_rest_counted() -> None:
    quiet = _ClientErrorLog(interval=0.2)
    passed = [r for r in (_bad_request_record() for _ in range(5)) if quiet.filter(r)]
    assert len(passed) == 1
    (first,) = passed
    assert (first.levelno, first.exc_info) == (logging.WARNING, None)
    assert first.getMessage() == (
        "Error handling request from 127.0.0.1: answered 400, Got more than 8190 bytes when reading"
    )
    time.sleep(0.25)
    later = _bad_request_record()
    assert quiet.filter(later)
    assert later.getMessage().endswith("(4 more since the last one)")


def test_server_errors_keep_their_traceback() -> None:
    record = logging.LogRecord(
        "aiohttp.server",
        logging.ERROR,
        __file__,
        1,
        "boom",
        (),
        (RuntimeError, RuntimeError(), None),
    )
    assert _ClientErrorLog().filter(record)
    assert record.exc_info is not None and record.levelno == logging.ERROR


def _dropped_upload_record(error: ConnectionResetError) -> logging.LogRecord:
    try:
        raise error
    except ConnectionResetError:
        exc_info = sys.exc_info()
    return logging.LogRecord(
        "aiohttp.server",
        logging.ERROR,
        __file__,
        1,
        "Error handling request from %s",
        ("127.0.0.1",),
        exc_info,
    )


@pytest.mark.parametrize(
    "error",
    [ConnectionResetError("Connection lost"), ClientConnectionResetError("Connection lost")],
    ids=["builtin", "aiohttp"],
)
def test_dropped_uploads_become_one_warning_a_second_without_traceback(
    error: ConnectionResetError,
) -> None:
    quiet = _ClientErrorLog(interval=60)
    passed = [r for r in (_dropped_upload_record(error) for _ in range(5)) if quiet.filter(r)]
    assert len(passed) == 1
    (first,) = passed
    assert (first.levelno, first.exc_info) == (logging.WARNING, None)
    assert first.getMessage() == (
        "Error handling request from 127.0.0.1: the client disconnected (Connection lost)"
    )
    assert quiet.left_out == 4
