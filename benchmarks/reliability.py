"""Reliability benchmark: what bad input, heavy requests, overload, a flood and SIGTERM do to costserve.

``make bench-reliability`` runs ``python -m benchmarks.reliability`` from the repository
root and writes ``benchmarks/RESULTS-reliability.md``. Each part runs against a fresh
``costserve-server serve`` subprocess on 127.0.0.1 and port 0 (started with
:func:`benchmarks.launch.start_benchmark_server`, its ``/metrics`` read with
:mod:`costserve.metrics_text`), stopped in ``finally``; every load loop is bounded in
count and in time.

a. **Fuzzing**: :func:`benchmarks.fuzz.run_fuzz`, thousands of hypothesis-drawn calls
   to every RPC and garbage to every method. Target: no ``INTERNAL``/``UNKNOWN``, and a
   valid ``Predict`` answered afterwards.
b. **One request can't stall others**: small calls' p50/p99 alone, then while the
   worst requests the limits allow are sent back to back (64 PNGs at the per-image
   pixel limit found by probing, the largest 64-image request accepted, ~4 million
   empty images, a 6000x6000 PNG). Target: p99 with them <= 2x p99 alone.
c. **Overload**: capacity (closed loop, 64 concurrent calls), then an open loop at 2x
   that rate with a 1 s deadline per call. Targets: goodput >= 80% of capacity; the
   server's ``costserve_requests_total`` agrees with what clients saw, per code, within
   1%. Also: RSS over time, and time to recover.
d. **Flood**: 5,000 calls started at once. Target: every call ends with a status, and
   the server counted each one with the status the client got.
e. **SIGTERM under load** from 8 clients. Targets: no call sent before the signal lost,
   no ``CANCELLED``, exit 0, exit within grace + longest call + 1 s.

::

    python -m benchmarks.reliability [--quick] [--output PATH] [--json PATH] [--model-dir DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import multiprocessing
import multiprocessing.connection
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks import report
from benchmarks.fuzz import SERVER_MESSAGE_LIMIT, large_png, run_fuzz
from benchmarks.launch import DEFAULT_MODEL_DIR, REPO_ROOT, ServerProcess, ensure_model, start_benchmark_server
from benchmarks.payloads import PREDICT, UNLIMITED, digit_png_request, raw_predict, request_bytes, timed_call
from benchmarks.procstats import RssSampler
from benchmarks.report import counts_text, fmt, markdown_table, verdict
from costserve import metrics_text
from costserve.loadtest.generator import Timed, timed
from costserve.loadtest.generator import open_loop as run_open_loop
from costserve.loadtest.samples import percentile
from costserve.v1 import classifier_pb2 as pb

DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "RESULTS-reliability.md"
PARTS = ("fuzz", "stall", "overload", "flood", "sigterm")

#: The only server flags this benchmark passes (beyond start_costserve's own), by part. Flags
#: a server does not know make it exit 2, so everything else runs on the server's defaults.
SERVER_FLAGS: dict[str, list[str]] = {
    "fuzz": [],
    "stall": [],
    "overload": [],
    "flood": [],
    "sigterm": ["--drain-grace-seconds", "2"],
}
#: --drain-grace-seconds passed to the SIGTERM part's server.
DRAIN_GRACE_S = 2.0

# Targets. Never lowered: a miss is reported as a miss.
TARGET_STALL_RATIO = 2.0
TARGET_GOODPUT = 0.80
TARGET_COUNTER_AGREEMENT = 0.01
RECOVERED_MS = 50.0

OVERLOAD_FACTOR = 2.0
CALL_DEADLINE_S = 1.0
CAPACITY_CONCURRENCY = 64
FLOOD_CALLS = 5000
FLOOD_CHANNELS = 8
FLOOD_DEADLINE_S = 10.0
SIGTERM_CLIENTS = 8
SMALL_CALL_STREAMS = 4
WORST_SENDERS = 2
#: Deadline of a small call or a worst request in part b, in seconds: long enough to measure a stall.
STALL_CALL_DEADLINE_S = 30.0
#: Worst requests are built to stay this far under the message limit, in bytes.
MESSAGE_MARGIN = 256 * 1024
#: Distinct large PNGs a 64-image worst request cycles through (each costs the decoder the same).
DISTINCT_LARGE_PNGS = 8
IMAGES_PER_WORST_REQUEST = 64
#: Limit probes: the square side searched, in pixels.
PROBE_MIN_SIDE = 28
PROBE_MAX_SIDE = 8192


@dataclass(frozen=True)
class Plan:
    """How long and how hard each part runs."""

    quick: bool
    fuzz_cases: int
    stall_seconds: float
    capacity_seconds: float
    capacity_warmup_s: float
    overload_seconds: float
    load_processes: int
    recovery_limit_s: float
    flood_calls: int
    sigterm_load_before_s: float
    seed: int


def make_plan(args: argparse.Namespace) -> Plan:
    """Durations and sizes from the options."""
    quick = args.quick
    return Plan(
        quick=quick,
        fuzz_cases=300 if quick else 2000,
        stall_seconds=2.0 if quick else 10.0,
        capacity_seconds=2.0 if quick else 10.0,
        capacity_warmup_s=0.5 if quick else 2.0,
        overload_seconds=3.0 if quick else 60.0,
        load_processes=3,
        recovery_limit_s=20.0 if quick else 60.0,
        flood_calls=1000 if quick else FLOOD_CALLS,
        sigterm_load_before_s=1.0 if quick else 3.0,
        seed=args.seed,
    )


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``python -m benchmarks.reliability``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.reliability",
        description="Fuzzing, heavy requests, overload, a flood and SIGTERM against fresh costserve servers; "
        "writes benchmarks/RESULTS-reliability.md.",
    )
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test of the benchmark itself)")
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help=f"markdown report (default {DEFAULT_OUTPUT})"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every figure as JSON to this path")
    parser.add_argument(
        "--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
        help=f"model base directory (default {DEFAULT_MODEL_DIR}; trained first when empty)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=1, help="seed of the fuzzing (default 1)")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"parts to run, comma-separated (default all: {','.join(PARTS)})"
    )
    return parser


# --------------------------------------------------------------------------- requests and calls


def png_request(pngs: Sequence[bytes]) -> bytes:
    """A serialized fp32, cache-bypassing PredictRequest of these PNGs."""
    return pb.PredictRequest(
        images=[pb.Image(encoded=png) for png in pngs], precision=pb.PRECISION_FP32, skip_cache=True
    ).SerializeToString()


#: The server-side count of calls gRPC ended before costserve saw them (dropped past
#: --max-pending-calls, which clients see as CANCELLED, or expired waiting for the loop).
DROPPED_BY_GRPC = "dropped by gRPC"


def predict_counts(server: ServerProcess) -> Counter:
    """costserve_requests_total{method="Predict"} by code, from the server's /metrics, and the calls
    gRPC received that costserve never counted (costserve_grpc_calls_started_total less every
    costserve_requests_total: this benchmark makes no health or reflection call meanwhile)."""
    samples = metrics_text.scrape(server.metrics_url)
    by_code = metrics_text.by_label(samples, "costserve_requests_total", "code", method="Predict")
    counts = Counter({code: int(value) for code, value in by_code.items()})
    started = metrics_text.total(samples, "costserve_grpc_calls_started_total")
    counted = metrics_text.total(samples, "costserve_requests_total")
    counts[DROPPED_BY_GRPC] = max(int(started - counted), 0)
    return counts


def as_client_sees(server_counts: Counter) -> Counter:
    """Server counts by the status a client gets: gRPC's drops end as CANCELLED at the client."""
    seen = Counter(server_counts)
    seen["CANCELLED"] += seen.pop(DROPPED_BY_GRPC, 0)
    return +seen


def rejected_counts(server: ServerProcess) -> Counter:
    """costserve_rejected_total by reason, from the server's /metrics."""
    by_reason = metrics_text.by_label(metrics_text.scrape(server.metrics_url), "costserve_rejected_total", "reason")
    return Counter({reason: int(value) for reason, value in by_reason.items()})


def settled_predict_counts(server: ServerProcess, limit_s: float = 10.0) -> Counter:
    """Predict counts once they stop changing (calls clients gave up on may still be finishing)."""
    deadline = time.monotonic() + limit_s
    previous = predict_counts(server)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        current = predict_counts(server)
        if current == previous:
            return current
        previous = current
    return previous


def counter_delta(after: Counter, before: Counter) -> Counter:
    """Per-code growth of a counter between two scrapes."""
    return Counter(
        {code: after[code] - before[code] for code in set(after) | set(before) if after[code] != before[code]}
    )


# --------------------------------------------------------------------------- a. fuzzing


def part_fuzz(server: ServerProcess, plan: Plan) -> dict[str, Any]:
    """Fuzz every RPC; PASS when nothing ended INTERNAL/UNKNOWN or without a status, and the server still answers."""
    fuzzed = run_fuzz(server.target, cases=plan.fuzz_cases, seed=plan.seed)
    result = fuzzed.to_dict()
    result["rejected"] = dict(+rejected_counts(server))
    return result


# --------------------------------------------------------------------------- b. one request can't stall others


def accepted(predict: grpc.UnaryUnaryMultiCallable, payload: bytes) -> bool:
    """True when the server answers this request OK within the call deadline."""
    return timed_call(predict, payload, STALL_CALL_DEADLINE_S)[0] == "OK"


def largest_accepted_side(predict: grpc.UnaryUnaryMultiCallable, images: int) -> int:
    """Largest square side, in pixels, of black PNGs that a request of ``images`` of them gets answered OK.

    Binary search between PROBE_MIN_SIDE (always accepted) and PROBE_MAX_SIDE.
    """
    low, high = PROBE_MIN_SIDE, PROBE_MAX_SIDE
    if accepted(predict, png_request([large_png(high, high)] * images)):
        return high
    while high - low > 1:
        middle = (low + high) // 2
        if accepted(predict, png_request([large_png(middle, middle)] * images)):
            low = middle
        else:
            high = middle
    return low


def worst_png_request(side: int, seed: int) -> bytes:
    """64 PNGs of ``side`` x ``side``, with enough noise that the message nears the size limit."""
    noise_bytes = (SERVER_MESSAGE_LIMIT - MESSAGE_MARGIN) // IMAGES_PER_WORST_REQUEST
    pngs = [large_png(side, side, noise_bytes, seed + index) for index in range(DISTINCT_LARGE_PNGS)]
    payload = png_request([pngs[index % len(pngs)] for index in range(IMAGES_PER_WORST_REQUEST)])
    while len(payload) > SERVER_MESSAGE_LIMIT - MESSAGE_MARGIN // 2:  # noise on a small side can overshoot
        noise_bytes = noise_bytes * 9 // 10
        pngs = [large_png(side, side, noise_bytes, seed + index) for index in range(DISTINCT_LARGE_PNGS)]
        payload = png_request([pngs[index % len(pngs)] for index in range(IMAGES_PER_WORST_REQUEST)])
    return payload


def small_calls(target: str, payload: bytes, streams: int, seconds: float) -> tuple[list[float], Counter]:
    """``streams`` threads of sequential small calls for ``seconds``: OK latencies (ms) and statuses."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def stream() -> None:
        with grpc.insecure_channel(target, options=UNLIMITED) as channel:
            predict = raw_predict(channel)
            while time.monotonic() < stop_at:
                status, took = timed_call(predict, payload, STALL_CALL_DEADLINE_S)
                with lock:
                    statuses[status] += 1
                    if status == "OK":
                        latencies.append(took * 1000)

    threads = [threading.Thread(target=stream, name=f"small-{index}") for index in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + STALL_CALL_DEADLINE_S + 30)
    return latencies, statuses


def send_worst(target: str, worst: dict[str, bytes], offset: int, stop: Any, replies: multiprocessing.Queue) -> None:
    """In a process of its own: send the worst requests in turn until ``stop`` is set; put each one's outcomes."""
    names = list(worst)
    outcomes: dict[str, list[tuple[str, float]]] = {name: [] for name in worst}
    with grpc.insecure_channel(target, options=UNLIMITED) as channel:
        predict = raw_predict(channel)
        index = offset
        while not stop.is_set():
            name = names[index % len(names)]
            outcomes[name].append(timed_call(predict, worst[name], STALL_CALL_DEADLINE_S))
            index += 1
    replies.put(outcomes)


def part_stall(server: ServerProcess, plan: Plan) -> dict[str, Any]:
    """Small calls' latency alone and while the worst requests are sent back to back."""
    small = digit_png_request()
    with grpc.insecure_channel(server.target, options=UNLIMITED) as channel:
        predict = raw_predict(channel)
        for _ in range(20):  # warm the server and the channel
            timed_call(predict, small, STALL_CALL_DEADLINE_S)
        image_side = largest_accepted_side(predict, 1)
        request_side = largest_accepted_side(predict, IMAGES_PER_WORST_REQUEST)
    worst: dict[str, bytes] = {
        f"64 PNGs of {image_side}x{image_side} (the largest single image accepted)": worst_png_request(image_side, 1),
        "4,000,000 empty images (raw bytes)": b"\x0a\x00" * 4_000_000,
        "one 6000x6000 PNG": png_request([large_png(6000, 6000)]),
    }
    if request_side != image_side:
        worst[f"64 PNGs of {request_side}x{request_side} (the largest 64-image request accepted)"] = worst_png_request(
            request_side, 100
        )

    alone, alone_statuses = small_calls(server.target, small, SMALL_CALL_STREAMS, plan.stall_seconds)

    # The worst requests come from a process of their own: sent from threads of this one, they
    # would slow the small calls' client (its GIL), and that is not what is measured here.
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    replies: multiprocessing.Queue = context.Queue()
    senders = [
        context.Process(target=send_worst, args=(server.target, worst, offset, stop, replies), name=f"worst-{offset}")
        for offset in range(WORST_SENDERS)
    ]
    for sender in senders:
        sender.start()
    try:
        time.sleep(2.0)  # the senders' interpreters are up and their first worst requests on the wire
        loaded, loaded_statuses = small_calls(server.target, small, SMALL_CALL_STREAMS, plan.stall_seconds)
    finally:
        stop.set()
        outcomes: dict[str, list[tuple[str, float]]] = {name: [] for name in worst}
        for _ in senders:
            for name, results in replies.get(timeout=STALL_CALL_DEADLINE_S + 30).items():
                outcomes[name].extend(results)
        for sender in senders:
            sender.join(timeout=30)
    alone_p99, loaded_p99 = percentile(alone, 99), percentile(loaded, 99)
    return {
        "probe": {"largest_single_image_side": image_side, "largest_64_image_side": request_side},
        "alone": {
            "calls": len(alone),
            "statuses": dict(alone_statuses),
            "p50_ms": percentile(alone, 50),
            "p99_ms": alone_p99,
        },
        "with_worst": {
            "calls": len(loaded),
            "statuses": dict(loaded_statuses),
            "p50_ms": percentile(loaded, 50),
            "p99_ms": loaded_p99,
        },
        "ratio": loaded_p99 / alone_p99 if alone_p99 > 0 else float("nan"),
        "worst": {
            name: {
                "bytes": len(worst[name]),
                "sent": len(results),
                "statuses": dict(Counter(status for status, _ in results)),
                "median_s": percentile([took for _, took in results], 50),
                "max_s": max((took for _, took in results), default=float("nan")),
            }
            for name, results in outcomes.items()
        },
    }


# --------------------------------------------------------------------------- c. overload: load generator processes


@dataclass(frozen=True)
class LoadShare:
    """One generator process's share of a load: closed loop (``concurrency``) or open loop (``rate``)."""

    target: str
    payload: bytes
    mode: str
    concurrency: int
    rate: float
    phase_s: float
    warmup_s: float
    duration_s: float
    deadline_s: float
    channels: int


def _load_worker(connection: multiprocessing.connection.Connection, share: LoadShare) -> None:
    """A generator process: connect, say "ready", wait for the start time, run, send back every call."""
    try:
        connection.send(("result", asyncio.run(_drive(connection, share))))
    except BaseException:  # noqa: BLE001 - sent to the parent, which reports the part as failed
        connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


async def _drive(connection: multiprocessing.connection.Connection, share: LoadShare) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    options = [*UNLIMITED, ("grpc.use_local_subchannel_pool", 1)]  # one connection per channel
    channels = [grpc.aio.insecure_channel(share.target, options=options) for _ in range(share.channels)]
    try:
        await asyncio.wait_for(asyncio.gather(*(channel.channel_ready() for channel in channels)), 30)
        methods = [
            channel.unary_unary(PREDICT, request_serializer=None, response_deserializer=None) for channel in channels
        ]
        connection.send(("ready", None))
        start_wall = await loop.run_in_executor(None, connection.recv)
        start = loop.time() + (start_wall - time.time())
        measure_from = start + share.warmup_s
        stop_at = measure_from + share.duration_s
        scheduled_at: list[float] = []
        sent_at: list[float] = []
        done_at: list[float] = []
        statuses: list[str] = []

        async def call(number: int) -> str:
            """One call; its status (the engine times it)."""
            try:
                await methods[number % len(methods)](share.payload, timeout=share.deadline_s)
                return "OK"
            except grpc.aio.AioRpcError as error:
                return error.code().name
            except Exception as error:  # noqa: BLE001 - counted: a call that ended without a status
                return f"NO_STATUS ({type(error).__name__})"

        def record(number: int, outcome: Timed[str]) -> None:
            if outcome.scheduled >= measure_from and outcome.result is not None:
                scheduled_at.append(outcome.scheduled - measure_from)
                sent_at.append(outcome.sent - measure_from)
                done_at.append(outcome.done - measure_from)
                statuses.append(outcome.result)

        if start > loop.time():
            await asyncio.sleep(start - loop.time())
        cpu_started = time.process_time()
        if share.mode == "closed":

            async def caller(index: int) -> None:
                while (now := loop.time()) < stop_at:
                    record(index, await timed(now, lambda: call(index)))

            await asyncio.gather(*(caller(index) for index in range(share.concurrency)))
        else:
            # The open-loop engine of `costserve loadtest`: evenly spaced arrivals, each timed from its schedule.
            schedule = itertools.takewhile(
                lambda scheduled: scheduled < stop_at,
                (start + share.phase_s + number / share.rate for number in itertools.count()),
            )
            await run_open_loop(schedule, call, record)
        return {
            "scheduled": np.asarray(scheduled_at),
            "sent": np.asarray(sent_at),
            "done": np.asarray(done_at),
            "statuses": statuses,
            "cpu_s": time.process_time() - cpu_started,
        }
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


def run_load(shares: Sequence[LoadShare], time_limit_s: float) -> dict[str, Any]:
    """Run the shares in as many spawned processes, started together; every call they made, pooled.

    Times are in seconds from the measured start.
    """
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no TensorFlow, no inherited threads
    processes = []
    connections: list[multiprocessing.connection.Connection] = []
    try:
        for index, share in enumerate(shares):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_load_worker, args=(child_end, share), name=f"load-{index}", daemon=True)
            process.start()
            child_end.close()
            processes.append(process)
            connections.append(parent_end)
        for connection in connections:
            if not connection.poll(60):
                raise RuntimeError("a load-generator process did not connect within 60 s")
            kind, payload = connection.recv()
            if kind != "ready":
                raise RuntimeError(f"load-generator process failed:\n{payload}")
        start_wall = time.time() + 0.2
        for connection in connections:
            connection.send(start_wall)
        parts = []
        for connection in connections:
            if not connection.poll(time_limit_s + 60):
                raise RuntimeError(f"a load-generator process did not finish within {time_limit_s + 60:.0f} s")
            kind, payload = connection.recv()
            if kind != "result":
                raise RuntimeError(f"load-generator process failed:\n{payload}")
            parts.append(payload)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)
        for connection in connections:
            connection.close()
    return {
        "scheduled": np.concatenate([part["scheduled"] for part in parts]),
        "sent": np.concatenate([part["sent"] for part in parts]),
        "done": np.concatenate([part["done"] for part in parts]),
        "statuses": [status for part in parts for status in part["statuses"]],
        "cpu_s": [part["cpu_s"] for part in parts],
    }


def closed_loop(target: str, payload: bytes, plan: Plan) -> dict[str, Any]:
    """Saturation: CAPACITY_CONCURRENCY callers over the generator processes; OK answers per second."""
    processes = plan.load_processes
    shares = [
        LoadShare(
            target, payload, "closed", CAPACITY_CONCURRENCY // processes + (index < CAPACITY_CONCURRENCY % processes),
            0.0, 0.0, plan.capacity_warmup_s, plan.capacity_seconds, 30.0, 2,
        )
        for index in range(processes)
    ]  # fmt: skip
    calls = run_load(shares, plan.capacity_warmup_s + plan.capacity_seconds + 30)
    done, statuses = calls["done"], calls["statuses"]
    in_window = [status for status, finished in zip(statuses, done) if finished <= plan.capacity_seconds]
    ok = sum(status == "OK" for status in in_window)
    latencies = (done - calls["sent"])[[status == "OK" for status in statuses]] * 1000
    return {
        "concurrency": CAPACITY_CONCURRENCY,
        "processes": processes,
        "seconds": plan.capacity_seconds,
        "ok": ok,
        "statuses": dict(Counter(statuses)),
        "rps": ok / plan.capacity_seconds,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
    }


def open_loop(target: str, payload: bytes, rate: float, plan: Plan) -> dict[str, Any]:
    """Arrivals at ``rate`` per second, evenly spaced and interleaved over the processes, 1 s deadline each."""
    processes = plan.load_processes
    shares = [
        LoadShare(target, payload, "open", 0, rate / processes, index / rate, 0.0, plan.overload_seconds,
                  CALL_DEADLINE_S, 4)
        for index in range(processes)
    ]  # fmt: skip
    return run_load(shares, plan.overload_seconds + CALL_DEADLINE_S + 30)


def single_call_ms(predict: grpc.UnaryUnaryMultiCallable, payload: bytes) -> tuple[str, float]:
    """One call with the overload's deadline: (status, milliseconds)."""
    status, took = timed_call(predict, payload, CALL_DEADLINE_S)
    return status, took * 1000


def part_overload(server: ServerProcess, plan: Plan) -> dict[str, Any]:
    """Capacity, then 2x capacity open loop with 1 s deadlines: goodput, counters, RSS, recovery."""
    payload = request_bytes(pb.PRECISION_FP32, skip_cache=True)  # the serving benchmark's request
    with grpc.insecure_channel(server.target, options=UNLIMITED) as channel:
        predict = raw_predict(channel)
        idle = [single_call_ms(predict, payload) for _ in range(50)]
    idle_ms = [took for status, took in idle if status == "OK"]
    capacity = closed_loop(server.target, payload, plan)
    rate = OVERLOAD_FACTOR * capacity["rps"]
    if not rate > 0:
        raise RuntimeError(f"capacity measured as {capacity['rps']} req/s: nothing to overload")

    before = settled_predict_counts(server)
    rejected_before = rejected_counts(server)
    sampler = RssSampler(server.pid)
    load_started = time.monotonic()
    try:
        calls = open_loop(server.target, payload, rate, plan)
        load_ended = time.monotonic()
        probes: Counter = Counter()
        recovered_s = float("nan")
        with grpc.insecure_channel(server.target, options=UNLIMITED) as channel:
            predict = raw_predict(channel)
            while time.monotonic() - load_ended < plan.recovery_limit_s:
                status, took_ms = single_call_ms(predict, payload)
                probes[status] += 1
                if status == "OK" and took_ms < RECOVERED_MS:
                    recovered_s = time.monotonic() - load_ended
                    break
                time.sleep(0.01)
        time.sleep(1.0)  # RSS once the load is over
    finally:
        rss = sampler.stop()
    after = settled_predict_counts(server)
    server_counts = counter_delta(after, before) - probes
    rejected = counter_delta(rejected_counts(server), rejected_before)

    statuses = Counter(calls["statuses"])
    sent, scheduled, done = calls["sent"], calls["scheduled"], calls["done"]
    ok_mask = np.array([status == "OK" for status in calls["statuses"]], dtype=bool)
    latency_from_schedule = done - scheduled
    ok = int(ok_mask.sum())
    ok_in_deadline = int((ok_mask & (latency_from_schedule <= CALL_DEADLINE_S)).sum())
    send_span = float(sent.max() - sent.min()) if len(sent) > 1 else float("nan")
    lags_ms = (sent - scheduled) * 1000
    duration = plan.overload_seconds
    agreement = {}
    server_as_seen = as_client_sees(server_counts)
    for code in sorted(set(statuses) | set(server_as_seen)):
        client_count, server_count = statuses[code], server_as_seen[code]
        larger = max(client_count, server_count)
        agreement[code] = {
            "client": client_count,
            "server": server_count,
            "difference": (server_count - client_count) / larger if larger else 0.0,
        }
    rss_values = [value for _, value in rss if value]
    return {
        "idle_single_call_ms": percentile(idle_ms, 50),
        "capacity": capacity,
        "rate_asked": rate,
        "seconds": duration,
        "processes": plan.load_processes,
        "offered": {
            "calls": len(sent),
            "scheduled_rps": len(sent) / duration,
            "achieved_rps": len(sent) / send_span if send_span > 0 else float("nan"),
            "send_span_s": send_span,
            "lag_p50_ms": percentile(lags_ms, 50),
            "lag_p99_ms": percentile(lags_ms, 99),
            "lag_max_ms": float(lags_ms.max()) if len(lags_ms) else float("nan"),
            "generator_cpu_s": calls["cpu_s"],
        },
        "ok": ok,
        "ok_in_deadline": ok_in_deadline,
        "goodput_rps": ok / duration,
        "goodput_in_deadline_rps": ok_in_deadline / duration,
        "goodput_share": ok / duration / capacity["rps"],
        "goodput_in_deadline_share": ok_in_deadline / duration / capacity["rps"],
        "ok_p50_ms": percentile(latency_from_schedule[ok_mask] * 1000, 50),
        "ok_p99_ms": percentile(latency_from_schedule[ok_mask] * 1000, 99),
        "client_statuses": dict(statuses),
        "server_counts": dict(server_counts),
        "recovery_probes": dict(probes),
        "rejected": dict(rejected),
        "agreement": agreement,
        "worst_disagreement": max((abs(entry["difference"]) for entry in agreement.values()), default=0.0),
        "rss": {
            "samples": [(round(at, 1), value) for at, value in rss],
            "start_bytes": rss_values[0] if rss_values else 0,
            "max_bytes": max(rss_values, default=0),
            "end_bytes": rss_values[-1] if rss_values else 0,
        },
        "load_wall_s": load_ended - load_started,
        "recovered_s": recovered_s,
        "recovery_limit_s": plan.recovery_limit_s,
    }


# --------------------------------------------------------------------------- d. flood


async def _flood(target: str, payload: bytes, calls: int) -> tuple[Counter, float]:
    channels = [
        grpc.aio.insecure_channel(target, options=[*UNLIMITED, ("grpc.use_local_subchannel_pool", 1)])
        for _ in range(FLOOD_CHANNELS)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(channel.channel_ready() for channel in channels)), 30)
        methods = [
            channel.unary_unary(PREDICT, request_serializer=None, response_deserializer=None) for channel in channels
        ]

        async def one(index: int) -> str:
            try:
                await methods[index % len(methods)](payload, timeout=FLOOD_DEADLINE_S)
                return "OK"
            except grpc.aio.AioRpcError as error:
                return error.code().name
            except Exception as error:  # noqa: BLE001 - counted: a call that ended without a status
                return f"NO_STATUS ({type(error).__name__})"

        started = time.perf_counter()
        statuses = await asyncio.wait_for(
            asyncio.gather(*(one(index) for index in range(calls))), FLOOD_DEADLINE_S + 60
        )
        return Counter(statuses), time.perf_counter() - started
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


def part_flood(server: ServerProcess, plan: Plan) -> dict[str, Any]:
    """``plan.flood_calls`` calls started at once: every one accounted for, by the client and by the server."""
    payload = digit_png_request()
    before = settled_predict_counts(server)
    rejected_before = rejected_counts(server)
    statuses, seconds = asyncio.run(_flood(server.target, payload, plan.flood_calls))
    server_counts = counter_delta(settled_predict_counts(server), before)
    rejected = counter_delta(rejected_counts(server), rejected_before)
    return {
        "calls": plan.flood_calls,
        "channels": FLOOD_CHANNELS,
        "deadline_s": FLOOD_DEADLINE_S,
        "seconds": seconds,
        "client": dict(statuses),
        "client_total": sum(statuses.values()),
        "server": dict(server_counts),
        "server_total": sum(server_counts.values()),
        "rejected": dict(rejected),
        "accounted": sum(statuses.values()) == plan.flood_calls and as_client_sees(server_counts) == +statuses,
    }


# --------------------------------------------------------------------------- e. SIGTERM under load


def part_sigterm(server: ServerProcess, plan: Plan) -> dict[str, Any]:
    """8 clients of sequential calls; SIGTERM; keep sending until the process is gone."""
    payload = digit_png_request()
    calls: list[tuple[float, float, str]] = []  # (sent, ended, status), monotonic seconds
    lock = threading.Lock()
    stop = threading.Event()
    exited: dict[str, float] = {}

    def client() -> None:
        with grpc.insecure_channel(server.target, options=UNLIMITED) as channel:
            predict = raw_predict(channel)
            while not stop.is_set():
                sent = time.monotonic()
                status, took = timed_call(predict, payload, 10.0)
                with lock:
                    calls.append((sent, sent + took, status))
                if status != "OK":
                    time.sleep(0.01)  # a refused client backs off a little instead of spinning

    def wait_exit() -> None:
        code = server.process.wait()
        exited["at"] = time.monotonic()
        exited["code"] = code

    clients = [threading.Thread(target=client, name=f"sigterm-client-{index}") for index in range(SIGTERM_CLIENTS)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(plan.sigterm_load_before_s)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        watcher = threading.Thread(target=wait_exit, name="exit-watcher", daemon=True)
        watcher.start()
        watcher.join(timeout=DRAIN_GRACE_S + 60)
        time.sleep(0.5)  # calls after the exit: what a client sees once the server is gone
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=30)
    before = [call for call in calls if call[0] < signalled]
    after = [call for call in calls if call[0] >= signalled]
    lost = [call for call in before if call[2] != "OK"]
    overlapping = [ended - sent for sent, ended, _ in calls if ended >= signalled]
    longest = max(overlapping, default=0.0)
    ok_after = [ended for _, ended, status in after if status == "OK"]
    exit_s = exited["at"] - signalled if "at" in exited else float("nan")
    bound = DRAIN_GRACE_S + longest + 1.0
    statuses_all = Counter(status for _, _, status in calls)
    return {
        "clients": SIGTERM_CLIENTS,
        "grace_s": DRAIN_GRACE_S,
        "calls_before": len(before),
        "lost": len(lost),
        "lost_statuses": dict(Counter(status for _, _, status in lost)),
        "after": dict(Counter(status for _, _, status in after)),
        "cancelled": statuses_all.get("CANCELLED", 0),
        "last_ok_after_signal_s": (max(ok_after) - signalled) if ok_after else float("nan"),
        "exit_s": exit_s,
        "exit_code": exited.get("code"),
        "longest_call_s": longest,
        "bound_s": bound,
    }


# --------------------------------------------------------------------------- report


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(part, target, measured, result) per target; a part that failed to run is a MISS with its error."""
    rows = []
    parts = results["parts"]

    def failed(part: str, title: str) -> bool:
        if "error" in parts.get(part, {}):
            rows.append((title, "runs", f"error: {parts[part]['error'].strip().splitlines()[-1][:120]}", "MISS"))
            return True
        return part not in parts

    if not failed("fuzz", "a. fuzzing"):
        fuzz = parts["fuzz"]
        rows.append((
            f"a. fuzzing, {fuzz['cases']:,} cases",
            "0 INTERNAL/UNKNOWN, every call a status, valid Predict after",
            f"{fuzz['forbidden']} INTERNAL/UNKNOWN, {fuzz['without_status']} without status, "
            f"final Predict {fuzz['final_predict']}",
            verdict(fuzz["passed"]),
        ))  # fmt: skip
    if not failed("stall", "b. one request can't stall others"):
        stall = parts["stall"]
        rows.append((
            "b. small calls' p99 while the worst requests are sent",
            f"<= {TARGET_STALL_RATIO:g}x p99 alone",
            f"{fmt(stall['with_worst']['p99_ms'], '.2f')} ms vs {fmt(stall['alone']['p99_ms'], '.2f')} ms alone "
            f"({fmt(stall['ratio'], '.2f')}x)",
            verdict(stall["ratio"] <= TARGET_STALL_RATIO),
        ))  # fmt: skip
    if not failed("overload", "c. overload"):
        load = parts["overload"]
        capacity = load["capacity"]["rps"]
        rows.append((
            f"c. goodput at {OVERLOAD_FACTOR:g}x capacity ({load['offered']['achieved_rps']:.0f} req/s offered)",
            f">= {100 * TARGET_GOODPUT:.0f}% of capacity",
            f"{100 * load['goodput_share']:.1f}% ({load['goodput_rps']:.0f} of {capacity:.0f} req/s); "
            f"within deadline {100 * load['goodput_in_deadline_share']:.1f}%",
            verdict(load["goodput_share"] >= TARGET_GOODPUT),
        ))  # fmt: skip
        rows.append((
            "c. server counters vs client statuses",
            f"every code within {100 * TARGET_COUNTER_AGREEMENT:.0f}%",
            f"worst code off by {100 * load['worst_disagreement']:.2f}%",
            verdict(load["worst_disagreement"] <= TARGET_COUNTER_AGREEMENT),
        ))  # fmt: skip
        rows.append((
            "c. RSS under overload",
            "stated",
            f"start {load['rss']['start_bytes'] / 2**20:.0f} MiB, max {load['rss']['max_bytes'] / 2**20:.0f} MiB, "
            f"end {load['rss']['end_bytes'] / 2**20:.0f} MiB",
            "-",
        ))  # fmt: skip
        rows.append((
            "c. time to recover",
            f"stated (first call < {RECOVERED_MS:.0f} ms)",
            f"{fmt(load['recovered_s'], '.2f')} s" if load["recovered_s"] == load["recovered_s"]
            else f"not within {load['recovery_limit_s']:.0f} s",
            "-",
        ))  # fmt: skip
    if not failed("flood", "d. flood"):
        flood = parts["flood"]
        rows.append((
            f"d. flood of {flood['calls']:,} calls at once",
            "every call a status, server counts = client counts",
            f"client {flood['client_total']:,} ({counts_text(flood['client'])}); server {flood['server_total']:,}",
            verdict(flood["accounted"]),
        ))  # fmt: skip
    if not failed("sigterm", "e. SIGTERM under load"):
        term = parts["sigterm"]
        ok = (
            term["lost"] == 0
            and term["cancelled"] == 0
            and term["exit_code"] == 0
            and term["exit_s"] <= term["bound_s"]
        )
        rows.append((
            f"e. SIGTERM under load from {term['clients']} clients",
            f"0 lost, no CANCELLED, exit 0 within {term['bound_s']:.2f} s",
            f"{term['lost']} lost, {term['cancelled']} CANCELLED, exit {term['exit_code']} "
            f"after {fmt(term['exit_s'], '.2f')} s",
            verdict(ok),
        ))  # fmt: skip
    return rows


def render_report(results: dict[str, Any], rows: list[tuple[str, str, str, str]], notes: str) -> str:
    """The whole RESULTS-reliability.md."""
    plan, info, parts = results["plan"], results["machine"], results["parts"]
    run_kind = (
        "quick smoke run: short durations, servers started together up front, figures are rough"
        if plan["quick"]
        else "full run"
    )
    lines = [
        "# costserve reliability benchmark",
        "",
        f"Written by `{results['command']}` ({run_kind}) "
        f"on {info['date']} in {results['elapsed_s']:.0f} s, costserve at commit {results['code']}. "
        "Every figure was measured in this run, each part against a fresh `costserve-server serve` on 127.0.0.1. "
        "Do not edit above the notes marker: the next run rewrites it.",
        "",
        "## Summary",
        "",
        markdown_table(["part", "target", "measured", "result"], rows),
        "",
        "Server flags beyond the defaults (and `--drain-seconds 2` of the shared launcher): "
        + "; ".join(f"{part}: `{' '.join(flags)}`" for part, flags in SERVER_FLAGS.items() if flags)
        + ".",
        "",
    ]
    for part in PARTS:
        if part not in parts:
            continue
        if "error" in parts[part]:
            lines += [
                f"## {part}",
                "",
                "The part failed to run:",
                "",
                "```",
                parts[part]["error"].strip()[-3000:],
                "```",
                "",
            ]
            continue
        lines += SECTIONS[part](parts[part], plan)
    lines += [
        *report.machine_section(info, "the load generators and the server"),
        report.NOTES_MARKER,
        notes.strip("\n"),
        "",
    ]
    return "\n".join(lines)


def section_fuzz(fuzz: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    lines = [
        "## a. Fuzzing",
        "",
        f"{fuzz['cases']:,} calls in {fuzz['seconds']:.0f} s (hypothesis, seed {fuzz['seed']}, `benchmarks/fuzz.py`): "
        "structured requests for every field of every RPC, messages damaged on the wire, garbage bytes to every "
        "method (reflection included), and the deliberate extremes (messages over 16 MiB, 4 million empty images, "
        "a 6000x6000 PNG, a PNG declaring 65535x65535). Statuses per RPC:",
        "",
        markdown_table(
            ["RPC", "calls", "statuses"],
            [[rpc, f"{sum(counts.values()):,}", counts_text(counts)] for rpc, counts in fuzz["statuses"].items()],
        ),
    ]
    lines += [
        "",
        f"- Cases by kind: {counts_text(fuzz['kinds'])}.",
        f"- INTERNAL or UNKNOWN: {fuzz['forbidden']}; without a status: {fuzz['without_status']}; "
        f"a valid Predict afterwards: {fuzz['final_predict']}: **{verdict(fuzz['passed'])}**.",
        f"- Slowest call: {fuzz['slowest'][0]:.2f} s, {fuzz['slowest'][1]} ({fuzz['slowest'][2]}) "
        f"-> {fuzz['slowest'][3]}.",
        f"- Server's `costserve_rejected_total` after the run: {counts_text(fuzz.get('rejected', {}))}.",
    ]
    if fuzz["failures"]:
        lines += ["", f"First failing cases ({fuzz['failure_count']} in all):", ""]
        for rpc, status, what, message in fuzz["failures"]:
            lines.append(f"- {rpc} -> {status}: {what} (server: {message[:160]!r})")
    return [*lines, ""]


def section_stall(stall: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    probe = stall["probe"]
    lines = [
        "## b. One request can't stall others",
        "",
        f"{SMALL_CALL_STREAMS} streams of sequential small calls (one 28x28 digit PNG, fp32, cache bypassed) for "
        f"{plan['stall_seconds']:g} s alone, then for {plan['stall_seconds']:g} s while {WORST_SENDERS} sender "
        "processes of their own sent the worst requests back to back. The limits were found by probing with black "
        "PNGs: the largest square image "
        f"answered OK alone was {probe['largest_single_image_side']}x{probe['largest_single_image_side']}, in a "
        f"request of 64 images {probe['largest_64_image_side']}x{probe['largest_64_image_side']} (searched up to "
        f"{PROBE_MAX_SIDE}).",
        "",
        markdown_table(
            ["small calls", "calls answered", "statuses", "p50 ms", "p99 ms"],
            [
                [title, f"{calls['calls']:,}", counts_text(calls["statuses"]), fmt(calls["p50_ms"], ".2f"),
                 fmt(calls["p99_ms"], ".2f")]
                for title, calls in (("alone", stall["alone"]), ("with the worst requests", stall["with_worst"]))
            ],
        ),
        "",
        f"p99 with / alone: {fmt(stall['ratio'], '.2f')}x (target <= {TARGET_STALL_RATIO:g}x): "
        f"**{verdict(stall['ratio'] <= TARGET_STALL_RATIO)}**.",
        "",
        markdown_table(
            ["worst request", "bytes", "sent", "statuses", "time to answer or refuse, median / max s"],
            [
                [name, f"{worst['bytes']:,}", worst["sent"], counts_text(worst["statuses"]),
                 f"{fmt(worst['median_s'], '.3f')} / {fmt(worst['max_s'], '.3f')}"]
                for name, worst in stall["worst"].items()
            ],
        ),
    ]  # fmt: skip
    return [*lines, ""]


def section_overload(load: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    capacity, offered = load["capacity"], load["offered"]
    lines = [
        "## c. Overload",
        "",
        f"Load generator: this benchmark's `grpc.aio` client in {load['processes']} spawned processes (4 connections "
        "each), sending one pre-serialized request per call: the serving benchmark's (one 28x28 digit as raw uint8 "
        "pixels, fp32, cache bypassed).",
        "",
        f"- Capacity: closed loop, {capacity['concurrency']} concurrent calls, {capacity['seconds']:g} s: "
        f"**{capacity['rps']:.0f} req/s** answered OK (p50 {fmt(capacity['p50_ms'], '.1f')} ms, p99 "
        f"{fmt(capacity['p99_ms'], '.1f')} ms; statuses {counts_text(capacity['statuses'])}).",
        f"- Open loop at {OVERLOAD_FACTOR:g}x = {load['rate_asked']:.0f} req/s for {load['seconds']:g} s, "
        f"evenly spaced arrivals, deadline {CALL_DEADLINE_S:g} s per call: {offered['calls']:,} calls sent over "
        f"{offered['send_span_s']:.2f} s = **{offered['achieved_rps']:.0f} req/s offered** "
        f"({100 * offered['achieved_rps'] / capacity['rps']:.0f}% of capacity); send lag behind schedule p50 "
        f"{fmt(offered['lag_p50_ms'], '.1f')} ms, p99 {fmt(offered['lag_p99_ms'], '.1f')} ms, max "
        f"{fmt(offered['lag_max_ms'], '.1f')} ms; generator CPU "
        f"{', '.join(f'{cpu:.1f}' for cpu in offered['generator_cpu_s'])} s per process.",
        f"- Goodput: {load['ok']:,} OK = {load['goodput_rps']:.0f} req/s = **{100 * load['goodput_share']:.1f}% of "
        f"capacity** (target >= {100 * TARGET_GOODPUT:.0f}%: {verdict(load['goodput_share'] >= TARGET_GOODPUT)}); "
        f"{load['ok_in_deadline']:,} of them within {CALL_DEADLINE_S:g} s of their scheduled time = "
        f"{load['goodput_in_deadline_rps']:.0f} req/s ({100 * load['goodput_in_deadline_share']:.1f}%). OK latency "
        f"from schedule p50 {fmt(load['ok_p50_ms'], '.1f')} ms, p99 {fmt(load['ok_p99_ms'], '.1f')} ms.",
        "",
        "Statuses the clients got against the growth of the server's counters over the same calls (the recovery "
        'probes taken out): `costserve_requests_total{method="Predict"}` by code, plus the calls gRPC received '
        "(`costserve_grpc_calls_started_total`) that costserve never counted: gRPC drops them past "
        "`--max-pending-calls` and the client sees CANCELLED, so they are compared with the client's CANCELLED. "
        f"Server-side, {load['server_counts'].get(DROPPED_BY_GRPC, 0):,} calls were dropped by gRPC and "
        f"{sum(v for k, v in load['server_counts'].items() if k != DROPPED_BY_GRPC):,} counted by costserve.",
        "",
        markdown_table(
            ["code", "client", "server", "difference"],
            [
                [code, f"{entry['client']:,}", f"{entry['server']:,}", f"{100 * entry['difference']:+.2f}%"]
                for code, entry in load["agreement"].items()
            ],
        ),
    ]
    rss = load["rss"]
    recovered = load["recovered_s"]
    lines += [
        "",
        f"Every code within {100 * TARGET_COUNTER_AGREEMENT:.0f}%: "
        f"**{verdict(load['worst_disagreement'] <= TARGET_COUNTER_AGREEMENT)}** (worst "
        f"{100 * load['worst_disagreement']:.2f}%). Server's `costserve_rejected_total` growth by reason: "
        f"{counts_text(load['rejected'])}.",
        "",
        f"- Server RSS (VmRSS, every second from before the open loop to 1 s after recovery): start "
        f"{rss['start_bytes'] / 2**20:.0f} MiB, max {rss['max_bytes'] / 2**20:.0f} MiB, "
        f"end {rss['end_bytes'] / 2**20:.0f} MiB. "
        "Samples (s: MiB): " + ", ".join(f"{at:g}: {value / 2**20:.0f}" for at, value in rss["samples"]) + ".",
        f"- Time to recover: after the load generator returned (every call it made had ended), single sequential "
        f"calls until one was answered in under {RECOVERED_MS:.0f} ms: "
        + (f"**{recovered:.2f} s**" if recovered == recovered else f"**not within {load['recovery_limit_s']:.0f} s**")
        + f" (probe statuses {counts_text(load['recovery_probes'])}; a single call on the idle server took "
        f"{fmt(load['idle_single_call_ms'], '.2f')} ms, median of 50).",
    ]
    return [*lines, ""]


def section_flood(flood: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    return [
        "## d. Flood",
        "",
        f"{flood['calls']:,} Predict calls (one digit PNG, fp32, cache bypassed) started at once from one `grpc.aio` "
        f"client over {flood['channels']} connections, each with a {flood['deadline_s']:g} s deadline; all ended in "
        f"{flood['seconds']:.2f} s.",
        "",
        f"- Client: {flood['client_total']:,} statuses: {counts_text(flood['client'])}.",
        f'- Server (`costserve_requests_total{{method="Predict"}}` growth, and the calls gRPC received that '
        f"costserve never counted, `costserve_grpc_calls_started_total` less every `costserve_requests_total`): "
        f"{flood['server_total']:,}: {counts_text(flood['server'])}; `costserve_rejected_total` growth by reason: "
        f"{counts_text(flood.get('rejected', {}))}.",
        f"- Every call accounted for, with the same status on both sides (gRPC's drops are CANCELLED at the client): "
        f"**{verdict(flood['accounted'])}**.",
        "",
    ]


def section_sigterm(term: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    ok = term["lost"] == 0 and term["cancelled"] == 0 and term["exit_code"] == 0 and term["exit_s"] <= term["bound_s"]
    return [
        "## e. SIGTERM under load",
        "",
        f"{term['clients']} clients (one connection each) sending sequential Predict calls (10 s deadline); SIGTERM "
        f"after {plan['sigterm_load_before_s']:g} s; the clients kept sending until 0.5 s after the process exited. "
        f"Server flags: `{' '.join(SERVER_FLAGS['sigterm'])}`.",
        "",
        f"- Calls sent before the signal: {term['calls_before']:,}; lost (not OK): **{term['lost']}** "
        f"({counts_text(term['lost_statuses'])}).",
        f"- Calls sent after the signal: {counts_text(term['after'])}; the last OK answer came "
        f"{fmt(term['last_ok_after_signal_s'], '.2f')} s after the signal.",
        f"- CANCELLED, any call: {term['cancelled']}.",
        f"- Exit code {term['exit_code']}, {fmt(term['exit_s'], '.2f')} s after the signal; bound = grace "
        f"{term['grace_s']:g} s + longest call in the drain {term['longest_call_s']:.3f} s + 1 s = "
        f"{term['bound_s']:.2f} s: **{verdict(ok)}**.",
        "",
    ]


SECTIONS: dict[str, Callable[[dict[str, Any], dict[str, Any]], list[str]]] = {
    "fuzz": section_fuzz,
    "stall": section_stall,
    "overload": section_overload,
    "flood": section_flood,
    "sigterm": section_sigterm,
}


# --------------------------------------------------------------------------- main

PART_RUNNERS: dict[str, Callable[[ServerProcess, Plan], dict[str, Any]]] = {
    "fuzz": part_fuzz,
    "stall": part_stall,
    "overload": part_overload,
    "flood": part_flood,
    "sigterm": part_sigterm,
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every part, each on a fresh server; returns every figure. A part that fails is recorded, not fatal."""
    plan = make_plan(args)
    model_dir = args.model_dir.resolve()
    ensure_model(model_dir)
    wanted = [part for part in args.parts.split(",") if part]
    unknown = [part for part in wanted if part not in PART_RUNNERS]
    if unknown:
        raise SystemExit(f"--parts: unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
    results: dict[str, Any] = {
        "plan": dataclasses.asdict(plan),
        "machine": report.machine(),
        "command": args.command,
        "code": report.code_version(),
        "parts": {},
    }
    with tempfile.TemporaryDirectory(prefix="costserve-reliability-") as temp, contextlib.ExitStack() as early:
        workdir = Path(temp)
        servers: dict[str, ServerProcess | BaseException] = {}
        if plan.quick:
            # A smoke run starts every server at once (their start-ups overlap; they idle until their part),
            # a full run starts each just before its part, on an otherwise quiet machine.
            for part in wanted:
                servers[part] = start_server(part, model_dir, workdir, early)
        for part in wanted:
            started = time.monotonic()
            with contextlib.ExitStack() as stack:
                try:
                    server = servers.get(part) or start_server(part, model_dir, workdir, stack)
                    if isinstance(server, BaseException):
                        raise server
                    server.wait_serving()
                    print(f"{part}: running on a fresh server", flush=True)
                    figures = PART_RUNNERS[part](server, plan)
                    server.stop()
                except Exception:  # noqa: BLE001 - the report says which part failed and why
                    figures = {"error": traceback.format_exc()}
                    print(figures["error"], file=sys.stderr, flush=True)
            figures["part_seconds"] = time.monotonic() - started
            results["parts"][part] = figures
            print(f"{part}: done in {figures['part_seconds']:.0f} s", flush=True)
    return results


def start_server(
    part: str, model_dir: Path, workdir: Path, stack: contextlib.ExitStack
) -> ServerProcess | BaseException:
    """A costserve server for ``part`` (stopped by ``stack``), or the exception that kept it from starting."""
    print(f"{part}: starting a server with flags {SERVER_FLAGS[part] or 'none'} ...", flush=True)
    try:
        return stack.enter_context(
            start_benchmark_server(model_dir, *SERVER_FLAGS[part], name=f"costserve-{part}", workdir=workdir)
        )
    except Exception as error:  # noqa: BLE001 - raised again when its part runs
        return error


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.reliability``."""
    args = build_parser().parse_args(argv)
    args.command = report.command_line("python -m benchmarks.reliability", argv)
    started = time.monotonic()
    results = run(args)
    results["elapsed_s"] = time.monotonic() - started
    rows = summary_rows(results)
    results["summary"] = rows
    print()
    for part, target, measured, result in rows:
        print(f"{result:4}  {part}: {measured} (target {target})")
    report.write_results(args.output, args.json, results, lambda notes: render_report(results, rows, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
