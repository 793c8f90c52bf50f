"""How busy the server is, measured in one place.

The policy and the batchers decide from the same few signals, all measured here:

* **demand**: images needing computation per second, over the last :data:`DEMAND_WINDOW_S`;
* per runtime, over the last :data:`ARRIVAL_WINDOW_S`: the **arrival rate** of images, the
  runtime's **duty** (share of the time it had a batch) and the event loop's **CPU share**
  (share of the time its thread was on CPU) — see :class:`RuntimeWindow`;
* **loop lag**: how late the event loop runs a timer (:class:`LoopLag`);
* **predicted waits**: each batcher's queue times its recent time per image (read from the
  batchers when :meth:`LoadMonitor.snapshot` is taken).

Every time here comes from an injected clock (monotonic seconds; the event loop's clock is
the same one), so tests drive these signals with a fake clock instead of sleeping. The
batcher's fill rule is a pure function of them: :func:`fill_until`.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the batcher imports this module
    from costserve.server.batcher import Batcher
    from costserve.server.domain import Precision

from costserve.server.policy import Load

#: A clock: monotonic seconds.
Clock = Callable[[], float]

#: Window over which the demand (images to compute per second) is measured, in seconds.
DEMAND_WINDOW_S = 1.0
#: Span over which a runtime's arrival rate, duty and the loop's CPU share are measured, in seconds.
ARRIVAL_WINDOW_S = 0.25
#: Share of that span the runtime must have had a batch for batches to wait to fill.
SATURATED_DUTY = 0.9
#: ... or share of it the event loop's thread must have been on CPU (it seldom gets all of
#: it: the inference and gRPC threads take the GIL too).
SATURATED_LOOP = 0.8
#: Longest the policy reuses one measurement of the load, in seconds.
LOAD_SAMPLE_S = 0.005
#: With no request for this long, the loop-lag timer stops until the next one, in seconds.
IDLE_AFTER_S = 1.0
#: Weight of the newest sample in the recent averages (time per image, waits, cost per image, loop lag).
EWMA_WEIGHT = 0.2


def ewma(previous: float | None, sample: float, weight: float = EWMA_WEIGHT) -> float:
    """The recent average after ``sample``, which weighs ``weight``; the first sample (``previous`` None) stands
    alone."""
    return sample if previous is None else previous + weight * (sample - previous)


class LoopCpuClock:
    """CPU time of one thread (the event loop's), readable from any thread."""

    def __init__(self, thread_id: int | None = None) -> None:
        self._clock_id = time.pthread_getcpuclockid(thread_id or threading.get_ident())

    def seconds(self) -> float:
        """CPU-seconds the thread has used so far."""
        return time.clock_gettime(self._clock_id)


@dataclass(frozen=True)
class RecentLoad:
    """One runtime's recent load (see :class:`RuntimeWindow`); zeros until half a window is seen."""

    #: Images submitted per second.
    arrival_per_s: float = 0.0
    #: Share of the time the runtime had a batch, of the time batches did not spend waiting to fill.
    duty: float = 0.0
    #: Share of the time the event loop's thread was on CPU.
    loop_share: float = 0.0

    @property
    def saturated(self) -> bool:
        """The runtime had a batch nearly all the time, or the event loop was on CPU nearly all of it."""
        return self.duty >= SATURATED_DUTY or self.loop_share >= SATURATED_LOOP


class RuntimeWindow:
    """A runtime's arrivals, busy time and fill waits, and the event loop's CPU, over ``window_s``.

    The batcher reports what happens (:meth:`arrived`, :meth:`busy`, :meth:`filled`) and asks
    :meth:`recent` with the time of asking; ``loop_cpu`` reads the event loop thread's CPU
    seconds (a fake in tests).
    """

    def __init__(self, loop_cpu: Clock = time.thread_time, window_s: float = ARRIVAL_WINDOW_S) -> None:
        self.loop_cpu = loop_cpu
        self.window_s = window_s
        self._arrived = 0
        self._busy_s = 0.0
        self._filling_s = 0.0
        #: (time, images arrived, busy seconds, filling seconds, loop CPU seconds) marks back to window_s ago.
        self._marks: collections.deque[tuple[float, int, float, float, float]] = collections.deque()

    def arrived(self, images: int) -> None:
        """Note ``images`` submitted."""
        self._arrived += images

    def busy(self, seconds: float) -> None:
        """Note a batch that kept the runtime busy for ``seconds``."""
        self._busy_s += seconds

    def filled(self, seconds: float) -> None:
        """Note ``seconds`` a batch spent waiting to fill (chosen, so neither busy nor spare)."""
        self._filling_s += seconds

    def mark(self, now: float) -> None:
        """Note the totals at ``now``; keeps ``window_s`` of marks."""
        marks = self._marks
        marks.append((now, self._arrived, self._busy_s, self._filling_s, self.loop_cpu()))
        while len(marks) > 2 and marks[1][0] <= now - self.window_s:
            marks.popleft()

    def recent(self, now: float) -> RecentLoad:
        """The load over the last ``window_s`` before ``now``."""
        self.mark(now)
        since, arrived_then, busy_then, filling_then, loop_cpu_then = self._marks[0]
        span = now - since
        if span < self.window_s / 2:
            return RecentLoad()
        available = span - (self._filling_s - filling_then)
        duty = (self._busy_s - busy_then) / available if available > 0 else 1.0
        loop_share = (self._marks[-1][4] - loop_cpu_then) / span
        return RecentLoad((self._arrived - arrived_then) / span, duty, loop_share)


def fill_until(
    *,
    now: float,
    missing: int,
    fill_deadline: float,
    earliest_deadline: float | None,
    deadline_margin_s: float,
    recent: RecentLoad,
) -> float | None:
    """The fill rule: until when a batch ``missing`` images short of full keeps waiting; None to go now.

    It waits only while the server is saturated (:attr:`RecentLoad.saturated`): with time to
    spare, smaller batches cost nothing and waiting would only add latency, while a saturated
    server runs short of exactly what full batches save. It waits only while images arriving
    at the recent rate fill it by ``fill_deadline`` (the first image's arrival plus
    ``--batch-fill-timeout-ms``), and never so long that a waiting image could not start
    ``deadline_margin_s`` before its deadline. The rate is measured over the window, not over
    this batch's wait: clients send in bursts, and a burst seen alone would promise a rate the
    load does not have.
    """
    if missing <= 0:
        return None
    until = fill_deadline
    if earliest_deadline is not None:
        until = min(until, earliest_deadline - deadline_margin_s)
    rate = recent.arrival_per_s
    if not recent.saturated or rate <= 0 or now + missing / rate > until:
        return None
    return until


class DemandWindow:
    """Images needing computation per second, over the last ``window_s`` of ``clock``."""

    def __init__(self, clock: Clock = time.monotonic, window_s: float = DEMAND_WINDOW_S) -> None:
        self.clock = clock
        self.window_s = window_s
        self._entries: collections.deque[tuple[float, int]] = collections.deque()
        self._total = 0

    def record(self, images: int) -> None:
        """Note ``images`` sent to be computed now."""
        self._entries.append((self.clock(), images))
        self._total += images

    def per_s(self) -> float:
        """Images per second over the window ending now."""
        now = self.clock()
        while self._entries and self._entries[0][0] <= now - self.window_s:
            self._total -= self._entries.popleft()[1]
        return self._total / self.window_s


class LoopLag:
    """How late the event loop runs a timer: what a request arriving now waits before its handler runs.

    Under overload the requests gRPC has received queue on the loop before costserve sees
    them; the batch queue's predicted wait misses that part. A timer every ``interval_s``
    measures it; :attr:`seconds` is the recent lateness (:func:`ewma`). With no request for
    ``idle_after_s`` the timer stops (an idle loop runs nothing late, and a timer every 5 ms
    is most of an idle server's CPU); :meth:`touch` restarts it. Its times are the event
    loop's own: lateness is what it measures.
    """

    def __init__(self, interval_s: float = LOAD_SAMPLE_S, idle_after_s: float = IDLE_AFTER_S) -> None:
        self.interval_s = interval_s
        self.idle_after_s = idle_after_s
        #: Recent lateness of the loop, in seconds.
        self.seconds = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Loop time of the last :meth:`touch`.
        self._touched_at = 0.0

    @property
    def running(self) -> bool:
        """Whether the timer is scheduled (it stops while the server is idle)."""
        return self._timer is not None

    def start(self) -> None:
        """Measure on the running loop from the first request on (start-up's own stalls are not load)."""
        self._loop = asyncio.get_running_loop()

    def touch(self) -> None:
        """Note a request; restarts the timer when it stopped for idleness."""
        loop = self._loop
        if loop is None:
            return
        self._touched_at = loop.time()
        if self._timer is None:
            self._schedule(loop)

    def stop(self) -> None:
        """Stop measuring."""
        self._loop = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        due = loop.time() + self.interval_s
        self._timer = loop.call_at(due, self._tick, loop, due)

    def _tick(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        now = loop.time()
        self.seconds = ewma(self.seconds, max(now - due, 0.0))
        if now - self._touched_at > self.idle_after_s:
            self._timer = None
            self.seconds = 0.0
            return
        self._schedule(loop)


class LoadMonitor:
    """The server's load signals, on one ``clock``: what the policy reads, and what the batchers report.

    :meth:`snapshot` gathers them into a :class:`~costserve.server.policy.Load`, measured at
    most every :data:`LOAD_SAMPLE_S` of the clock: measuring takes longer than answering a
    cached request, and the signals move on the scale of batches, not requests.
    """

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.demand = DemandWindow(self.now)
        self.loop_lag = LoopLag()
        self._snapshot: Load | None = None
        self._measured_at = 0.0

    def now(self) -> float:
        """The monitor's clock, read through: a clock swapped in later is used by everyone holding this."""
        return self.clock()

    def snapshot(
        self,
        batchers: Mapping[Precision, Batcher],
        utilization: Callable[[], float],
        cost_per_image: Mapping[Precision, float],
        fallback_cost_per_image: Mapping[Precision, float] | None = None,
    ) -> Load:
        """The load now: queues and predicted waits of ``batchers``, demand, utilization, cost per image, loop lag.

        ``fallback_cost_per_image`` predicts the cost of the variants ``cost_per_image`` has no figure for yet.
        """
        now = self.now()
        if self._snapshot is None or now - self._measured_at >= LOAD_SAMPLE_S:
            self._snapshot = Load(
                queue_depth={precision: batcher.queue_depth for precision, batcher in batchers.items()},
                predicted_wait_s={precision: batcher.predicted_wait_s() for precision, batcher in batchers.items()},
                demand_per_s=self.demand.per_s(),
                utilization=utilization(),
                predicted_cost_per_image_usd={**(fallback_cost_per_image or {}), **cost_per_image},
                loop_lag_s=self.loop_lag.seconds,
            )
            self._measured_at = now
        return self._snapshot
