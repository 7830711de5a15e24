"""The query API's log lines that a flood must not multiply: store failures, dropped clients.

A store that fails every query, or clients that hang up by the thousand,
would otherwise write a line each: these count them and write one line a
minute at most (a failure of a new kind at once). Lines go to the API's
logger, ``predtrace.collector.api``.
"""

from __future__ import annotations

import logging
import math
import time

from predtrace.collector._errors import StoreError, StoreUnavailableError

log = logging.getLogger("predtrace.collector.api")


class StoreFaultLog:
    """Queries the store failed: one line per kind of failure a minute at most, with a count.

    A store that fails every query must not write a line per query; a
    failure of a new kind is logged at once. Kinds are exception names (the
    message's first two fields), a few dozen at most; past ``max_kinds`` they
    share one line.
    """

    def __init__(self, interval_s: float = 60.0, max_kinds: int = 64) -> None:
        self.interval_s, self.max_kinds = interval_s, max_kinds
        self._kinds: dict[str, tuple[float, int]] = {}  # kind -> (last logged, since then)

    def record(self, route: str, exc: StoreError) -> None:
        """Count one; log it when its kind was not logged within the interval."""
        kind = ": ".join(str(exc).split(": ", 2)[:2])
        key = kind if kind in self._kinds or len(self._kinds) < self.max_kinds else "other"
        last, count = self._kinds.get(key, (-math.inf, 0))
        now, count = time.monotonic(), count + 1
        if now - last < self.interval_s:
            self._kinds[key] = (last, count)
            return
        self._kinds[key] = (now, 0)
        level = logging.WARNING if isinstance(exc, StoreUnavailableError) else logging.ERROR
        log.log(
            level, "store failed a %s query (%d since the last such line): %s", route, count, exc
        )


class DisconnectLog:
    """Uploads whose client hung up mid-body: one line a minute at most, with a count.

    ``what``: the line's text after the count and before the path.
    """

    def __init__(
        self, interval_s: float = 60.0, what: str = "upload(s) ended by the client mid-body"
    ) -> None:
        self.interval_s, self.count, self.what = interval_s, 0, what
        self._last = -math.inf

    def record(self, path: str) -> None:
        """Count one; log when the last line is older than the interval."""
        self.count += 1
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            log.info("%d %s (%s)", self.count, self.what, path)
            self._last, self.count = now, 0
