"""Logging that a client cannot flood: expected client behaviour costs at most a line now and then.

Cancelled calls, passed deadlines and clients that hang up mid-answer are normal for a
server under load; grpc's own code would log each with a traceback. They are counted in
the metrics, and logged here at most once per :data:`QUIET_INTERVAL_S` per kind, with the
number of those left out since.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("costserve.server")

#: Shortest time between two log lines of one kind of expected client behaviour, in seconds.
QUIET_INTERVAL_S = 60.0
#: Exceptions grpc raises when it answers a client that has already gone away.
CLIENT_GONE = frozenset({"ExecuteBatchError", "UsageError"})


class RateLimitedLog:
    """Logs one line per kind at most every ``interval_s`` seconds, counting the lines left out."""

    def __init__(
        self,
        logger: logging.Logger = log,
        interval_s: float = QUIET_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        #: Per kind: when its last line was written, and how many were left out since.
        self._kinds: dict[str, tuple[float, int]] = {}

    def warning(self, kind: str, message: str) -> bool:
        """Log ``message`` unless a line of ``kind`` was logged within the interval; True when logged."""
        now = self._clock()
        last, left_out = self._kinds.get(kind, (-float("inf"), 0))
        if now - last < self._interval_s:
            self._kinds[kind] = (last, left_out + 1)
            return False
        more = f" ({left_out} more since the last such line)" if left_out else ""
        self._logger.warning("%s%s", message, more)
        self._kinds[kind] = (now, 0)
        return True


def quiet_client_errors(loop: asyncio.AbstractEventLoop, limited: RateLimitedLog | None = None) -> None:
    """Make ``loop`` log errors from answering departed clients as a rate-limited line, not a traceback.

    Everything else still goes to the loop's default handler.
    """
    limited = limited or RateLimitedLog()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        kind = type(error).__name__
        if kind in CLIENT_GONE:
            limited.warning(kind, f"a client went away before its answer was sent ({kind}: {error})")
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handle)
