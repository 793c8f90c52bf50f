"""One process's load: the closed- and open-loop engines, and :class:`LoadGenerator`, which runs a step with them."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableSequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
import numpy as np

from costserve.client import MAX_MESSAGE_BYTES, secure_or_plain_aio_channel
from costserve.loadtest.config import LoadStep, LoadtestConfig
from costserve.loadtest.inputs import InputPicker, Inputs
from costserve.loadtest.protocols import CODECS, ModelFacts, Reply
from costserve.loadtest.samples import Samples
from costserve.loadtest.transports import StreamTransport, UnaryTransport

#: Open loop: wake this much before a scheduled send, since asyncio's timers fire up to ~1 ms late, in seconds.
TIMER_SLACK_S = 0.001


T = TypeVar("T")
#: What one load-test request got: its answer, the input ids it carried, and those sent for the first time.
Answered = tuple[Reply, list[int], list[int]]


@dataclass(frozen=True)
class Timed(Generic[T]):
    """One request's times (event-loop seconds) and outcome: its ``result``, or the gRPC ``error`` it ended with."""

    scheduled: float
    sent: float
    done: float
    result: T | None
    error: grpc.aio.AioRpcError | None

    @property
    def latency_s(self) -> float:
        """From the scheduled time, or from the actual send when the timer woke a little early, to the answer."""
        return self.done - min(self.scheduled, self.sent)

    @property
    def lag_s(self) -> float:
        """How late the request left compared with its schedule (negative: a little early)."""
        return self.sent - self.scheduled


async def timed(scheduled: float, call: Callable[[], Awaitable[T]]) -> Timed[T]:
    """Await ``call()`` now; its times, with ``scheduled`` as the time it was due."""
    loop = asyncio.get_running_loop()
    sent = loop.time()
    try:
        result = await call()
    except grpc.aio.AioRpcError as error:
        return Timed(scheduled, sent, loop.time(), None, error)
    return Timed(scheduled, sent, loop.time(), result, None)


async def open_loop(
    schedule: Iterable[float],
    call: Callable[[int], Awaitable[T]],
    done: Callable[[int, Timed[T]], None],
) -> None:
    """The open-loop engine: start request ``number`` at each scheduled event-loop time, answered or not.

    ``call(number)`` sends request ``number``; ``done(number, timed)`` gets its outcome, with
    its latency counted from the scheduled time (no coordinated omission). Returns once every
    request sent has ended. ``schedule`` must be ascending; it may be endless if the caller stops it.
    """
    loop = asyncio.get_running_loop()
    in_flight: set[asyncio.Task] = set()

    async def send(number: int, scheduled: float) -> None:
        done(number, await timed(scheduled, lambda: call(number)))

    for number, scheduled in enumerate(schedule):
        if scheduled - TIMER_SLACK_S > loop.time():
            await asyncio.sleep(scheduled - TIMER_SLACK_S - loop.time())
        task = asyncio.ensure_future(send(number, scheduled))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.gather(*in_flight)


@dataclass(frozen=True)
class WorkerStep:
    """One process's share of a step."""

    mode: str
    #: Closed loop: this process's callers.
    concurrency: int
    #: Open loop: this process's arrivals per second.
    rate: float
    #: Open loop, constant arrivals: offset of the first arrival, in seconds (interleaves processes).
    phase_s: float
    #: This process's share of the measured requests, or None for no count limit.
    requests: int | None
    duration_s: float | None
    warmup_s: float

    def time_bound_s(self, call_timeout_s: float) -> float:
        """Longest the step can legitimately take, in seconds: the deadline of a stream that carries it."""
        if self.mode == "closed":
            # Without a duration, each caller sends its share of the requests one after another.
            sending = self.duration_s or call_timeout_s * math.ceil((self.requests or 0) / max(self.concurrency, 1))
        else:
            sending = min(self.duration_s or math.inf, 2 * (self.requests or math.inf) / self.rate)
        return self.warmup_s + sending + call_timeout_s


def share(step: LoadStep, config: LoadtestConfig, worker: int, workers: int) -> WorkerStep:
    """Split ``step`` evenly over ``workers`` processes; ``worker`` gets its part."""

    def part(total: int) -> int:
        return total // workers + (1 if worker < total % workers else 0)

    return WorkerStep(
        mode=step.mode,
        concurrency=part(int(step.value)) if step.mode == "closed" else 0,
        rate=step.value / workers if step.mode == "open" else 0.0,
        phase_s=worker / step.value if step.mode == "open" else 0.0,
        requests=part(config.requests) if config.requests is not None else None,
        duration_s=config.step_duration_s,
        warmup_s=config.warmup_s,
    )


class _Recorder:
    """Accumulates one step's measurements and the live counters (answered, failed)."""

    def __init__(self, pool: Inputs, counters: MutableSequence[int]) -> None:
        self.pool = pool
        self.counters = counters
        self.latencies: list[float] = []
        self.lags: list[float] = []
        self.samples = Samples()
        self.last_done = 0.0

    def ok(
        self,
        reply: Reply,
        ids: list[int],
        new_ids: list[int],
        latency_s: float,
        lag_s: float | None,
        done: float,
    ) -> None:
        self.latencies.append(latency_s)
        if lag_s is not None:
            self.lags.append(lag_s)
        samples = self.samples
        samples.cost_usd += reply.cost_usd
        for input_id, answer in zip(ids, reply.answers):
            samples.predictions += 1
            verdict = self.pool.correct(input_id, answer)
            if verdict is not None:
                samples.labelled += 1
                samples.correct += verdict
        if reply.cache_hits is not None:
            samples.cache_hits += reply.cache_hits
            samples.warm_hits += reply.warm_hits(ids, new_ids)
        for precision in reply.precisions:
            samples.precisions[precision] += 1
        self.last_done = max(self.last_done, done)
        self.counters[0] += 1

    def error(self, status: str, done: float) -> None:
        self.samples.errors[status] += 1
        self.last_done = max(self.last_done, done)
        self.counters[1] += 1


class LoadGenerator:
    """One process's load: its channels, its inputs, and the closed- and open-loop request loops.

    Requests go by ``config.protocol``, written and read with what ``model`` says of the model.
    Create, ``await connect()``, ``await run_step(...)`` per step, then ``await close()``, all in one event loop.
    """

    def __init__(
        self,
        config: LoadtestConfig,
        pool: Inputs,
        worker: int = 0,
        workers: int = 1,
        counters: MutableSequence[int] | None = None,
        model: ModelFacts | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.codec = CODECS[config.protocol](config, pool, model or ModelFacts())
        self.picker = InputPicker(pool, config, worker, workers, self.codec)
        self.counters = counters if counters is not None else [0, 0]
        self.worker, self.workers = worker, workers
        self._channels: list[grpc.aio.Channel] = []

    async def connect(self) -> None:
        """Open the channels (each its own connection) and wait until they are connected."""
        steps = [share(step, self.config, self.worker, self.workers) for step in self.config.steps()]
        needed = max(step.concurrency for step in steps) if steps[0].mode == "closed" else self.config.channels
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.use_local_subchannel_pool", 1),  # one connection per channel, not one shared
        ]
        count = min(self.config.channels, needed)
        tls = self.config.tls
        self._channels = [secure_or_plain_aio_channel(self.config.target, options, tls) for _ in range(count)]
        await asyncio.wait_for(
            asyncio.gather(*(channel.channel_ready() for channel in self._channels)), self.config.timeout_s
        )

    async def close(self) -> None:
        """Close the channels."""
        await asyncio.gather(*(channel.close() for channel in self._channels))

    async def run_step(self, step: WorkerStep, start: float) -> Samples:
        """Run ``step`` from event-loop time ``start`` (warm-up first) and return what it measured."""
        loop = asyncio.get_running_loop()
        self.counters[0] = self.counters[1] = 0
        transports: list[UnaryTransport] | list[StreamTransport]
        if self.config.stream:
            stream_timeout = step.time_bound_s(self.config.timeout_s)
            transports = [StreamTransport(channel, stream_timeout, self.codec) for channel in self._channels]
        else:
            transports = [UnaryTransport(channel, self.config.call_timeout_s, self.codec) for channel in self._channels]
        recorder = _Recorder(self.pool, self.counters)
        measure_from = start + step.warmup_s
        stop_at = measure_from + step.duration_s if step.duration_s is not None else math.inf
        if start > loop.time():
            await asyncio.sleep(start - loop.time())
        cpu_start, wall_start = time.thread_time(), loop.time()
        try:
            if step.mode == "closed":
                await self._closed_loop(step, transports, recorder, measure_from, stop_at)
            else:
                await self._open_loop(step, transports, recorder, start, measure_from, stop_at)
        finally:
            await asyncio.gather(*(transport.close() for transport in transports))
        samples = recorder.samples
        samples.latencies_s = np.asarray(recorder.latencies, dtype=np.float64)
        samples.send_lags_s = np.asarray(recorder.lags, dtype=np.float64)
        samples.elapsed_s = max(recorder.last_done - measure_from, 0.0)
        samples.loop_cpu_s = time.thread_time() - cpu_start
        samples.wall_s = loop.time() - wall_start
        samples.inputs_wrapped = self.picker.wrapped
        return samples

    async def _predict(self, transport: UnaryTransport | StreamTransport) -> Answered:
        """One request with the picker's next inputs: (its answer, the input ids it carried, those new)."""
        payload, ids, new_ids = self.picker.request()
        reply = await transport.predict(payload)
        self.picker.answered(new_ids)
        return reply, ids, new_ids

    @staticmethod
    def _record(recorder: _Recorder, outcome: Timed[Answered], open_loop: bool) -> None:
        if outcome.result is None:
            assert outcome.error is not None
            recorder.error(outcome.error.code().name, outcome.done)
            return
        reply, ids, new_ids = outcome.result
        lag_s = outcome.lag_s if open_loop else None
        recorder.ok(reply, ids, new_ids, outcome.latency_s, lag_s, outcome.done)

    async def _closed_loop(
        self,
        step: WorkerStep,
        transports: list[UnaryTransport] | list[StreamTransport],
        recorder: _Recorder,
        measure_from: float,
        stop_at: float,
    ) -> None:
        loop = asyncio.get_running_loop()
        budget = step.requests if step.requests is not None else math.inf

        async def caller(index: int) -> None:
            nonlocal budget
            transport = transports[index % len(transports)]
            while (now := loop.time()) < stop_at:
                measured = now >= measure_from
                if measured:
                    if budget <= 0:
                        return
                    budget -= 1
                outcome = await timed(now, lambda: self._predict(transport))
                if measured:
                    self._record(recorder, outcome, open_loop=False)

        await asyncio.gather(*(caller(index) for index in range(step.concurrency)))

    async def _open_loop(
        self,
        step: WorkerStep,
        transports: list[UnaryTransport] | list[StreamTransport],
        recorder: _Recorder,
        start: float,
        measure_from: float,
        stop_at: float,
    ) -> None:
        def schedule() -> Iterator[float]:
            measured_sent = 0
            for offset in self._arrivals(step):
                scheduled = start + offset
                measured = scheduled >= measure_from
                if scheduled >= stop_at or (measured and step.requests is not None and measured_sent >= step.requests):
                    return
                measured_sent += measured
                yield scheduled

        def done(number: int, outcome: Timed[Answered]) -> None:
            if outcome.scheduled >= measure_from:
                self._record(recorder, outcome, open_loop=True)

        await open_loop(schedule(), lambda number: self._predict(transports[number % len(transports)]), done)

    def _arrivals(self, step: WorkerStep) -> Iterator[float]:
        """Scheduled send times, in seconds from the step's start."""
        if self.config.arrivals == "constant":
            number = 0
            while True:
                yield step.phase_s + number / step.rate
                number += 1
        rng = np.random.default_rng([self.config.seed, self.worker, 1])
        offset = 0.0
        while True:
            offset += float(rng.exponential(1 / step.rate))
            yield offset
