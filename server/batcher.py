"""Dynamic batching for one runtime.

Images wait in a queue bounded by ``max_queue``; one dispatcher task forms batches
and runs them on a dedicated inference thread, so the event loop keeps serving:

* an image that arrives while the runtime is idle goes at once (no timeout wait at
  low load);
* images that arrive while the runtime is busy accumulate; when it frees up they
  go together, up to ``max_batch_size``, and a batch that is not full waits for
  more at most until ``batch_timeout`` after its first image arrived;
* an image whose deadline passed, or whose caller went away, is dropped before
  inference and never computed;
* a failed batch fails each of its callers and the next batch is served normally;
  the runtime must return one row per image.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from costserve.server.cost import LoopCpuClock
from costserve.server.errors import DeadlineExceeded, InferenceFailed, Overloaded
from costserve.server.metrics import LoopHistogram, ServiceMetrics
from costserve.server.runtimes import Runtime

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
    pixels: np.ndarray
    future: asyncio.Future
    #: Event-loop time after which the caller no longer wants an answer, or None.
    deadline: float | None
    enqueued_at: float
    #: The runtime was busy (or others were waiting) when the image arrived.
    arrived_busy: bool


def model_batch(images: Sequence[np.ndarray]) -> np.ndarray:
    """One float32 batch in [0, 1] from images given as uint8 levels or float32 pixels."""
    if all(image.dtype == np.uint8 for image in images):
        return np.stack(images).astype(np.float32) / np.float32(255.0)
    return np.stack(
        [image.astype(np.float32) / np.float32(255.0) if image.dtype == np.uint8 else image for image in images]
    )


_STOP = object()
#: Weight of the newest batch in the recent time per image.
EWMA_WEIGHT = 0.2


class Batcher:
    """Batches images for ``runtime``; create with :meth:`start` inside the running loop.

    Example::

        batcher = Batcher(runtime, max_batch_size=32, batch_timeout_s=0.002, max_queue=1024)
        await batcher.start()
        answers = await asyncio.gather(*batcher.submit([pixels_a, pixels_b], deadline=None))
        await batcher.stop()
    """

    def __init__(
        self,
        runtime: Runtime,
        max_batch_size: int,
        batch_timeout_s: float,
        max_queue: int,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.batch_timeout_s = batch_timeout_s
        self.max_queue = max_queue
        self.metrics = metrics
        self.label = runtime.precision.value
        #: Images dropped before inference because their deadline had passed.
        self.expired_dropped = 0
        #: Recent wall seconds of inference per image (EWMA over batches); None before the first batch.
        self.seconds_per_image: float | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._busy = False
        self._waiting = 0
        self._loop_cpu: LoopCpuClock | None = None
        self._series: tuple[LoopHistogram, LoopHistogram, LoopHistogram] | None = None
        #: Resolved when the batch being filled can be completed, or its time is up.
        self._filled: asyncio.Future | None = None
        self._needed = 0

    @property
    def queue_depth(self) -> int:
        """Images accepted and not yet taken into a batch."""
        return self._waiting

    def predicted_wait_s(self) -> float:
        """Seconds a new image would wait before its batch starts, from recent batch times."""
        per_image = self.seconds_per_image or 0.0
        return self._waiting * per_image

    async def start(self) -> None:
        """Create the queue, the inference thread and the dispatcher in the running loop."""
        self._queue = asyncio.Queue()
        self._loop_cpu = LoopCpuClock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{self.label}")
        self._task = asyncio.get_running_loop().create_task(self._dispatch(), name=f"batcher-{self.label}")
        if self.metrics is not None:
            self.metrics.track_queue_depth(self.label, lambda: self._waiting)
            self._series = (
                self.metrics.inference_duration.labels(self.label),  # type: ignore[assignment]
                self.metrics.batch_size.labels(self.label),
                self.metrics.queue_duration.labels(self.label),
            )

    def submit(self, images: Sequence[np.ndarray], deadline: float | None) -> list[asyncio.Future]:
        """Queue ``images`` (all or none); return one future of :class:`BatchAnswer` per image.

        Each image is ``(height, width, channels)``: uint8 levels 0..255, converted to
        floats a batch at a time on the inference thread, or float32 in [0, 1].
        ``deadline`` is an event-loop time (``loop.time()``). Raises
        :class:`Overloaded` when the images do not fit in the queue.
        """
        if self._queue is None or self._task is None or self._task.done():
            raise RuntimeError("batcher is not running")
        if self._waiting + len(images) > self.max_queue:
            raise Overloaded(
                f"the {self.label} queue is full ({self._waiting} of {self.max_queue} images waiting, "
                f"this request adds {len(images)}); retry with backoff"
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        arrived_busy = self._busy or self._waiting > 0
        futures = []
        for pixels in images:
            future = loop.create_future()
            self._queue.put_nowait(_Waiting(pixels, future, deadline, now, arrived_busy))
            futures.append(future)
        self._waiting += len(images)
        if self._filled is not None and self._queue.qsize() >= self._needed:
            self._wake_filler()
        return futures

    async def stop(self) -> None:
        """Answer everything already queued, then end the dispatcher and the inference thread."""
        if self._queue is None or self._task is None:
            return
        self._queue.put_nowait(_STOP)
        self._wake_filler()
        await self._task
        assert self._executor is not None
        self._executor.shutdown(wait=True)

    async def _dispatch(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            stopping = self._take_ready(batch)
            if not stopping and first.arrived_busy and len(batch) < self.max_batch_size:
                stopping = await self._fill(batch, first.enqueued_at + self.batch_timeout_s)
            self._waiting -= len(batch)
            live = self._drop_unwanted(batch, loop.time())
            if live:
                await self._run_batch(live)

    def _take_ready(self, batch: list[_Waiting]) -> bool:
        """Add images already queued, up to the batch limit; True when the stop marker was met."""
        assert self._queue is not None
        while len(batch) < self.max_batch_size and not self._queue.empty():
            waiting = self._queue.get_nowait()
            if waiting is _STOP:
                return True
            batch.append(waiting)
        return False

    async def _fill(self, batch: list[_Waiting], until: float) -> bool:
        """Wait for more images until ``until`` or a full batch; True when the stop marker was met."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        # One wake-up per fill, when enough images are queued or the time is up: not one per image.
        self._needed = self.max_batch_size - len(batch)
        self._filled = loop.create_future()
        timer = loop.call_at(until, self._wake_filler)
        try:
            await self._filled
        finally:
            timer.cancel()
            self._filled = None
        return self._take_ready(batch)

    def _wake_filler(self) -> None:
        if self._filled is not None and not self._filled.done():
            self._filled.set_result(None)

    def _drop_unwanted(self, batch: list[_Waiting], now: float) -> list[_Waiting]:
        live = []
        for waiting in batch:
            if waiting.future.done():  # cancelled: the caller went away
                continue
            if waiting.deadline is not None and waiting.deadline <= now:
                self.expired_dropped += 1
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
        self._busy = True
        try:
            rows, labels, scores, seconds, cpu_seconds = await loop.run_in_executor(
                self._executor, self._predict, [waiting.pixels for waiting in batch]
            )
        except Exception as exc:  # the runtime failed: fail this batch only
            log.exception("%s batch of %d failed", self.label, len(batch))
            error = exc if isinstance(exc, InferenceFailed) else InferenceFailed(
                f"{self.label} inference failed on a batch of {len(batch)}: {type(exc).__name__}: {exc}"
            )
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(error)
            return
        finally:
            self._busy = False
        size = len(batch)
        if self._series is not None:
            inference_duration, batch_size, queue_duration = self._series
            inference_duration.observe(seconds)
            batch_size.observe(size)
            for waiting in batch:
                queue_duration.observe(started - waiting.enqueued_at)
        per_image = seconds / size
        previous = self.seconds_per_image
        self.seconds_per_image = per_image if previous is None else previous + EWMA_WEIGHT * (per_image - previous)
        share = cpu_seconds / size
        for row, label, score, waiting in zip(rows, labels, scores, batch):
            if not waiting.future.done():
                waiting.future.set_result(BatchAnswer(row, size, seconds, share, label, score))

    def _predict(
        self, images: list[np.ndarray]
    ) -> tuple[list[np.ndarray], list[int], list[float], float, float]:
        """Run one batch on the inference thread, with the work around it.

        Stacks ``images``, runs the runtime, checks it returned one row per image, and
        splits the answer into one read-only row per image with its label and score.
        Returns those, the wall seconds and the CPU-seconds it all used. The runtime's
        own threads are not ours to clock, so its CPU is the process's CPU over the call
        less what the event loop used meanwhile (that is the handling of other requests,
        which they are charged for).
        """
        assert self._loop_cpu is not None
        started, process_started, loop_started = time.perf_counter(), time.process_time(), self._loop_cpu.seconds()
        probabilities = self.runtime.predict(model_batch(images))
        if len(probabilities) != len(images):
            raise InferenceFailed(f"{self.label} runtime returned {len(probabilities)} rows for a batch of {len(images)}")
        labels = probabilities.argmax(axis=1)
        scores = probabilities[np.arange(len(images)), labels].tolist()
        # A read-only row of its own per image: callers keep rows in the cache, where a view
        # would keep its whole batch's block alive and a writable row could be changed under it.
        rows = [row.astype(np.float32) for row in probabilities]
        for row in rows:
            row.flags.writeable = False
        cpu_seconds = (time.process_time() - process_started) - (self._loop_cpu.seconds() - loop_started)
        return rows, labels.tolist(), scores, time.perf_counter() - started, max(cpu_seconds, 0.0)
