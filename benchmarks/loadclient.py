"""The benchmarks' Python load client: concurrent ``grpc.aio`` calls of one request on one channel."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

from benchmarks.payloads import PREDICT
from costserve.loadtest.samples import percentile


@dataclass(frozen=True)
class LoadShape:
    """How a saturation run loads a server: ``streams`` concurrent calls on one connection.

    It measures ``duration_s`` after ``warmup_s``, or, with ``requests``, that many answers
    (still bounded in time).
    """

    streams: int
    duration_s: float
    warmup_s: float
    requests: int | None = None


@dataclass
class LoadResult:
    """One saturation run."""

    tool: str
    succeeded: int
    errors: int
    seconds: float
    rps: float
    latencies_ms: list[float] = field(repr=False)
    #: Server CPU per answered request while the load was steady, in microseconds: the main
    #: (event-loop) thread, and every thread of the process. NaN when not measured.
    loop_cpu_us: float = float("nan")
    process_cpu_us: float = float("nan")

    @property
    def p50_ms(self) -> float:
        """Median latency, in ms (nearest rank)."""
        return percentile(self.latencies_ms, 50)

    @property
    def p99_ms(self) -> float:
        """99th-percentile latency, in ms (nearest rank)."""
        return percentile(self.latencies_ms, 99)


def run_python_load(target: str, payload: bytes, shape: LoadShape, method: str = PREDICT) -> LoadResult:
    """The grpc.aio client: ``shape.streams`` concurrent calls of ``method`` with ``payload`` on one channel,
    bounded in time."""
    return asyncio.run(_python_load(target, payload, shape, method))


async def _python_load(target: str, payload: bytes, plan: LoadShape, method: str) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    completed = 0
    limit = plan.requests or 10**9
    loop = asyncio.get_running_loop()
    measuring_from = loop.time() + (0 if plan.requests else plan.warmup_s)
    ends_at = measuring_from + (plan.duration_s if not plan.requests else 120 + plan.requests / 100)
    async with grpc.aio.insecure_channel(target) as channel:
        predict = channel.unary_unary(method)

        async def stream() -> None:
            nonlocal errors, completed
            while completed < limit and loop.time() < ends_at:
                started = loop.time()
                try:
                    await predict(payload, timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                finished = loop.time()
                if measuring_from <= finished <= ends_at:  # answers completed inside the measured window
                    latencies.append((finished - started) * 1000.0)
                    completed += 1

        measure_start = time.perf_counter()
        await asyncio.gather(*(stream() for _ in range(plan.streams)))
        elapsed = time.perf_counter() - measure_start - (0 if plan.requests else plan.warmup_s)
    seconds = plan.duration_s if not plan.requests else max(elapsed, 1e-9)
    return LoadResult("python", completed, errors, seconds, completed / seconds, latencies)
