"""The loop-lag timer (costserve.server.load.LoopLag) measures while requests come and stops when they do not.

A timer every 5 ms was most of an idle server's CPU (3.7% of a core measured; 0.3% with it stopped).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from costserve.server.load import LoopLag


async def _until(condition: Callable[[], bool], within_s: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


def test_the_timer_stops_when_idle_and_a_request_restarts_it() -> None:
    async def scenario() -> None:
        lag = LoopLag(interval_s=0.005, idle_after_s=0.05)
        lag.start()
        assert not lag.running  # nothing measured before the first request
        lag.touch()
        assert lag.running
        assert await _until(lambda: lag._timer is None), "the timer kept running with no request"
        assert lag.seconds == 0.0  # an idle loop runs nothing late
        lag.touch()
        assert lag._timer is not None
        ticks_before = lag._timer.when()
        assert await _until(lambda: lag._timer is None or lag._timer.when() > ticks_before), "it did not tick again"
        lag.stop()
        assert lag._timer is None
        lag.touch()  # after stop, a request starts nothing
        assert lag._timer is None

    asyncio.run(scenario())


def test_lateness_is_measured_while_requests_come() -> None:
    async def scenario() -> float:
        lag = LoopLag(interval_s=0.005, idle_after_s=10.0)
        lag.start()
        lag.touch()
        await asyncio.sleep(0.02)
        time.sleep(0.2)  # the loop is blocked: the next tick runs ~0.2 s late
        assert await _until(lambda: lag.seconds > 0.005)
        lag.stop()
        return lag.seconds

    assert asyncio.run(scenario()) > 0.005
