"""``costserve loadtest``: drive a costserve server and report what the load got and what it cost.

::

    costserve loadtest [--target HOST:PORT] [--concurrency N | --rate R | --sweep-concurrency 1,4,16 | --sweep-rate ...]
                       [--duration S | --requests N] [--warmup S] [--arrivals poisson|constant]
                       [--repeat FRACTION | --repeat zipf:S] [--images-per-request K] [--precision P]
                       [--deadline-ms MS] [--skip-cache] [--stream] [--processes N] [--channels N]
                       [--json [FILE]] [--csv [FILE]] [--plot FILE.png]

Load shapes. *Closed loop* (``--concurrency N``): N callers, each sends its next
request when the previous one is answered. *Open loop* (``--rate R``): requests
leave on a schedule (Poisson or evenly spaced arrivals at R per second) whether or
not earlier ones were answered, and each latency counts from the time the request
*should* have left, so a stalled server or a lagging generator cannot hide queueing
(no coordinated omission). A sweep runs one step per value and reports one row each.

Inputs. The server's held-out digits (scikit-learn's bundled digits, split exactly as
the server's training does), so every answer is checked against a known label. Past
the 360 held-out images, variants shifted by a pixel and with one corner pixel
XOR-ed with a small value keep the inputs distinct and their labels known. Each
input is serialized once; a request is the concatenation of its inputs' bytes and a
prepared tail (protobuf's wire format merges concatenated messages), sent through
``grpc.aio`` channels that skip request serialization.

``--repeat F`` makes a fraction F of the images repeat an input whose answer this
process already received (so, with the cache on, about F of the images are cache
hits); ``--repeat zipf:S`` draws every image from a catalog of ``--catalog`` inputs
by Zipf popularity with exponent S.

Several processes (``--processes N``, "spawn" start method) share the load; their
raw latency samples are pooled, so the percentiles are those of all requests, never
averages of per-process percentiles.

Example::

    from costserve.loadtest import LoadtestConfig, run_loadtest

    report = run_loadtest(LoadtestConfig(target="127.0.0.1:50051", concurrency=(1, 4, 16), requests=1000))
    for step in report.steps:
        print(step.summary()["latency_ms"]["p99"])
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import functools
import importlib.util
import json
import math
import multiprocessing
import multiprocessing.connection
import sys
import time
import traceback
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, MutableSequence, Sequence, TextIO

import grpc
import numpy as np

from costserve.client import (
    DEFAULT_TIMEOUT_S,
    MAX_MESSAGE_BYTES,
    PRECISION_NAMES,
    PRECISIONS,
    Client,
    image_message,
)
from costserve.v1 import classifier_pb2 as pb

PREDICT_METHOD = "/costserve.v1.Classifier/Predict"
PREDICT_STREAM_METHOD = "/costserve.v1.Classifier/PredictStream"

#: Percentiles every step reports (``max`` comes on top).
PERCENTILES = (50, 90, 95, 99)
#: One-pixel shifts (dy, dx) that make variants of a held-out digit; no shift first.
SHIFTS = ((0, 0), (0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1))
#: Values XOR-ed into the top-left pixel (at most 31 grey levels) to make further variants.
CORNER_TAGS = 32
#: Default Zipf catalog size, in distinct inputs.
DEFAULT_CATALOG = 10_000
#: The held-out split of the server's default model (see costserve.server.training).
HOLDOUT_FRACTION = 0.2
SPLIT_SEED = 1234
#: A generator process busier than this share of a core may be the bottleneck it measures.
BUSY_GENERATOR = 0.9
#: Open loop: sending later than this behind schedule (p99) is worth a note, in seconds.
LATE_SEND_S = 0.005
#: Open loop: wake this much before a scheduled send, since asyncio's timers fire up to ~1 ms late, in seconds.
TIMER_SLACK_S = 0.001
#: Several processes start a step together this long after the parent sends it, in seconds.
START_MARGIN_S = 0.2
#: How often the live progress line is redrawn, in seconds.
PROGRESS_INTERVAL_S = 0.5


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class RepeatSpec:
    """How inputs repeat: a ``fraction`` of images re-sent, or Zipf popularity with ``zipf_exponent``."""

    fraction: float = 0.0
    zipf_exponent: float | None = None

    @classmethod
    def parse(cls, text: str) -> "RepeatSpec":
        """``"0.3"`` (a fraction in [0, 1]) or ``"zipf:1.1"`` (an exponent >= 0)."""
        text = text.strip().lower()
        if text.startswith("zipf:"):
            exponent = float(text.removeprefix("zipf:"))
            if not exponent >= 0:
                raise ValueError(f"--repeat {text}: the Zipf exponent must be >= 0")
            return cls(zipf_exponent=exponent)
        fraction = float(text)
        if not 0 <= fraction <= 1:
            raise ValueError(f"--repeat {text}: a fraction must be in [0, 1], or use zipf:EXPONENT")
        return cls(fraction=fraction)

    def __str__(self) -> str:
        if self.zipf_exponent is not None:
            return f"zipf:{self.zipf_exponent:g}"
        return f"{self.fraction:g}"


@dataclass(frozen=True)
class LoadStep:
    """One load level: ``closed`` loop with ``value`` callers, or ``open`` loop at ``value`` requests/s."""

    mode: str
    value: float

    @property
    def label(self) -> str:
        """``concurrency 16`` or ``rate 200/s``."""
        return f"concurrency {int(self.value)}" if self.mode == "closed" else f"rate {self.value:g}/s"


@dataclass(frozen=True)
class LoadtestConfig:
    """Everything a load test does. Give ``concurrency`` (closed loop) or ``rate`` (open loop), one value per step.

    Stops each step after ``duration_s`` seconds or ``requests`` requests, whichever comes first (10 s
    when neither is set); ``warmup_s`` of the same load runs before each step and is not counted.
    """

    target: str = "127.0.0.1:50051"
    concurrency: tuple[int, ...] = ()
    rate: tuple[float, ...] = ()
    arrivals: str = "poisson"
    duration_s: float | None = None
    requests: int | None = None
    warmup_s: float = 1.0
    repeat: RepeatSpec = RepeatSpec()
    catalog: int = DEFAULT_CATALOG
    images_per_request: int = 1
    precision: str = "auto"
    deadline_ms: float | None = None
    skip_cache: bool = False
    stream: bool = False
    processes: int = 1
    channels: int = 4
    timeout_s: float = DEFAULT_TIMEOUT_S
    seed: int = 0

    def steps(self) -> list[LoadStep]:
        """The load levels, in order."""
        if self.rate:
            return [LoadStep("open", float(rate)) for rate in self.rate]
        return [LoadStep("closed", float(users)) for users in (self.concurrency or (1,))]

    @property
    def call_timeout_s(self) -> float:
        """Deadline of each unary call, in seconds."""
        return self.deadline_ms / 1000 if self.deadline_ms is not None else self.timeout_s

    @property
    def step_duration_s(self) -> float | None:
        """Measured seconds per step: ``duration_s``, or 10 s when neither a duration nor a count is set."""
        if self.duration_s is None and self.requests is None:
            return 10.0
        return self.duration_s

    def validate(self) -> None:
        """Raise ValueError, with a message naming the flag, on settings that cannot run."""
        if self.concurrency and self.rate:
            raise ValueError("give a concurrency (closed loop) or a rate (open loop), not both")
        if any(users < 1 for users in self.concurrency):
            raise ValueError("--concurrency must be at least 1")
        if any(not rate > 0 for rate in self.rate):
            raise ValueError("--rate must be above 0 requests/s")
        if self.arrivals not in ("poisson", "constant"):
            raise ValueError("--arrivals is poisson or constant")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError("--duration must be above 0 seconds")
        if self.requests is not None and self.requests < 1:
            raise ValueError("--requests must be at least 1")
        if self.warmup_s < 0:
            raise ValueError("--warmup must be 0 or more seconds")
        if self.images_per_request < 1:
            raise ValueError("--images-per-request must be at least 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision is one of {', '.join(PRECISIONS)}")
        if self.deadline_ms is not None and not self.deadline_ms > 0:
            raise ValueError("--deadline-ms must be above 0")
        if self.stream and self.deadline_ms is not None:
            raise ValueError("--deadline-ms sets a deadline per call; a stream has one deadline for all its requests")
        if self.processes < 1 or self.channels < 1:
            raise ValueError("--processes and --channels must be at least 1")
        if not self.rate and self.processes > min(self.concurrency or (1,)):
            raise ValueError("--processes cannot exceed --concurrency (each process needs at least one caller)")
        if self.catalog < 1:
            raise ValueError("--catalog must be at least 1")
        if self.seed < 0:
            raise ValueError("--seed must be 0 or more")


# --------------------------------------------------------------------------- inputs


def load_holdout_digits(height: int = 28, width: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """The server's held-out digits as uint8 (n, height, width) with their labels.

    The same images and split as ``costserve.server.training.load_sklearn_digits``
    (scikit-learn's bundled 8x8 digits scaled to 0..255, resized bilinearly, 20%
    held out stratified with seed 1234), without importing the server or TensorFlow.
    """
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    small = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
    images = np.stack(
        [np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)) for image in small]
    )
    _, holdout_images, _, holdout_labels = train_test_split(
        images, digits.target, test_size=HOLDOUT_FRACTION, random_state=SPLIT_SEED, stratify=digits.target
    )
    return holdout_images, holdout_labels.astype(np.int64)


def variant(images: np.ndarray, input_id: int) -> np.ndarray:
    """Input ``input_id``: held-out image ``input_id % n``, shifted by a pixel and corner-tagged by its variant.

    Ids below n are the held-out images themselves; the next 8n are one-pixel shifts;
    further ids also XOR the top-left pixel with 1..31, which keeps every input distinct
    and its label unchanged.
    """
    count = len(images)
    base = images[input_id % count]
    number = input_id // count
    (dy, dx), tag = SHIFTS[number % len(SHIFTS)], number // len(SHIFTS)
    shifted = np.zeros_like(base)
    height, width = base.shape
    shifted[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = base[
        max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    shifted[0, 0] ^= tag
    return shifted


class InputPool:
    """Distinct labelled inputs, each serialized once (as a ``PredictRequest.images`` field) on first use."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images
        self.labels = labels
        #: Number of distinct inputs; ids wrap around past it.
        self.size = len(images) * len(SHIFTS) * CORNER_TAGS
        self._fields: list[bytes | None] = [None] * self.size

    def label(self, input_id: int) -> int:
        """The known label of input ``input_id``."""
        return int(self.labels[input_id % len(self.labels)])

    def field(self, input_id: int) -> bytes:
        """The serialized ``images`` entry of input ``input_id``."""
        serialized = self._fields[input_id]
        if serialized is None:
            request = pb.PredictRequest(images=[image_message(variant(self.images, input_id))])
            serialized = self._fields[input_id] = request.SerializeToString()
        return serialized


class InputPicker:
    """Chooses each image of one process's requests: distinct, repeated by fraction, or Zipf-popular.

    Distinct inputs start at id ``seed * 360`` (so a new seed meets a cold cache) and are
    striped over processes (process i of n takes the i-th, (i+n)-th, ... of them), so
    processes never repeat one another's inputs by accident.
    """

    def __init__(self, pool: InputPool, config: LoadtestConfig, worker: int, workers: int) -> None:
        self.pool = pool
        self.repeat = config.repeat
        self.worker, self.workers = worker, workers
        self.rng = np.random.default_rng([config.seed, worker])
        self.tail = pb.PredictRequest(
            precision=PRECISIONS[config.precision], skip_cache=config.skip_cache
        ).SerializeToString()
        self.images_per_request = config.images_per_request
        #: True once every distinct input was used and ids wrapped around.
        self.wrapped = False
        self._first_id = config.seed * len(pool.images)
        self._next_distinct = 0
        self._picked = 0
        self._answered: list[int] = []
        self._zipf_seen: set[int] = set()
        self._zipf_cdf: np.ndarray | None = None
        if self.repeat.zipf_exponent is not None:
            ranks = np.arange(1, min(config.catalog, pool.size) + 1, dtype=np.float64)
            weights = ranks ** -self.repeat.zipf_exponent
            self._zipf_cdf = np.cumsum(weights) / weights.sum()

    def request(self) -> tuple[bytes, list[int], list[int]]:
        """(serialized PredictRequest, the input ids it carries, those sent for the first time)."""
        ids: list[int] = []
        new: list[int] = []
        for _ in range(self.images_per_request):
            input_id, is_new = self._pick()
            ids.append(input_id)
            if is_new:
                new.append(input_id)
        return b"".join([self.pool.field(input_id) for input_id in ids] + [self.tail]), ids, new

    def answered(self, new_ids: list[int]) -> None:
        """Record that the inputs ``new_ids`` were answered (a fractional repeat re-sends only those)."""
        if self.repeat.fraction:
            self._answered.extend(new_ids)

    def _pick(self) -> tuple[int, bool]:
        if self._zipf_cdf is not None:
            rank = min(int(np.searchsorted(self._zipf_cdf, self.rng.random(), side="right")), len(self._zipf_cdf) - 1)
            input_id = (self._first_id + rank) % self.pool.size
            is_new = input_id not in self._zipf_seen
            self._zipf_seen.add(input_id)
            return input_id, is_new
        position, self._picked = self._picked, self._picked + 1
        # Position i repeats when floor((i + 1) F) > floor(i F): exactly F of the positions, spread evenly.
        is_repeat_slot = math.floor((position + 1) * self.repeat.fraction) > math.floor(position * self.repeat.fraction)
        if is_repeat_slot and self._answered:
            return self._answered[int(self.rng.integers(len(self._answered)))], False
        distinct = self.worker + self.workers * self._next_distinct
        self._next_distinct += 1
        if distinct >= self.pool.size:
            self.wrapped = True
        return (self._first_id + distinct) % self.pool.size, True


# --------------------------------------------------------------------------- samples and their merge


@dataclass
class Samples:
    """What one process measured in one step; :func:`merge` pools several exactly.

    Latencies are raw samples (seconds, successful requests only; a run is bounded by its
    duration or request count), so pooled percentiles are exact.
    """

    latencies_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    #: Open loop: how late each request left compared with its schedule, in seconds.
    send_lags_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    #: Failed requests by gRPC status name.
    errors: Counter = field(default_factory=Counter)
    predictions: int = 0
    cache_hits: int = 0
    #: Cache hits on inputs this process sent for the first time: the cache was warm before the run.
    warm_hits: int = 0
    correct: int = 0
    #: Predictions by the variant that answered ("fp32", "int8").
    precisions: Counter = field(default_factory=Counter)
    cost_usd: float = 0.0
    #: From the step's measured start to its last answer, in seconds.
    elapsed_s: float = 0.0
    #: CPU time of the generator's event-loop thread, in seconds (the thread that saturates first).
    loop_cpu_s: float = 0.0
    #: Wall time of the whole step, warm-up included, in seconds (what ``loop_cpu_s`` is a share of).
    wall_s: float = 0.0
    inputs_wrapped: bool = False

    @property
    def ok(self) -> int:
        """Requests answered with status OK."""
        return len(self.latencies_s)

    @property
    def requests(self) -> int:
        """Requests sent and finished, answered or failed."""
        return self.ok + sum(self.errors.values())


def merge(parts: Sequence[Samples]) -> Samples:
    """Pool the samples of processes that ran the same step at the same time."""
    return Samples(
        latencies_s=np.concatenate([part.latencies_s for part in parts]) if parts else np.empty(0),
        send_lags_s=np.concatenate([part.send_lags_s for part in parts]) if parts else np.empty(0),
        errors=sum((part.errors for part in parts), Counter()),
        predictions=sum(part.predictions for part in parts),
        cache_hits=sum(part.cache_hits for part in parts),
        warm_hits=sum(part.warm_hits for part in parts),
        correct=sum(part.correct for part in parts),
        precisions=sum((part.precisions for part in parts), Counter()),
        cost_usd=sum(part.cost_usd for part in parts),
        elapsed_s=max((part.elapsed_s for part in parts), default=0.0),
        loop_cpu_s=sum(part.loop_cpu_s for part in parts),
        wall_s=max((part.wall_s for part in parts), default=0.0),
        inputs_wrapped=any(part.inputs_wrapped for part in parts),
    )


def percentiles_ms(latencies_s: np.ndarray) -> dict[str, float | None]:
    """p50/p90/p95/p99/max/mean in ms, nearest-rank (each a measured latency), or None without samples."""
    names = [f"p{q}" for q in PERCENTILES] + ["max", "mean"]
    if len(latencies_s) == 0:
        return dict.fromkeys(names)
    values = np.quantile(latencies_s, [q / 100 for q in PERCENTILES], method="inverted_cdf")
    values = [*values, latencies_s.max(), latencies_s.mean()]
    return {name: float(value) * 1000 for name, value in zip(names, values)}


def _p99(values: np.ndarray) -> float | None:
    return float(np.quantile(values, 0.99, method="inverted_cdf")) if len(values) else None


@dataclass
class StepResult:
    """One load level: what each process measured, and the pooled summary."""

    step: LoadStep
    index: int
    workers: list[Samples]
    config: LoadtestConfig

    @functools.cached_property
    def merged(self) -> Samples:
        """The samples of all processes, pooled."""
        return merge(self.workers)

    def summary(self) -> dict[str, Any]:
        """The report row: throughput, latency percentiles (ms), errors by status, hits, accuracy, cost."""
        merged = self.merged
        elapsed = merged.elapsed_s
        ok_images = merged.predictions
        mean_cost = merged.cost_usd / ok_images if ok_images else None
        send_lag_p99 = _p99(merged.send_lags_s)
        return {
            "step": self.index + 1,
            "mode": self.step.mode,
            "concurrency": int(self.step.value) if self.step.mode == "closed" else None,
            "rate": self.step.value if self.step.mode == "open" else None,
            "arrivals": self.config.arrivals if self.step.mode == "open" else None,
            "requests": merged.requests,
            "ok": merged.ok,
            "errors": dict(sorted(merged.errors.items())),
            "duration_s": elapsed,
            "throughput_rps": merged.ok / elapsed if elapsed else 0.0,
            "images_per_s": ok_images / elapsed if elapsed else 0.0,
            "latency_ms": percentiles_ms(merged.latencies_s),
            "predictions": ok_images,
            "cache_hit_ratio": merged.cache_hits / ok_images if ok_images else None,
            "accuracy": merged.correct / ok_images if ok_images else None,
            "precision_mix": {name: count / ok_images for name, count in sorted(merged.precisions.items())},
            "cost_usd_per_prediction": mean_cost,
            "cost_usd_per_million": mean_cost * 1e6 if mean_cost is not None else None,
            "client": {
                "processes": len(self.workers),
                "loop_cpu_cores": merged.loop_cpu_s / merged.wall_s if merged.wall_s else 0.0,
                "send_lag_p99_ms": send_lag_p99 * 1000 if send_lag_p99 is not None else None,
            },
            "notes": self.notes(),
        }

    def notes(self) -> list[str]:
        """Warnings about the measurement itself: a busy generator, late sends, inputs that ran out."""
        notes = []
        busiest = max((part.loop_cpu_s / part.wall_s for part in self.workers if part.wall_s), default=0.0)
        if busiest > BUSY_GENERATOR:
            notes.append(
                f"a load-generator event loop was busy {busiest:.0%} of the time: it may be the bottleneck; "
                "add --processes"
            )
        send_lag_p99 = _p99(self.merged.send_lags_s)
        if send_lag_p99 is not None and send_lag_p99 > LATE_SEND_S:
            notes.append(
                f"requests left up to {send_lag_p99 * 1000:.1f} ms (p99) behind schedule; "
                "their latency still counts from the scheduled time"
            )
        if any(part.inputs_wrapped for part in self.workers):
            notes.append("every distinct input was used; later inputs repeat earlier ones")
        warm_hits = self.merged.warm_hits
        # Under Zipf, processes share one catalog, so another process may have sent a "new" input first.
        if warm_hits and (self.config.repeat.zipf_exponent is None or len(self.workers) == 1):
            notes.append(
                f"{warm_hits:,} cache hits on inputs this run had not sent before: the server's cache already held "
                "them; pass a new --seed for unseen inputs, or --skip-cache"
            )
        return notes


@dataclass
class LoadReport:
    """A whole load test: the server, the settings, and one :class:`StepResult` per load level."""

    target: str
    model: str
    config: LoadtestConfig
    steps: list[StepResult]

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (the ``--json`` document)."""
        settings = asdict(self.config)
        settings["repeat"] = str(self.config.repeat)
        return {
            "target": self.target,
            "model": self.model,
            "settings": settings,
            "steps": [step.summary() for step in self.steps],
        }


# --------------------------------------------------------------------------- transports


class UnaryTransport:
    """``Predict`` calls on one channel, each with its own deadline."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float) -> None:
        self._call = channel.unary_unary(PREDICT_METHOD, response_deserializer=pb.PredictResponse.FromString)
        self._timeout_s = timeout_s

    async def predict(self, payload: bytes) -> pb.PredictResponse:
        """Send one serialized PredictRequest; raise ``grpc.aio.AioRpcError`` on failure."""
        return await self._call(payload, timeout=self._timeout_s)

    async def close(self) -> None:
        """Nothing to close: each call ends by itself."""


@dataclass
class _OpenStream:
    call: grpc.aio.StreamStreamCall
    #: Futures of the requests written and not yet answered, in order.
    pending: deque = field(default_factory=deque)
    finished: bool = False
    reader: asyncio.Task | None = None


class StreamTransport:
    """Requests pipelined on one ``PredictStream`` call; answers (in order) are matched to their requests.

    When the server ends the stream with an error, every request still waiting on it fails with
    that status, and the next request opens a new stream.
    """

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float) -> None:
        self._method = channel.stream_stream(PREDICT_STREAM_METHOD, response_deserializer=pb.PredictResponse.FromString)
        self._timeout_s = timeout_s
        self._stream: _OpenStream | None = None
        self._write_lock = asyncio.Lock()

    async def predict(self, payload: bytes) -> pb.PredictResponse:
        """Send one serialized PredictRequest on the stream and wait for its answer."""
        answer: asyncio.Future = asyncio.get_running_loop().create_future()
        async with self._write_lock:
            if self._stream is None or self._stream.finished:
                self._stream = _OpenStream(self._method(timeout=self._timeout_s))
                self._stream.reader = asyncio.ensure_future(self._read(self._stream))
            stream = self._stream
            # Queued before writing: the reader resolves it, even if the stream fails during the write.
            stream.pending.append(answer)
            try:
                await stream.call.write(payload)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the stream ended; its reader fails every pending answer with the stream's status
        return await answer

    async def close(self) -> None:
        """Half-close the stream and wait until every answer arrived."""
        async with self._write_lock:
            stream, self._stream = self._stream, None
        if stream is None:
            return
        if not stream.finished:
            try:
                await stream.call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # already ended; the reader saw why
        assert stream.reader is not None
        await stream.reader

    @staticmethod
    async def _read(stream: _OpenStream) -> None:
        error: grpc.aio.AioRpcError | None = None
        try:
            while (response := await stream.call.read()) is not grpc.aio.EOF:
                stream.pending.popleft().set_result(response)
        except grpc.aio.AioRpcError as failure:
            error = failure
        stream.finished = True
        if stream.pending and error is None:
            error = grpc.aio.AioRpcError(
                grpc.StatusCode.UNKNOWN, grpc.aio.Metadata(), grpc.aio.Metadata(), "the stream ended before answering"
            )
        while stream.pending:
            stream.pending.popleft().set_exception(error)


# --------------------------------------------------------------------------- the generator (one process)


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

    def __init__(self, pool: InputPool, counters: MutableSequence[int]) -> None:
        self.pool = pool
        self.counters = counters
        self.latencies: list[float] = []
        self.lags: list[float] = []
        self.samples = Samples()
        self.last_done = 0.0

    def ok(
        self,
        response: pb.PredictResponse,
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
        samples.cost_usd += response.cost.usd
        for input_id, prediction in zip(ids, response.predictions):
            samples.predictions += 1
            samples.cache_hits += prediction.cache_hit
            samples.warm_hits += prediction.cache_hit and input_id in new_ids
            samples.correct += prediction.label == self.pool.label(input_id)
            samples.precisions[PRECISION_NAMES.get(prediction.precision, str(prediction.precision))] += 1
        self.last_done = max(self.last_done, done)
        self.counters[0] += 1

    def error(self, status: str, done: float) -> None:
        self.samples.errors[status] += 1
        self.last_done = max(self.last_done, done)
        self.counters[1] += 1


class LoadGenerator:
    """One process's load: its channels, its inputs, and the closed- and open-loop request loops.

    Create, ``await connect()``, ``await run_step(...)`` per step, then ``await close()``, all in one event loop.
    """

    def __init__(
        self,
        config: LoadtestConfig,
        pool: InputPool,
        worker: int = 0,
        workers: int = 1,
        counters: MutableSequence[int] | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.picker = InputPicker(pool, config, worker, workers)
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
        self._channels = [grpc.aio.insecure_channel(self.config.target, options=options) for _ in range(count)]
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
            transports = [StreamTransport(channel, stream_timeout) for channel in self._channels]
        else:
            transports = [UnaryTransport(channel, self.config.call_timeout_s) for channel in self._channels]
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

    async def _send(
        self,
        transport: UnaryTransport | StreamTransport,
        recorder: _Recorder,
        scheduled: float,
        measured: bool,
        open_loop: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        payload, ids, new_ids = self.picker.request()
        sent = loop.time()
        try:
            response = await transport.predict(payload)
        except grpc.aio.AioRpcError as error:
            if measured:
                recorder.error(error.code().name, loop.time())
            return
        done = loop.time()
        self.picker.answered(new_ids)
        if measured:
            # From the scheduled time, or from the actual send when the timer woke a little early.
            latency = done - min(scheduled, sent)
            recorder.ok(response, ids, new_ids, latency, sent - scheduled if open_loop else None, done)

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
                await self._send(transport, recorder, now, measured, open_loop=False)

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
        loop = asyncio.get_running_loop()
        in_flight: set[asyncio.Task] = set()
        measured_sent = 0
        for number, offset in enumerate(self._arrivals(step)):
            scheduled = start + offset
            measured = scheduled >= measure_from
            if scheduled >= stop_at or (measured and step.requests is not None and measured_sent >= step.requests):
                break
            if measured:
                measured_sent += 1
            if scheduled - TIMER_SLACK_S > loop.time():
                await asyncio.sleep(scheduled - TIMER_SLACK_S - loop.time())
            task = asyncio.ensure_future(
                self._send(transports[number % len(transports)], recorder, scheduled, measured, open_loop=True)
            )
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight)

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


# --------------------------------------------------------------------------- running: one process or several


class ProgressLine:
    """A live status line, redrawn in place on a terminal (``stream`` None: silent)."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self._last: tuple[float, int] = (0.0, 0)

    def show(self, step: LoadStep, index: int, total: int, elapsed_s: float, answered: int, failed: int) -> None:
        """Redraw: step, elapsed time, answered and failed requests, recent requests/s."""
        if self.stream is None:
            return
        last_time, last_answered = self._last
        rate = (answered - last_answered) / (elapsed_s - last_time) if elapsed_s > last_time else 0.0
        self._last = (elapsed_s, answered)
        self.stream.write(
            f"\r\033[K[{index + 1}/{total}] {step.label}: {elapsed_s:5.1f} s, {answered:,} ok, "
            f"{failed:,} failed, {rate:,.0f} req/s"
        )
        self.stream.flush()

    def clear(self) -> None:
        """Erase the line (the step's row is printed in the report)."""
        self._last = (0.0, 0)
        if self.stream is not None:
            self.stream.write("\r\033[K")
            self.stream.flush()


async def _run_in_process(config: LoadtestConfig, pool: InputPool, progress: ProgressLine) -> list[list[Samples]]:
    loop = asyncio.get_running_loop()
    generator = LoadGenerator(config, pool)
    await generator.connect()
    results = []
    try:
        steps = config.steps()
        for index, step in enumerate(steps):
            start = loop.time()
            running = asyncio.ensure_future(generator.run_step(share(step, config, 0, 1), start))
            while not running.done():
                await asyncio.wait([running], timeout=PROGRESS_INTERVAL_S)
                progress.show(step, index, len(steps), loop.time() - start, *generator.counters)
            progress.clear()
            results.append([running.result()])
    finally:
        await generator.close()
    return results


def _worker_main(
    connection: multiprocessing.connection.Connection,
    config: LoadtestConfig,
    images: np.ndarray,
    labels: np.ndarray,
    worker: int,
    counters: MutableSequence[int],
) -> None:
    """A generator process: connect, say "ready", then run each step it is sent until told to stop."""

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        generator = LoadGenerator(config, InputPool(images, labels), worker, config.processes, counters)
        await generator.connect()
        try:
            connection.send(("ready", None))
            while (message := await loop.run_in_executor(None, connection.recv))[0] == "step":
                step, start_wall = message[1]
                start = loop.time() + (start_wall - time.time())
                connection.send(("result", await generator.run_step(step, start)))
        finally:
            await generator.close()

    try:
        asyncio.run(serve())
    except BaseException:
        connection.send(("error", traceback.format_exc()))


class LoadGeneratorFailed(RuntimeError):
    """A load-generator process failed or exited; the message carries its traceback."""


def _collect(
    connections: list[multiprocessing.connection.Connection],
    kind: str,
    on_wait: Callable[[], None] | None = None,
) -> list[Any]:
    """One ``kind`` message from every worker, in worker order; raise if one failed or exited.

    ``on_wait`` runs between waits of at most PROGRESS_INTERVAL_S (it redraws the progress line).
    """
    received: dict[int, Any] = {}
    while len(received) < len(connections):
        waiting = [connection for index, connection in enumerate(connections) if index not in received]
        for connection in multiprocessing.connection.wait(waiting, timeout=PROGRESS_INTERVAL_S):
            index = connections.index(connection)  # type: ignore[arg-type]
            try:
                message_kind, payload = connection.recv()  # type: ignore[union-attr]
            except EOFError:  # the process exited: its end of the pipe closed
                raise LoadGeneratorFailed(f"load-generator process {index} exited unexpectedly") from None
            if message_kind != kind:
                raise LoadGeneratorFailed(f"load-generator process {index} failed:\n{payload}")
            received[index] = payload
        if on_wait is not None:
            on_wait()
    return [received[index] for index in range(len(connections))]


def _run_in_processes(
    config: LoadtestConfig, images: np.ndarray, labels: np.ndarray, progress: ProgressLine
) -> list[list[Samples]]:
    context = multiprocessing.get_context("spawn")  # fresh interpreters: nothing inherited, TensorFlow-free
    processes: list[multiprocessing.process.BaseProcess] = []
    connections: list[multiprocessing.connection.Connection] = []
    counters = [context.RawArray("q", 2) for _ in range(config.processes)]
    stopped = False
    try:
        for worker in range(config.processes):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=_worker_main,
                args=(child_end, config, images, labels, worker, counters[worker]),
                name=f"costserve-loadtest-{worker}",
                daemon=True,
            )
            process.start()
            child_end.close()
            processes.append(process)
            connections.append(parent_end)
        _collect(connections, "ready")
        results = []
        steps = config.steps()
        for index, step in enumerate(steps):
            start_wall = time.time() + START_MARGIN_S
            for worker, connection in enumerate(connections):
                counters[worker][0] = counters[worker][1] = 0
                connection.send(("step", (share(step, config, worker, config.processes), start_wall)))

            def show(step: LoadStep = step, index: int = index, start_wall: float = start_wall) -> None:
                answered = sum(counter[0] for counter in counters)
                failed = sum(counter[1] for counter in counters)
                progress.show(step, index, len(steps), max(time.time() - start_wall, 0.0), answered, failed)

            results.append(_collect(connections, "result", on_wait=show))
            progress.clear()
        for connection in connections:
            connection.send(("stop", None))
        stopped = True
        return results
    finally:
        for process, connection in zip(processes, connections):
            if not stopped:  # something failed: the others need not finish their step
                process.terminate()
            process.join(timeout=10)
            connection.close()


def run_loadtest(config: LoadtestConfig, progress: TextIO | None = None) -> LoadReport:
    """Run every step of ``config`` against ``config.target``; ``progress`` gets a live status line.

    Raises ValueError on settings that cannot run, ``grpc.RpcError`` when the server does not answer, and
    :class:`LoadGeneratorFailed` when a load-generator process fails.
    """
    config.validate()
    with Client(config.target, timeout=config.timeout_s) as client:
        info = client.model_info()
    if config.images_per_request > info.max_images_per_request:
        raise ValueError(
            f"--images-per-request {config.images_per_request} exceeds the server's limit of "
            f"{info.max_images_per_request} images per request"
        )
    height, width = int(info.input_shape[0]), int(info.input_shape[1])
    images, labels = load_holdout_digits(height, width)
    line = ProgressLine(progress)
    if config.processes == 1:
        parts = asyncio.run(_run_in_process(config, InputPool(images, labels), line))
    else:
        parts = _run_in_processes(config, images, labels, line)
    steps = [
        StepResult(step, index, workers, config) for index, (step, workers) in enumerate(zip(config.steps(), parts))
    ]
    return LoadReport(target=config.target, model=f"{info.name} version {info.version}", config=config, steps=steps)


# --------------------------------------------------------------------------- output


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _percent(ratio: float | None) -> str:
    return _number(ratio * 100 if ratio is not None else None)


def format_table(report: LoadReport) -> str:
    """The human-readable report: one row per step, then errors, precision mix and notes."""
    config = report.config
    inputs = "distinct" if config.repeat == RepeatSpec() else f"repeat {config.repeat}"
    lines = [
        f"costserve loadtest: {report.target} ({report.model}); "
        f"{'open loop, ' + config.arrivals + ' arrivals' if config.rate else 'closed loop'}, "
        f"{'PredictStream' if config.stream else 'Predict'}, {config.images_per_request} image(s)/request, "
        f"precision {config.precision}, inputs {inputs}{', cache skipped' if config.skip_cache else ''}, "
        f"{config.processes} process(es)",
    ]
    header = (
        f"{'load':<18} {'requests':>9} {'errors':>7} {'req/s':>9} {'img/s':>9} {'p50 ms':>8} {'p90 ms':>8} "
        f"{'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} {'hit %':>6} {'acc %':>6} {'$/pred':>10} {'$/1M pred':>10}"
    )
    lines += [header, "-" * len(header)]
    details = []
    for step in report.steps:
        row = step.summary()
        latency = row["latency_ms"]
        cost = row["cost_usd_per_prediction"]
        lines.append(
            f"{step.step.label:<18} {row['requests']:>9,} {sum(row['errors'].values()):>7,} "
            f"{row['throughput_rps']:>9,.1f} {row['images_per_s']:>9,.1f} {_number(latency['p50'], 2):>8} "
            f"{_number(latency['p90'], 2):>8} {_number(latency['p95'], 2):>8} {_number(latency['p99'], 2):>8} "
            f"{_number(latency['max'], 2):>8} {_percent(row['cache_hit_ratio']):>6} {_percent(row['accuracy']):>6} "
            f"{'-' if cost is None else f'{cost:.3e}':>10} {_number(row['cost_usd_per_million'], 4):>10}"
        )
        parts = []
        if row["errors"]:
            parts.append("errors " + ", ".join(f"{code} {count:,}" for code, count in row["errors"].items()))
        if row["precision_mix"]:
            mix = row["precision_mix"].items()
            parts.append("precision " + ", ".join(f"{name} {fraction:.0%}" for name, fraction in mix))
        parts += row["notes"]
        details += [f"{step.step.label}: {part}" for part in parts]
    return "\n".join(lines + details) + "\n"


def write_json(report: LoadReport, output: TextIO) -> None:
    """Write the report as one JSON document."""
    json.dump(report.to_dict(), output, indent=2)
    output.write("\n")


def write_csv(report: LoadReport, output: TextIO) -> None:
    """Write one CSV row per step; errors get one ``errors_<STATUS>`` column per status seen."""
    rows = [step.summary() for step in report.steps]
    statuses = sorted({code for row in rows for code in row["errors"]})
    precisions = sorted({name for row in rows for name in row["precision_mix"]})
    scalar = [
        "step", "mode", "concurrency", "rate", "arrivals", "requests", "ok", "duration_s", "throughput_rps",
        "images_per_s", "predictions", "cache_hit_ratio", "accuracy", "cost_usd_per_prediction", "cost_usd_per_million",
    ]  # fmt: skip
    latency = [f"{name}_ms" for name in ("p50", "p90", "p95", "p99", "max", "mean")]
    writer = csv.writer(output, lineterminator="\n")
    header = scalar + latency + [f"{name}_share" for name in precisions] + [f"errors_{code}" for code in statuses]
    writer.writerow(header)
    for row in rows:
        writer.writerow(
            [row[name] for name in scalar]
            + [row["latency_ms"][name.removesuffix("_ms")] for name in latency]
            + [row["precision_mix"].get(name, 0.0) for name in precisions]
            + [row["errors"].get(code, 0) for code in statuses]
        )


class MissingPlotExtra(ImportError):
    """``--plot`` without matplotlib installed."""


def require_matplotlib() -> None:
    """Raise :class:`MissingPlotExtra`, saying how to install it, when matplotlib cannot be imported."""
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingPlotExtra(
            "--plot needs matplotlib, which comes with the `plot` extra: pip install 'costserve[plot]'"
        )


def plot_report(report: LoadReport, path: Path) -> None:
    """Draw latency percentiles and throughput against the swept load into the PNG ``path``.

    The points drawn are also stored in the PNG's ``Description`` text chunk, as JSON.
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    rows = [step.summary() for step in report.steps]
    open_loop = bool(report.config.rate)
    loads = [row["rate"] if open_loop else row["concurrency"] for row in rows]
    points: dict[str, list[float | None]] = {"load": loads}
    for name in ("p50", "p90", "p95", "p99"):
        points[f"{name}_ms"] = [row["latency_ms"][name] for row in rows]
    points["throughput_rps"] = [row["throughput_rps"] for row in rows]
    points["failed_rps"] = [
        sum(row["errors"].values()) / row["duration_s"] if row["duration_s"] else 0.0 for row in rows
    ]

    figure, (latency_axes, throughput_axes) = pyplot.subplots(2, 1, sharex=True, figsize=(7, 7))
    try:
        for name in ("p50", "p90", "p95", "p99"):
            values = [math.nan if value is None else value for value in points[f"{name}_ms"]]
            latency_axes.plot(loads, values, marker="o", label=name)
        latency_axes.set_ylim(bottom=0)
        latency_axes.set_ylabel("latency (ms)")
        latency_axes.legend()
        latency_axes.grid(True, alpha=0.3)
        throughput_axes.plot(loads, points["throughput_rps"], marker="o", label="answered req/s")
        if any(points["failed_rps"]):
            throughput_axes.plot(loads, points["failed_rps"], marker="x", color="tab:red", label="failed req/s")
        if open_loop:
            throughput_axes.plot(loads, loads, linestyle="--", color="grey", label="offered req/s")
        throughput_axes.set_ylim(bottom=0)
        throughput_axes.set_ylabel("throughput (req/s)")
        throughput_axes.set_xlabel("offered rate (req/s)" if open_loop else "concurrency (callers)")
        throughput_axes.legend()
        throughput_axes.grid(True, alpha=0.3)
        if len(loads) > 1 and max(loads) / min(loads) >= 8:
            throughput_axes.set_xscale("log")
        throughput_axes.set_xticks(loads, [f"{load:g}" for load in loads])
        throughput_axes.minorticks_off()
        latency_axes.set_title(f"costserve loadtest: {report.target} ({report.model})")
        figure.tight_layout()
        figure.savefig(path, format="png", metadata={"Description": json.dumps(points)})
    finally:
        pyplot.close(figure)


# --------------------------------------------------------------------------- command line


def _numbers(kind: Callable[[str], float], text: str) -> tuple[float, ...]:
    values = tuple(kind(value) for value in text.split(",") if value.strip())
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list, e.g. 1,4,16")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``costserve loadtest`` options to ``parser``."""
    parser.add_argument(
        "--target", default=argparse.SUPPRESS, help="server address HOST:PORT (same as costserve --target)"
    )
    load = parser.add_argument_group("load (one of; default --concurrency 1)").add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, metavar="N", help="closed loop: N callers, each waits for its answer")
    load.add_argument("--rate", type=float, metavar="R", help="open loop: R requests/s whatever the answers")
    load.add_argument(
        "--sweep-concurrency", type=functools.partial(_numbers, int), metavar="LIST", help="closed-loop steps: 1,4,16"
    )
    load.add_argument(
        "--sweep-rate", type=functools.partial(_numbers, float), metavar="LIST", help="open-loop steps (req/s): 50,100"
    )
    shape = parser.add_argument_group("length and timing")
    shape.add_argument(
        "--arrivals", choices=("poisson", "constant"), default="poisson", help="open-loop arrivals (default poisson)"
    )
    shape.add_argument(
        "--duration", type=float, metavar="S", help="seconds measured per step (default 10 unless --requests)"
    )
    shape.add_argument(
        "--requests", type=int, metavar="N", help="requests measured per step (with --duration: what comes first)"
    )
    shape.add_argument(
        "--warmup", type=float, default=1.0, metavar="S", help="seconds of unmeasured load before each step (default 1)"
    )
    inputs = parser.add_argument_group("requests")
    inputs.add_argument(
        "--repeat",
        type=RepeatSpec.parse,
        default=RepeatSpec(),
        metavar="F|zipf:S",
        help="share of images that repeat an answered input (0..1, default 0: all distinct), "
        "or zipf:S for Zipf popularity with exponent S over --catalog inputs",
    )
    inputs.add_argument(
        "--catalog", type=int, default=DEFAULT_CATALOG, metavar="N",
        help=f"distinct inputs Zipf draws from (default {DEFAULT_CATALOG:,})",
    )  # fmt: skip
    inputs.add_argument("--images-per-request", type=int, default=1, metavar="K", help="images per request (default 1)")
    inputs.add_argument("--precision", choices=sorted(PRECISIONS), default="auto")
    inputs.add_argument("--deadline-ms", type=float, metavar="MS", help="deadline per call in ms (default --timeout)")
    inputs.add_argument("--skip-cache", action="store_true", help="ask the server to compute every answer")
    inputs.add_argument("--stream", action="store_true", help="pipeline requests on PredictStream calls, not Predict")
    inputs.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds input choices and Poisson arrivals, and picks the inputs: distinct ones start at SEED x 360, "
        "so a new seed meets a cold cache (default 0: the held-out digits first)",
    )
    client = parser.add_argument_group("load generator")
    client.add_argument("--processes", type=int, default=1, metavar="N", help="processes sharing the load (default 1)")
    client.add_argument("--channels", type=int, default=4, metavar="N", help="gRPC connections per process (default 4)")
    output = parser.add_argument_group("output")
    output.add_argument(
        "--json", nargs="?", const="-", metavar="FILE", help="write the report as JSON (to stdout without FILE)"
    )
    output.add_argument(
        "--csv", nargs="?", const="-", metavar="FILE", help="write one CSV row per step (to stdout without FILE)"
    )
    output.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="plot latency and throughput against the load (plot extra)"
    )


def config_from_args(args: argparse.Namespace) -> LoadtestConfig:
    """The :class:`LoadtestConfig` of parsed ``costserve loadtest`` arguments."""
    concurrency = args.sweep_concurrency or ((args.concurrency,) if args.concurrency is not None else ())
    rate = args.sweep_rate or ((args.rate,) if args.rate is not None else ())
    return LoadtestConfig(
        target=args.target,
        concurrency=tuple(concurrency),
        rate=tuple(rate),
        arrivals=args.arrivals,
        duration_s=args.duration,
        requests=args.requests,
        warmup_s=args.warmup,
        repeat=args.repeat,
        catalog=args.catalog,
        images_per_request=args.images_per_request,
        precision=args.precision,
        deadline_ms=args.deadline_ms,
        skip_cache=args.skip_cache,
        stream=args.stream,
        processes=args.processes,
        channels=args.channels,
        timeout_s=args.timeout,
        seed=args.seed,
    )


def _write(destination: str, writer: Callable[[LoadReport, TextIO], None], report: LoadReport) -> None:
    if destination == "-":
        writer(report, sys.stdout)
        return
    with open(destination, "w", newline="", encoding="utf-8") as output:
        writer(report, output)


def main(args: argparse.Namespace) -> int:
    """Run ``costserve loadtest`` with parsed arguments; print the report; exit code 0, or 2 on bad settings."""
    if args.json == "-" and args.csv == "-":
        print("costserve loadtest: --json and --csv cannot both go to stdout; give one a FILE", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
        config.validate()
        if args.plot is not None:
            require_matplotlib()
    except (ValueError, MissingPlotExtra) as error:
        print(f"costserve loadtest: {error}", file=sys.stderr)
        return 2
    progress = sys.stderr if sys.stderr.isatty() else None
    try:
        report = run_loadtest(config, progress=progress)
    except ValueError as error:
        print(f"costserve loadtest: {error}", file=sys.stderr)
        return 2
    except LoadGeneratorFailed as error:
        print(f"costserve loadtest: {error}", file=sys.stderr)
        return 1
    if "-" not in (args.json, args.csv):
        sys.stdout.write(format_table(report))
    if args.json is not None:
        _write(args.json, write_json, report)
    if args.csv is not None:
        _write(args.csv, write_csv, report)
    if args.plot is not None:
        plot_report(report, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0
