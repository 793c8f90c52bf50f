"""The batcher on its own: forming batches, bounds, deadlines and failures, on the real int8 runtime."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import pytest
from helpers import SpyRuntime

from costserve.server.batcher import Batcher
from costserve.server.domain import Precision
from costserve.server.errors import DeadlineExceeded, InferenceFailed, Overloaded
from costserve.server.load import RecentLoad, RuntimeWindow, fill_until

T = TypeVar("T")


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(scenario(), timeout=60))


@pytest.fixture
def spy(loaded_model: Any) -> SpyRuntime:
    return SpyRuntime(loaded_model.runtimes[Precision.INT8], poison_value=1.0)


async def _wait_until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.001)


async def _answers(*futures: asyncio.Future) -> list[Any]:
    """The answers of ``futures`` (one list per queued part of a request), flattened in order."""
    return [answer for part in await asyncio.gather(*futures) for answer in part]


async def _hold_runtime(batcher: Batcher, spy: SpyRuntime, image: np.ndarray) -> asyncio.Future:
    """Start one image and keep the runtime busy with it until ``spy.gate`` opens."""
    spy.gate.clear()
    spy.entered.clear()
    (running,) = batcher.submit([image], deadline=None)
    await asyncio.get_running_loop().run_in_executor(None, spy.entered.wait, 30)
    return running


def test_an_image_at_an_idle_runtime_does_not_wait_for_the_timeout(spy: SpyRuntime, holdout: Any) -> None:
    async def scenario() -> None:
        batcher = Batcher(spy, max_batch_size=32, batch_timeout_s=3600, max_queue=64)
        await batcher.start()
        (future,) = batcher.submit([holdout.holdout_images[0]], deadline=None)
        (answer,) = await asyncio.wait_for(future, timeout=30)  # an hour-long timeout was not waited for
        assert answer.batch_size == 1
        assert int(np.argmax(answer.probabilities)) == holdout.holdout_labels[0]
        await batcher.stop()

    run(scenario)


def test_images_arriving_while_busy_go_together_in_order(spy: SpyRuntime, holdout: Any) -> None:
    images = holdout.holdout_images[:6]

    async def scenario() -> None:
        batcher = Batcher(spy, max_batch_size=4, batch_timeout_s=0, max_queue=64)
        await batcher.start()
        running = await _hold_runtime(batcher, spy, images[0])
        waiting = batcher.submit(list(images[1:]), deadline=None)
        assert batcher.queue_depth == 5
        spy.gate.set()
        assert len(waiting) == 2  # a request's images queue as parts of at most max_batch_size
        answers = await _answers(running, *waiting)
        assert spy.batches == [1, 4, 1]  # full batch at once, then the rest
        assert [answer.batch_size for answer in answers] == [1, 4, 4, 4, 4, 1]
        expected = spy.inner.predict(images)
        np.testing.assert_array_equal(np.array([answer.probabilities for answer in answers]), expected)
        await batcher.stop()

    run(scenario)


def test_under_load_a_batch_waits_up_to_the_timeout_for_more(spy: SpyRuntime, holdout: Any) -> None:
    async def scenario() -> None:
        batcher = Batcher(spy, max_batch_size=8, batch_timeout_s=3600, max_queue=64)
        await _keeps_filling_until_full(batcher, spy, holdout.holdout_images)

    run(scenario)


class FixedWindow(RuntimeWindow):
    """A runtime window that reports a chosen recent load: the fill rule's inputs, set by the test."""

    def __init__(self, load: RecentLoad) -> None:
        super().__init__()
        self.load = load

    def recent(self, now: float) -> RecentLoad:
        self.mark(now)
        return self.load


SATURATED = RecentLoad(arrival_per_s=1000.0, duty=1.0, loop_share=0.5)
TIME_TO_SPARE = RecentLoad(arrival_per_s=1000.0, duty=0.6, loop_share=0.3)


def _batcher_under(load: RecentLoad, spy: SpyRuntime, batch_timeout_s: float = 0.001) -> Batcher:
    """A batcher of 8 whose fill rule sees ``load``, with a 30 s fill timeout (never reached by a test)."""
    return Batcher(
        spy, max_batch_size=8, batch_timeout_s=batch_timeout_s, max_queue=64, batch_fill_timeout_s=30,
        window=FixedWindow(load),
    )  # fmt: skip


async def _three_waiting_after_a_busy_batch(
    batcher: Batcher, spy: SpyRuntime, images: np.ndarray
) -> list[asyncio.Future]:
    """One image holds the runtime while three more arrive (so they arrived busy); then it frees up."""
    running = await _hold_runtime(batcher, spy, images[0])
    waiting = batcher.submit(list(images[1:4]), deadline=None)
    spy.gate.set()
    await running
    return waiting


async def _keeps_filling_until_full(batcher: Batcher, spy: SpyRuntime, images: np.ndarray) -> None:
    """Start ``batcher``; three images arrive busy and, once the runtime is free, wait for more until a batch of 8."""
    await batcher.start()
    waiting = await _three_waiting_after_a_busy_batch(batcher, spy, images)
    await asyncio.sleep(0.05)  # the runtime is free, but the batch of 3 keeps waiting to fill
    assert spy.batches == [1] and not any(future.done() for future in waiting)
    rest = batcher.submit(list(images[4:9]), deadline=None)  # fills it to 8
    await asyncio.gather(*waiting, *rest)
    assert spy.batches == [1, 8]
    await batcher.stop()


def test_under_saturation_a_batch_keeps_filling_past_the_timeout(spy: SpyRuntime, holdout: Any) -> None:
    async def scenario() -> None:
        # Far past the 1 ms timeout, the batch keeps filling.
        batcher = _batcher_under(SATURATED, spy)
        await _keeps_filling_until_full(batcher, spy, holdout.holdout_images)

    run(scenario)


def test_with_time_to_spare_no_batch_waits_past_the_timeout(spy: SpyRuntime, holdout: Any) -> None:
    async def scenario() -> None:
        batcher = _batcher_under(TIME_TO_SPARE, spy)
        await batcher.start()
        waiting = await _three_waiting_after_a_busy_batch(batcher, spy, holdout.holdout_images)
        await asyncio.wait_for(asyncio.gather(*waiting), timeout=10)  # not the 30 s fill timeout
        assert spy.batches == [1, 3]
        await batcher.stop()

    run(scenario)


def test_an_image_due_soon_cuts_a_running_fill_wait_short(spy: SpyRuntime, holdout: Any) -> None:
    """A batch filling under saturation (for up to 30 s) goes before an image that joins it is due."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        # A 0.2 s timeout: the batch starts that long before the due image's deadline.
        batcher = _batcher_under(SATURATED, spy, batch_timeout_s=0.2)
        await batcher.start()
        waiting = await _three_waiting_after_a_busy_batch(batcher, spy, holdout.holdout_images)
        await asyncio.sleep(0.3)  # past the timeout: filling
        assert spy.batches == [1]
        due = batcher.submit([holdout.holdout_images[4]], deadline=loop.time() + 1.0)
        answers = await asyncio.wait_for(_answers(*waiting, *due), timeout=10)  # not the 30 s fill timeout
        assert spy.batches == [1, 4] and len(answers) == 4  # the due image went with them, in time
        await batcher.stop()

    run(scenario)


def test_the_fill_rule_waits_only_under_saturation_and_while_the_rate_fills_the_batch_in_time() -> None:
    def rule(recent: RecentLoad, missing: int = 4, earliest_deadline: float | None = None) -> float | None:
        return fill_until(
            now=100.0, missing=missing, fill_deadline=100.02, earliest_deadline=earliest_deadline,
            deadline_margin_s=0.005, recent=recent,
        )  # fmt: skip

    assert rule(SATURATED) == 100.02  # 4 more at 1,000/s take 4 ms: wait, at most to the fill deadline
    assert rule(RecentLoad(1000.0, duty=0.5, loop_share=0.85)) == 100.02  # the loop's CPU saturated
    assert rule(TIME_TO_SPARE) is None  # with time to spare, a smaller batch costs nothing
    assert rule(RecentLoad(100.0, duty=1.0, loop_share=0.0)) is None  # 4 more at 100/s: 40 ms, past 20 ms
    assert rule(RecentLoad(0.0, duty=1.0, loop_share=1.0)) is None  # no arrivals measured yet
    assert rule(SATURATED, missing=0) is None  # full
    assert rule(SATURATED, earliest_deadline=100.015) == pytest.approx(100.01)  # starts 5 ms before it is due
    assert rule(SATURATED, earliest_deadline=100.008) is None  # 4 ms to fill, 3 ms left before the margin


def test_the_runtime_window_measures_arrivals_duty_and_the_loops_cpu_on_its_clocks() -> None:
    loop_cpu = [0.0]
    window = RuntimeWindow(loop_cpu=lambda: loop_cpu[0], window_s=0.25)
    window.mark(10.0)
    assert window.recent(10.1) == RecentLoad()  # less than half a window seen
    window.arrived(100)
    window.busy(0.09)
    window.filled(0.1)
    loop_cpu[0] = 0.18
    recent = window.recent(10.2)
    assert recent.arrival_per_s == pytest.approx(500.0)  # 100 images in 0.2 s
    assert recent.duty == pytest.approx(0.9)  # busy 0.09 s of the 0.1 s not spent filling
    assert recent.loop_share == pytest.approx(0.9) and recent.saturated
    # Half a second later with nothing arriving, the window holds only idle time.
    recent = window.recent(10.45)
    recent = window.recent(10.7)
    assert recent.arrival_per_s == 0 and recent.duty == 0 and recent.loop_share == 0 and not recent.saturated


class HelperThreadRuntime(SpyRuntime):
    """A spy doing 30 ms of CPU on a helper thread inside every call, as a runtime with threads of its own does."""

    def __init__(self, inner: Any, runs_on_calling_thread: bool) -> None:
        super().__init__(inner)
        self.runs_on_calling_thread = runs_on_calling_thread

    def predict(self, batch: np.ndarray) -> np.ndarray:
        def burn() -> None:
            end = time.thread_time() + 0.03
            while time.thread_time() < end:
                pass

        helper = threading.Thread(target=burn)
        helper.start()
        helper.join()
        return super().predict(batch)


@pytest.mark.parametrize("runs_on_calling_thread", [True, False])
def test_a_batch_is_charged_by_the_clock_its_runtime_allows(
    loaded_model: Any, holdout: Any, runs_on_calling_thread: bool
) -> None:
    """The inference thread's own clock when the runtime says all its work is there (the helper's
    30 ms then goes uncounted); otherwise the process's CPU over the call, which counts it."""
    runtime = HelperThreadRuntime(loaded_model.runtimes[Precision.INT8], runs_on_calling_thread)

    async def scenario() -> float:
        batcher = Batcher(runtime, max_batch_size=8, batch_timeout_s=0, max_queue=8)
        await batcher.start()
        (answer,) = await _answers(*batcher.submit([holdout.holdout_images[0]], deadline=None))
        await batcher.stop()
        return answer.cpu_seconds

    cpu_seconds = run(scenario)
    if runs_on_calling_thread:
        assert cpu_seconds < 0.015
    else:
        assert cpu_seconds >= 0.025


def test_queue_bound_is_all_or_nothing(spy: SpyRuntime, holdout: Any) -> None:
    async def scenario() -> None:
        batcher = Batcher(spy, max_batch_size=2, batch_timeout_s=0, max_queue=3)
        await batcher.start()
        running = await _hold_runtime(batcher, spy, holdout.holdout_images[0])
        accepted = batcher.submit(list(holdout.holdout_images[1:3]), deadline=None)
        with pytest.raises(Overloaded, match="2 of 3 images waiting, this request adds 2"):
            batcher.submit(list(holdout.holdout_images[3:5]), deadline=None)
        assert batcher.queue_depth == 2
        spy.gate.set()
        await asyncio.gather(running, *accepted)
        assert spy.images_computed == 3
        await batcher.stop()

    run(scenario)


def test_expired_and_cancelled_images_are_never_computed(spy: SpyRuntime, holdout: Any) -> None:
    async def scenario() -> None:
        batcher = Batcher(spy, max_batch_size=8, batch_timeout_s=0, max_queue=64)
        await batcher.start()
        loop = asyncio.get_running_loop()
        running = await _hold_runtime(batcher, spy, holdout.holdout_images[0])
        (expired,) = batcher.submit([holdout.holdout_images[1]], deadline=loop.time() + 0.01)
        (cancelled,) = batcher.submit([holdout.holdout_images[2]], deadline=None)
        (kept,) = batcher.submit([holdout.holdout_images[3]], deadline=loop.time() + 600)
        cancelled.cancel()
        await asyncio.sleep(0.05)  # past the first deadline
        spy.gate.set()
        await running
        with pytest.raises(DeadlineExceeded, match="not computed"):
            await expired
        assert (await kept)[0].batch_size == 1
        assert spy.batches == [1, 1] and batcher.expired_dropped == 1
        await batcher.stop()

    run(scenario)


def test_a_failed_batch_fails_its_callers_and_the_next_batch_is_served(spy: SpyRuntime, holdout: Any) -> None:
    poison = np.ones((28, 28, 1), dtype=np.float32)

    async def scenario() -> None:
        batcher = Batcher(spy, max_batch_size=4, batch_timeout_s=0, max_queue=64)
        await batcher.start()
        running = await _hold_runtime(batcher, spy, holdout.holdout_images[0])
        doomed = batcher.submit([holdout.holdout_images[1], poison], deadline=None)
        spy.gate.set()
        await running
        for future in doomed:
            with pytest.raises(InferenceFailed, match="batch of 2: RuntimeError: poisoned batch"):
                await future
        (after,) = batcher.submit([holdout.holdout_images[2]], deadline=None)
        assert int(np.argmax((await after)[0].probabilities)) == holdout.holdout_labels[2]
        await batcher.stop()

    run(scenario)


def test_a_runtime_returning_the_wrong_row_count_fails_the_batch(loaded_model: Any, holdout: Any) -> None:
    class Truncating(SpyRuntime):
        def predict(self, batch: np.ndarray) -> np.ndarray:
            return self.inner.predict(batch)[:-1]

    async def scenario() -> None:
        batcher = Batcher(
            Truncating(loaded_model.runtimes[Precision.INT8]), max_batch_size=4, batch_timeout_s=0, max_queue=8
        )
        await batcher.start()
        (future,) = batcher.submit([holdout.holdout_images[0]], deadline=None)
        with pytest.raises(InferenceFailed, match="returned 0 rows for a batch of 1"):
            await future
        await batcher.stop()

    run(scenario)


def test_stop_answers_everything_queued(spy: SpyRuntime, holdout: Any) -> None:
    async def scenario() -> None:
        batcher = Batcher(spy, max_batch_size=4, batch_timeout_s=0, max_queue=64)
        await batcher.start()
        running = await _hold_runtime(batcher, spy, holdout.holdout_images[0])
        queued = batcher.submit(list(holdout.holdout_images[1:11]), deadline=None)
        stopping = asyncio.ensure_future(batcher.stop())
        spy.gate.set()
        await stopping
        answers = await _answers(running, *queued)
        assert [int(np.argmax(a.probabilities)) for a in answers] == list(holdout.holdout_labels[:11])
        with pytest.raises(RuntimeError, match="not running"):
            batcher.submit([holdout.holdout_images[0]], deadline=None)

    run(scenario)


def test_inference_runs_off_the_event_loop(spy: SpyRuntime, holdout: Any) -> None:
    async def scenario() -> None:
        batcher = Batcher(spy, max_batch_size=4, batch_timeout_s=0, max_queue=8)
        await batcher.start()
        running = await _hold_runtime(batcher, spy, holdout.holdout_images[0])
        ticks = 0
        for _ in range(5):  # the loop keeps turning while the runtime is held
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 5 and not running.done()
        assert threading.current_thread() is threading.main_thread()
        spy.gate.set()
        await running
        await batcher.stop()

    run(scenario)


def test_uint8_levels_and_float_pixels_give_the_same_answers_as_own_read_only_rows(
    spy: SpyRuntime, holdout: Any
) -> None:
    floats = holdout.holdout_images[:4]
    levels = np.round(floats * 255).astype(np.uint8)
    mixed = [levels[0], floats[1], levels[2], floats[3]]

    async def scenario() -> None:
        batcher = Batcher(spy, max_batch_size=4, batch_timeout_s=0, max_queue=64)
        await batcher.start()
        answers = await _answers(*batcher.submit(mixed, deadline=None))
        await batcher.stop()
        as_floats = [image / np.float32(255) if image.dtype == np.uint8 else image for image in mixed]
        expected = spy.inner.predict(np.stack(as_floats).astype(np.float32))
        np.testing.assert_allclose(np.array([answer.probabilities for answer in answers]), expected, atol=1e-6)
        for answer in answers:
            # Callers cache rows: each must own its memory (not pin its batch) and refuse writes.
            assert answer.probabilities.base is None and not answer.probabilities.flags.writeable

    run(scenario)
