"""Dynamic batching for one runtime.

Images wait in a queue bounded by ``max_queue``; one dispatcher task forms batches
and runs them on a dedicated inference thread, so the event loop keeps serving:

* an image that arrives while the runtime is idle goes at once (no timeout wait at
  low load);
* images that arrive while the runtime is busy accumulate; when it frees up they
  go together, up to the batch limit, and a batch that is not full waits for
  more at most until ``batch_timeout`` after its first image arrived. The batch
  limit is ``max_batch_size``, or less where the runtime's measured cost profile
  (:mod:`costserve.server.profile`) says the CPU per image stops falling;
* a batch still not full then keeps waiting, up to ``batch_fill_timeout`` after its
  first image arrived, only under the fill rule (:func:`costserve.server.load.fill_until`:
  the server is saturated, images arrive fast enough to fill it by then, and every waiting
  image can still start before its deadline); otherwise no image waits longer than
  ``batch_timeout``;
* an image whose deadline passed, or whose caller went away, is dropped before
  inference and never computed;
* a failed batch fails each of its callers and the next batch is served normally;
  the runtime must return one row per image.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from costserve.server.errors import DeadlineExceeded, InferenceFailed, Overloaded
from costserve.server.load import LoopCpuClock, RuntimeWindow, ewma, fill_until
from costserve.server.metrics import LoopHistogram, ServiceMetrics
from costserve.server.profile import VariantProfile
from costserve.server.runtimes import Runtime, run_runtime

log = logging.getLogger(__name__)


@dataclass(slots=True)
class BatchAnswer:
    """One image's probabilities and the batch that computed them."""

    probabilities: np.ndarray
    batch_size: int
    #: Wall time of the runtime call, in seconds.
    inference_seconds: float
    #: This image's equal share of the CPU-seconds the runtime call used.
    cpu_seconds: float
    #: Index of the most probable class, and its probability.
    label: int
    score: float


@dataclass(slots=True)
class _Waiting:
    """Consecutive images of one request, answered together by one future."""

    images: list[np.ndarray]
    #: Resolves to one :class:`BatchAnswer` per image, in order.
    future: asyncio.Future
    #: Event-loop time after which the caller no longer wants an answer, or None.
    deadline: float | None
    enqueued_at: float
    #: The runtime was busy (or others were waiting) when the image arrived.
    arrived_busy: bool


class Batcher:
    """Batches images for ``runtime``; create with :meth:`start` inside the running loop.

    The images of one request travel together as one queued entry with one future
    (split into entries of at most :attr:`batch_limit` images), so a request of 16
    images costs the event loop one future and one wake-up, not sixteen. A batch
    takes whole entries, first come first served.

    Example::

        batcher = Batcher(runtime, max_batch_size=32, batch_timeout_s=0.002, max_queue=1024)
        await batcher.start()
        parts = await asyncio.gather(*batcher.submit([pixels_a, pixels_b], deadline=None))
        answers = [answer for part in parts for answer in part]
        await batcher.stop()
    """

    def __init__(
        self,
        runtime: Runtime,
        max_batch_size: int,
        batch_timeout_s: float,
        max_queue: int,
        metrics: ServiceMetrics | None = None,
        batch_fill_timeout_s: float | None = None,
        window: RuntimeWindow | None = None,
        model: str = "",
        profile: VariantProfile | None = None,
    ) -> None:
        self.runtime = runtime
        #: The runtime's measured cost per image by batch size (every batch adds to its live
        #: figures); its batch limit caps the batches formed here (None: up to ``max_batch_size``).
        self.profile = profile
        #: The model's name, the first label of the batcher's metrics.
        self.model = model
        self.max_batch_size = max_batch_size
        self.batch_timeout_s = batch_timeout_s
        #: Longest a batch keeps filling while images arrive fast enough to fill it, counted
        #: from its first image's arrival, in seconds (never below ``batch_timeout_s``).
        self.batch_fill_timeout_s = max(batch_timeout_s, batch_fill_timeout_s or 0.0)
        self.max_queue = max_queue
        self.metrics = metrics
        self.label = runtime.precision.value
        #: Images dropped before inference because their deadline had passed.
        self.expired_dropped = 0
        #: Recent wall seconds per image as the queue drains (EWMA over batches); None before the first
        #: batch. With images left waiting, it is the time from one batch's start to the next one's;
        #: otherwise from handing a batch to the inference thread to having its answers back.
        self.seconds_per_image: float | None = None
        #: How long the oldest image of each recent batch waited in the queue (EWMA), in seconds.
        self.recent_wait_s = 0.0
        #: Wall seconds of recent batches on the inference thread (EWMA).
        self.recent_batch_s = 0.0
        #: Loop time and size of the last batch started while other images were left waiting.
        self._backlogged_batch: tuple[float, int] | None = None
        self._entries: collections.deque[_Waiting] = collections.deque()
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._busy = False
        self._stopping = False
        #: Images queued and not yet taken into a batch.
        self._waiting = 0
        #: The recent arrivals, busy time and fill waits the fill rule reads; it is read and
        #: written on the event loop's thread only, so its default CPU clock is that thread's.
        self.window = window or RuntimeWindow()
        #: Loop time a fill wait ends, while one runs (see :meth:`_fill_until`).
        self._fill_end: float | None = None
        self._loop_cpu: LoopCpuClock | None = None
        self._series: tuple[LoopHistogram, LoopHistogram, LoopHistogram] | None = None
        #: Resolved when the dispatcher may go on: an entry arrived, enough images for a full
        #: batch are queued, its fill time is up, or the batcher is stopping.
        self._wakeup: asyncio.Future | None = None
        #: Queued images that resolve ``_wakeup`` (1 while idle; the room left while filling).
        self._needed = 1

    @property
    def batch_limit(self) -> int:
        """Largest batch formed: where the profile's CPU per image stops falling, at most ``max_batch_size``."""
        if self.profile is None:
            return self.max_batch_size
        return min(self.profile.batch_limit, self.max_batch_size)

    @property
    def queue_depth(self) -> int:
        """Images accepted and not yet taken into a batch."""
        return self._waiting

    def predicted_wait_s(self) -> float:
        """Seconds a new image would wait before its batch starts.

        The queued images times the recent seconds per image, but never less than what the
        images starting recently waited while any are queued: under overload the drain rate
        varies from batch to batch, and the wait measured is the one that does not lie.
        """
        if not self._waiting:
            return 0.0
        return max(self._waiting * (self.seconds_per_image or 0.0), self.recent_wait_s)

    async def start(self) -> None:
        """Create the inference thread and the dispatcher in the running loop."""
        self._loop_cpu = LoopCpuClock()
        name = f"{self.model}-{self.label}" if self.model else self.label
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")
        self._task = asyncio.get_running_loop().create_task(self._dispatch(), name=f"batcher-{name}")
        if self.metrics is not None:
            self._series = (
                self.metrics.inference_duration.labels(self.model, self.label),
                self.metrics.batch_size.labels(self.model, self.label),
                self.metrics.queue_duration.labels(self.model, self.label),
            )

    def submit(self, images: Sequence[np.ndarray], deadline: float | None) -> list[asyncio.Future]:
        """Queue ``images`` (all or none); return futures of their :class:`BatchAnswer` lists, in order.

        Each future answers up to :attr:`batch_limit` consecutive images. Each image is
        ``(height, width, channels)``: uint8 levels 0..255, converted to floats a batch
        at a time on the inference thread, or float32 in [0, 1]. ``deadline`` is an
        event-loop time (``loop.time()``). Raises :class:`Overloaded` when the images
        do not fit in the queue.
        """
        if self._task is None or self._task.done() or self._stopping:
            raise RuntimeError("batcher is not running")
        count = len(images)
        if self._waiting + count > self.max_queue:
            raise Overloaded(
                f"the {self.label} queue is full ({self._waiting} of {self.max_queue} images waiting, "
                f"this request adds {count}); retry with backoff"
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        arrived_busy = self._busy or self._waiting > 0
        futures = []
        step = self.batch_limit
        for start in range(0, count, step):
            future = loop.create_future()
            self._entries.append(_Waiting(list(images[start : start + step]), future, deadline, now, arrived_busy))
            futures.append(future)
        self._waiting += count
        self.window.arrived(count)
        if self._wakeup is not None and (self._waiting >= self._needed or self._cuts_fill_short(deadline)):
            self._wake()
        return futures

    async def stop(self) -> None:
        """Answer everything already queued, then end the dispatcher and the inference thread."""
        if self._task is None:
            return
        self._stopping = True
        self._wake()
        await self._task
        assert self._executor is not None
        self._executor.shutdown(wait=True)

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._entries:
                if self._stopping:
                    return
                await self._wait_for(1, None)
                continue
            first = self._entries[0]
            until = first.enqueued_at + self.batch_timeout_s
            limit = self.batch_limit
            filling = first.arrived_busy and not self._stopping and self._waiting < limit
            if filling and until > loop.time():
                # Under load: wait for a full batch, at most until the first image's time is up.
                await self._wait_for(limit, until)
            while filling and (fill_until := self._fill_until(first, loop.time())) is not None:
                # Saturated: keep filling. A new image due sooner wakes this wait to decide again.
                self._fill_end = fill_until
                fill_started = loop.time()
                try:
                    await self._wait_for(limit, fill_until)
                finally:
                    self._fill_end = None
                    self.window.filled(loop.time() - fill_started)
            batch = self._take_batch()
            live = self._drop_unwanted(batch, loop.time())
            if live:
                await self._run_batch(live)

    def _cuts_fill_short(self, deadline: float | None) -> bool:
        """Whether an image due at ``deadline`` must start before the running fill wait ends."""
        if deadline is None or self._fill_end is None:
            return False
        return deadline - self._deadline_margin() < self._fill_end

    def _deadline_margin(self) -> float:
        """How long before an image's deadline its batch must start: twice the recent batch
        time (a full batch takes longer than an average one) plus the batch timeout (the
        loop runs timers late when it is busy)."""
        return 2 * self.recent_batch_s + self.batch_timeout_s

    def _fill_until(self, first: _Waiting, now: float) -> float | None:
        """When the batch starting with ``first`` should stop waiting to fill; None to go now (:func:`fill_until`)."""
        if self._stopping or self.batch_fill_timeout_s <= self.batch_timeout_s:
            return None
        deadlines = [waiting.deadline for waiting in self._entries if waiting.deadline is not None]
        return fill_until(
            now=now,
            missing=self.batch_limit - self._waiting,
            fill_deadline=first.enqueued_at + self.batch_fill_timeout_s,
            earliest_deadline=min(deadlines) if deadlines else None,
            deadline_margin_s=self._deadline_margin(),
            recent=self.window.recent(now),
        )

    async def _wait_for(self, images: int, until: float | None) -> None:
        """Sleep until ``images`` are queued, ``until`` (loop time) passes, or the batcher stops."""
        loop = asyncio.get_running_loop()
        # One wake-up per wait, not one per arriving image.
        self._needed = images
        self._wakeup = loop.create_future()
        timer = loop.call_at(until, self._wake) if until is not None else None
        try:
            await self._wakeup
        finally:
            if timer is not None:
                timer.cancel()
            self._wakeup = None

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _take_batch(self) -> list[_Waiting]:
        """Whole entries from the front of the queue, as many as fit in one batch (at least one)."""
        batch = [self._entries.popleft()]
        size = len(batch[0].images)
        limit = self.batch_limit
        while self._entries and size + len(self._entries[0].images) <= limit:
            entry = self._entries.popleft()
            batch.append(entry)
            size += len(entry.images)
        self._waiting -= size
        return batch

    def _drop_unwanted(self, batch: list[_Waiting], now: float) -> list[_Waiting]:
        live = []
        for waiting in batch:
            if waiting.future.done():  # cancelled: the caller went away
                continue
            if waiting.deadline is not None and waiting.deadline <= now:
                self.expired_dropped += len(waiting.images)
                waiting.future.set_exception(
                    DeadlineExceeded(
                        f"deadline passed after {now - waiting.enqueued_at:.3f} s in the {self.label} queue; "
                        "the image was not computed"
                    )
                )
            else:
                live.append(waiting)
        return live

    async def _run_batch(self, batch: list[_Waiting]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        images = [image for waiting in batch for image in waiting.images]
        size = len(images)
        if self._backlogged_batch is not None:
            # Back to back under load: the queue drains one batch per start-to-start interval,
            # which also counts the gaps between batches that the runtime's own time misses.
            previous_start, previous_size = self._backlogged_batch
            self.seconds_per_image = ewma(self.seconds_per_image, (started - previous_start) / previous_size)
        self._backlogged_batch = (started, size) if self._waiting else None
        self.recent_wait_s = ewma(self.recent_wait_s, started - batch[0].enqueued_at)
        self.window.mark(started)
        self._busy = True
        try:
            rows, labels, scores, seconds, cpu_seconds = await loop.run_in_executor(
                self._executor, self._predict, images
            )
        except Exception as exc:  # the runtime failed: fail this batch only
            log.exception("%s batch of %d failed", self.label, size)
            error = (
                exc
                if isinstance(exc, InferenceFailed)
                else InferenceFailed(f"{self.label} inference failed on a batch of {size}: {type(exc).__name__}: {exc}")
            )
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(error)
            return
        finally:
            self._busy = False
            self.window.busy(loop.time() - started)
        self.recent_batch_s = ewma(self.recent_batch_s, seconds)
        if self.profile is not None:
            self.profile.observe(size, cpu_seconds, seconds)
        if self._series is not None:
            inference_duration, batch_size, queue_duration = self._series
            inference_duration.observe(seconds)
            batch_size.observe(size)
            for waiting in batch:
                queue_duration.observe(started - waiting.enqueued_at, count=len(waiting.images))
        if self._backlogged_batch is None:
            # Nothing was waiting: from handing the batch over to having its answers back on the loop.
            self.seconds_per_image = ewma(self.seconds_per_image, (loop.time() - started) / size)
        share = cpu_seconds / size
        row = 0
        for waiting in batch:
            end = row + len(waiting.images)
            if not waiting.future.done():
                waiting.future.set_result(
                    [BatchAnswer(rows[i], size, seconds, share, labels[i], scores[i]) for i in range(row, end)]
                )
            row = end

    def _predict(self, images: list[np.ndarray]) -> tuple[list[np.ndarray], list[int], list[float], float, float]:
        """Run one batch on the inference thread, with the work around it.

        Stacks ``images``, runs the runtime, checks it returned one row per image, and
        splits the answer into one read-only row per image with its label and score.
        Returns those, the wall seconds and the CPU-seconds it all used: this thread's
        CPU when the runtime works on the calling thread alone (the default, one thread
        per call). A runtime with threads of its own is measured by the process's CPU
        over the call less what the event loop used meanwhile (the handling of other
        requests, which they are charged for); that also takes in whatever else the
        process's other threads did meanwhile, such as another variant's batch.
        """
        if self.runtime.runs_on_calling_thread:
            started, cpu_started = time.perf_counter(), time.thread_time()
            rows, labels, scores = self._infer(images)
            return rows, labels, scores, time.perf_counter() - started, time.thread_time() - cpu_started
        assert self._loop_cpu is not None
        started, process_started, loop_started = time.perf_counter(), time.process_time(), self._loop_cpu.seconds()
        rows, labels, scores = self._infer(images)
        cpu_seconds = (time.process_time() - process_started) - (self._loop_cpu.seconds() - loop_started)
        return rows, labels, scores, time.perf_counter() - started, max(cpu_seconds, 0.0)

    def _infer(self, images: list[np.ndarray]) -> tuple[list[np.ndarray], list[int], list[float]]:
        probabilities = run_runtime(self.runtime, images)
        if len(probabilities) != len(images):
            raise InferenceFailed(
                f"{self.label} runtime returned {len(probabilities)} rows for a batch of {len(images)}"
            )
        labels = probabilities.argmax(axis=1)
        scores = probabilities[np.arange(len(images)), labels].tolist()
        # A read-only row of its own per image: callers keep rows in the cache, where a view
        # would keep its whole batch's block alive and a writable row could be changed under it.
        rows = [row.astype(np.float32) for row in probabilities]
        for row in rows:
            row.flags.writeable = False
        return rows, labels.tolist(), scores
