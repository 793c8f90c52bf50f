"""The batcher on its own: forming batches, bounds, deadlines and failures, on the real int8 runtime."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Awaitable, Callable, TypeVar

import numpy as np
import pytest

from helpers import SpyRuntime
from costserve.server.batcher import Batcher
from costserve.server.domain import Precision
from costserve.server.errors import DeadlineExceeded, InferenceFailed, Overloaded

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
        await batcher.start()
        running = await _hold_runtime(batcher, spy, holdout.holdout_images[0])
        first = batcher.submit(list(holdout.holdout_images[1:3]), deadline=None)
        spy.gate.set()
        await running
        await asyncio.sleep(0.05)  # the runtime is free, but the batch of 2 keeps waiting to fill
        assert spy.batches == [1] and not any(future.done() for future in first)
        rest = batcher.submit(list(holdout.holdout_images[3:9]), deadline=None)  # fills it to 8
        await asyncio.gather(*first, *rest)
        assert spy.batches == [1, 8]
        await batcher.stop()

    run(scenario)


class SlowRuntime(SpyRuntime):
    """A spy whose every batch takes ``seconds`` longer, as a busier model's would."""

    def __init__(self, inner: Any, seconds: float) -> None:
        super().__init__(inner)
        self.seconds = seconds

    def predict(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds)
        return super().predict(batch)


def _stream(
    loaded_model: Any,
    images: np.ndarray,
    batch_seconds: float,
    every_s: float | tuple[float, ...],
    batch_fill_timeout_s: float,
    deadline_s: float | None = None,
    deadline_every: int = 1,
) -> tuple[SlowRuntime, list[Any]]:
    """Submit one image every ``every_s`` seconds (or after each of those gaps in turn), as a
    stream of clients would, to a batcher (8 per batch, 1 ms timeout) whose batches take
    ``batch_seconds``; every ``deadline_every``-th image is due ``deadline_s`` after it is
    sent. Its runtime and the answers."""
    slow = SlowRuntime(loaded_model.runtimes[Precision.INT8], seconds=batch_seconds)

    gaps = every_s if isinstance(every_s, tuple) else (every_s,)

    async def scenario() -> list[Any]:
        loop = asyncio.get_running_loop()
        batcher = Batcher(
            slow,
            max_batch_size=8,
            batch_timeout_s=0.001,
            max_queue=len(images),
            batch_fill_timeout_s=batch_fill_timeout_s,
        )
        await batcher.start()
        futures = []
        for index, image in enumerate(images):
            due = deadline_s is not None and index % deadline_every == 0
            futures += batcher.submit([image], deadline=loop.time() + deadline_s if due else None)
            await asyncio.sleep(gaps[index % len(gaps)])
        answers = await _answers(*futures)
        await batcher.stop()
        return answers

    return slow, run(scenario)


def test_under_saturation_batches_keep_filling_past_the_timeout(loaded_model: Any, holdout: Any) -> None:
    """Images arriving every ~1 ms while each batch takes 3 ms: full batches, not the 3-4 the timeout gives."""
    images = holdout.holdout_images[:360]
    slow, answers = _stream(loaded_model, images, batch_seconds=0.003, every_s=0.001, batch_fill_timeout_s=1.0)
    np.testing.assert_array_equal(np.array([answer.probabilities for answer in answers]), slow.inner.predict(images))
    # Once the batcher has measured the rate for half its 0.25 s window (a third of the
    # ~0.4 s run), every batch fills.
    assert slow.batches[-11:-1] == [8] * 10, slow.batches


def test_a_runtime_with_time_to_spare_does_not_make_batches_wait(loaded_model: Any, holdout: Any) -> None:
    """Images in pairs 1 ms apart every 10 ms, batches of 3 ms: each pair's second image finds the
    runtime busy and the rate would fill 8 within the 1 s fill timeout, but the runtime has a
    batch only ~60% of the time, so no batch waits to fill."""
    images = holdout.holdout_images[:120]
    slow, answers = _stream(loaded_model, images, batch_seconds=0.003, every_s=(0.001, 0.009), batch_fill_timeout_s=1.0)
    assert len(answers) == sum(slow.batches) == len(images)
    assert max(slow.batches) < 8, slow.batches


def test_the_batcher_measures_how_busy_its_event_loop_thread_is(spy: SpyRuntime) -> None:
    """The third signal of saturation: the event loop's thread on CPU most of the recent time."""
    batcher = Batcher(spy, max_batch_size=8, batch_timeout_s=0.001, max_queue=8, batch_fill_timeout_s=0.02)
    started = time.monotonic()
    batcher._recent_load(started)
    while time.monotonic() < started + 0.2:  # on CPU all the time
        pass
    assert batcher._recent_load(time.monotonic())[2] > 0.8
    time.sleep(0.3)  # off CPU: the window now holds mostly sleep
    assert batcher._recent_load(time.monotonic())[2] < 0.5


def test_a_batch_does_not_wait_to_fill_past_what_its_deadlines_allow(loaded_model: Any, holdout: Any) -> None:
    """An image every ~10 ms, batches of 12 ms, each image due 60 ms after it is sent: the rate
    fills 8 within the 1 s fill timeout (~70 ms), too late for the deadlines, so none waits that long."""
    images = holdout.holdout_images[:60]
    slow, answers = _stream(
        loaded_model, images, batch_seconds=0.012, every_s=0.01, batch_fill_timeout_s=1.0, deadline_s=0.06
    )
    assert len(answers) == sum(slow.batches) == len(images)  # none dropped as expired


def test_an_image_due_soon_cuts_a_running_fill_wait_short(loaded_model: Any, holdout: Any) -> None:
    """The same stream with no deadlines but on every 7th image (due 40 ms after it is sent):
    those arrive while a batch waits to fill and must not wait with it."""
    images = holdout.holdout_images[:120]
    slow, answers = _stream(
        loaded_model, images, batch_seconds=0.012, every_s=0.01, batch_fill_timeout_s=1.0,
        deadline_s=0.04, deadline_every=7,
    )  # fmt: skip
    assert len(answers) == sum(slow.batches) == len(images)  # none dropped as expired
    assert max(slow.batches) == 8  # the images without deadlines still fill batches


def test_below_saturation_no_batch_waits_past_the_timeout(loaded_model: Any, holdout: Any) -> None:
    """Images every ~30 ms, batches of 40 ms: filling 8 would take ~200 ms, past the fill timeout: none waits."""
    images = holdout.holdout_images[:24]
    slow, answers = _stream(loaded_model, images, batch_seconds=0.04, every_s=0.03, batch_fill_timeout_s=0.1)
    assert len(answers) == sum(slow.batches) == len(images)
    assert max(slow.batches) < 8, slow.batches


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
        batcher = Batcher(Truncating(loaded_model.runtimes[Precision.INT8]), max_batch_size=4, batch_timeout_s=0, max_queue=8)
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
