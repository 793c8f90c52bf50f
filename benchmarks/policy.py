"""Does cost-aware serving save money? One load ramp, served four ways.

Starts a real ``costserve-server`` per mode on 127.0.0.1 (port 0) and drives the same
open-loop (Poisson) ramp at each: light -> about twice fp32's capacity -> light, with
a realistic repeat mix (a share of requests re-send an input already sent). Modes:

* ``fp32``: every request asks for PRECISION_FP32;
* ``int8``: every request asks for PRECISION_INT8;
* ``auto cost_first`` and ``auto accuracy_first``: PRECISION_AUTO under ``--policy``.

For each: cost per 1M predictions, accuracy on the held-out digits, p50/p99 latency
and rejections per phase, and the share of answers per precision. Writes
``benchmarks/RESULTS-policy.md`` with the issue's targets beside the measured figures.

Usage (from the repository root)::

    make bench-policy                  # or: python -m benchmarks.policy [--phase-seconds 12]

The first run trains the default model into ``models/digits`` (about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np

from benchmarks import serving
from costserve.loadtest import load_holdout_digits, variant
from costserve.v1 import classifier_pb2 as pb
from costserve.v1 import classifier_pb2_grpc as pb_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "RESULTS-policy.md"
SLO_MS = 100.0
#: Load of each phase as a multiple of the measured fp32 capacity.
PHASES = (("light", 0.35), ("overload", 2.0), ("light again", 0.35))
#: Share of requests that re-send an input sent before (cache hits when the cache has it).
REPEAT_SHARE = 0.3
IMAGES_PER_REQUEST = 16
DEADLINE_S = 1.0
#: Input ids used to measure capacity (on a server of its own, so they never warm a mode's cache).
CALIBRATION_IDS = 10_000_000
#: Flags of every mode's server: AUTO is held to the objective (explicit precisions are not).
SERVER_FLAGS = ("--latency-slo-ms", str(SLO_MS), "--over-slo", "refuse")
PREDICT = "/costserve.v1.Classifier/Predict"
MODES = (
    ("fp32", "accuracy_first", pb.PRECISION_FP32),
    ("int8", "accuracy_first", pb.PRECISION_INT8),
    ("auto cost_first", "cost_first", pb.PRECISION_AUTO),
    ("auto accuracy_first", "accuracy_first", pb.PRECISION_AUTO),
)


@contextlib.contextmanager
def costserve(model_dir: Path, workdir: Path, *flags: str) -> Iterator[serving.Server]:
    """``costserve-server serve`` on a free port (the serving benchmark's), stopped on exit."""
    with contextlib.ExitStack() as stack:
        yield serving.start_costserve("costserve", model_dir, workdir, stack, [*SERVER_FLAGS, *flags])


async def serving_target(server: serving.Server) -> str:
    """Wait (off the loop) until the server's model is warm; its address."""
    await asyncio.get_running_loop().run_in_executor(None, serving.wait_serving, server)
    return server.target


def cpu_split(server: serving.Server) -> dict[str, float]:
    """CPU-seconds per image from the server's metrics: inference per computed image, handling per answer."""
    samples = serving.scrape(server)
    images = serving.metric_sum(samples, "costserve_images_total")
    computed = serving.metric_sum(samples, "costserve_images_total", cache="miss")
    return {
        "inference_us": 1e6 * serving.metric_sum(samples, "costserve_cpu_seconds_total", phase="inference")
        / max(computed, 1),
        "handling_us": 1e6 * serving.metric_sum(samples, "costserve_cpu_seconds_total", phase="handling")
        / max(images, 1),
    }


@dataclass
class Outcome:
    phase: int
    latency_s: float
    ok: bool
    code: str = "OK"
    correct: int = 0
    precisions: list[int] = field(default_factory=list)
    cache_hits: int = 0
    charged_usd: float = 0.0
    list_usd: float = 0.0
    compute_usd: float = 0.0


@dataclass(frozen=True)
class Workload:
    """The same arrivals and inputs for every mode: (time offset, phase, input ids)."""

    arrivals: list[tuple[float, int, list[int]]]
    rates: list[float]


def make_workload(capacity_rps: float, phase_s: float, seed: int = 7) -> Workload:
    rng = np.random.default_rng(seed)
    arrivals: list[tuple[float, int, list[int]]] = []
    rates = []
    sent: list[list[int]] = []
    next_id = 0
    start = 0.0
    for phase, (_, multiple) in enumerate(PHASES):
        rate = capacity_rps * multiple
        rates.append(rate)
        at = start
        while True:
            at += rng.exponential(1.0 / rate)
            if at >= start + phase_s:
                break
            if sent and rng.random() < REPEAT_SHARE:
                ids = sent[int(rng.integers(len(sent)))]
            else:
                ids = list(range(next_id, next_id + IMAGES_PER_REQUEST))
                next_id += IMAGES_PER_REQUEST
                sent.append(ids)
            arrivals.append((at, phase, ids))
        start += phase_s
    return Workload(arrivals, rates)


class Inputs:
    def __init__(self) -> None:
        self.images, self.labels = load_holdout_digits()
        self._messages: dict[int, pb.Image] = {}
        self._encoded: dict[int, bytes] = {}

    def request_bytes(self, ids: list[int], precision: int) -> bytes:
        """A serialized PredictRequest of these inputs, assembled from each input's encoded field.

        Serialized protobuf messages merge when concatenated (repeated fields append), so the
        load generator builds a 16-image request by joining bytes: its CPU stays with the server.
        """
        parts = []
        for input_id in ids:
            encoded = self._encoded.get(input_id)
            if encoded is None:
                encoded = self._encoded[input_id] = pb.PredictRequest(images=[self._image(input_id)]).SerializeToString()
            parts.append(encoded)
        parts.append(pb.PredictRequest(precision=precision).SerializeToString())
        return b"".join(parts)

    def message(self, input_id: int) -> pb.Image:
        if input_id not in self._messages:
            self._messages[input_id] = self._image(input_id)
        return self._messages[input_id]

    def _image(self, input_id: int) -> pb.Image:
        # variant() makes 360 x 9 x 32 distinct inputs; past that, tag a second corner pixel too
        # (the label does not change), so that every input the ramp calls distinct really is.
        distinct = len(self.images) * 9 * 32
        pixels = variant(self.images, input_id % distinct)
        pixels[0, 1] ^= input_id // distinct
        return pb.Image(pixels=pb.Pixels(shape=list(pixels.shape), dtype=pb.DTYPE_UINT8, data=pixels.tobytes()))

    def label(self, input_id: int) -> int:  # variant() keeps the label of held-out image id % n
        return int(self.labels[input_id % len(self.labels)])


async def calibrate(target: str, inputs: Inputs, seconds: float = 5.0, concurrency: int = 16) -> float:
    """fp32 capacity in requests/s: closed loop, every image distinct and computed."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        done = 0
        stop_at = time.monotonic() + seconds
        counter = iter(range(CALIBRATION_IDS, 10**9, IMAGES_PER_REQUEST))

        async def loop() -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                first = next(counter)
                images = [inputs.message(first + k) for k in range(IMAGES_PER_REQUEST)]
                await stub.Predict(pb.PredictRequest(images=images, precision=pb.PRECISION_FP32, skip_cache=True), timeout=10)
                done += 1

        started = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return done / (time.monotonic() - started)


async def drive(target: str, precision: int, workload: Workload, inputs: Inputs) -> list[Outcome]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        for ids in ([0, 1, 2, 3],):  # warm the channel
            await stub.Predict(pb.PredictRequest(images=[inputs.message(CALIBRATION_IDS - 1 - i) for i in ids]), timeout=10)
        predict = channel.unary_unary(PREDICT, request_serializer=None, response_deserializer=pb.PredictResponse.FromString)
        for _, _, ids in workload.arrivals:  # encode every input before the clock starts
            inputs.request_bytes(ids, precision)
        outcomes: list[Outcome] = []

        async def call(phase: int, ids: list[int]) -> None:
            request = inputs.request_bytes(ids, precision)
            started = time.perf_counter()
            try:
                reply = await predict(request, timeout=DEADLINE_S)
            except grpc.aio.AioRpcError as error:
                outcomes.append(Outcome(phase, time.perf_counter() - started, False, error.code().name))
                return
            latency = time.perf_counter() - started
            cost = reply.cost
            outcomes.append(
                Outcome(
                    phase,
                    latency,
                    True,
                    correct=sum(p.label == inputs.label(i) for p, i in zip(reply.predictions, ids)),
                    precisions=[p.precision for p in reply.predictions],
                    cache_hits=sum(p.cache_hit for p in reply.predictions),
                    charged_usd=cost.usd,
                    # What the resources used cost at list price (utilization 1): capacity sized to the load.
                    list_usd=(cost.cpu_usd + cost.memory_usd) * cost.utilization + cost.network_usd,
                    # The part a precision can change: CPU and memory at list price, without the network.
                    compute_usd=(cost.cpu_usd + cost.memory_usd) * cost.utilization,
                )
            )

        loop = asyncio.get_running_loop()
        tasks = []
        begin = loop.time()
        for at, phase, ids in workload.arrivals:
            delay = begin + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(call(phase, ids)))
        await asyncio.gather(*tasks)
        return outcomes


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) * 1000 if values else None


def summarize(outcomes: list[Outcome]) -> dict:
    ok = [o for o in outcomes if o.ok]
    predictions = sum(len(o.precisions) for o in ok)
    shares = {
        name: sum(o.precisions.count(value) for o in ok) / max(predictions, 1)
        for name, value in (("fp32", pb.PRECISION_FP32), ("int8", pb.PRECISION_INT8))
    }
    phases = []
    for phase in range(len(PHASES)):
        latencies = [o.latency_s for o in outcomes if o.phase == phase and o.ok]
        sent = [o for o in outcomes if o.phase == phase]
        phases.append(
            {
                "sent": len(sent),
                "p50": _pct(latencies, 50),
                "p99": _pct([o.latency_s for o in sent], 99),  # rejected calls count at the time they failed
                "rejected": sum(not o.ok for o in sent),
                "codes": sorted({o.code for o in sent if not o.ok}),
            }
        )
    return {
        "predictions": predictions,
        "charged_per_1m": sum(o.charged_usd for o in ok) / max(predictions, 1) * 1e6,
        "list_per_1m": sum(o.list_usd for o in ok) / max(predictions, 1) * 1e6,
        "compute_per_1m": sum(o.compute_usd for o in ok) / max(predictions, 1) * 1e6,
        "accuracy": sum(o.correct for o in ok) / max(predictions, 1),
        "shares": shares,
        "cache": sum(o.cache_hits for o in ok) / max(predictions, 1),
        "rejected": sum(not o.ok for o in outcomes),
        "phases": phases,
    }


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def write_results(results: dict[str, dict], capacity: float, workload: Workload, phase_s: float, seconds: float) -> str:
    fp32 = results["fp32"]
    lines = [
        "# Cost-aware serving: results",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `make bench-policy` (`benchmarks/policy.py`), "
        f"{seconds:.0f} s in all.",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared by the server, the load generator "
        "and other jobs; Python "
        f"{platform.python_version()}. Figures are from one run and drift between runs on a shared 2-core host.",
        "",
        "## The run",
        "",
        f"- fp32 capacity, measured first (closed loop, 16 in flight, every image computed): **{capacity:.0f} requests/s** "
        f"of {IMAGES_PER_REQUEST} images.",
        "- Open-loop Poisson arrivals, the same arrivals and inputs for every mode, "
        + ", ".join(f"{name} {rate:.0f} req/s for {phase_s:.0f} s" for (name, _), rate in zip(PHASES, workload.rates))
        + f" ({len(workload.arrivals)} requests).",
        f"- {REPEAT_SHARE:.0%} of requests re-send an input sent before; the rest are distinct variants of the held-out "
        f"digits (labels known). Each call has a {DEADLINE_S:.0f} s deadline. Every server runs with "
        f"`{' '.join(SERVER_FLAGS)}`: AUTO requests are held to the objective (refused at once when no variant "
        "is predicted to answer within it), explicit precisions queue. A fresh server (cold cache) per mode. "
        "The load generator sends each request as bytes joined from pre-encoded images, so its CPU stays "
        "with the server.",
        "- Cost per 1M predictions three ways: **compute** = the CPU and memory the answers used, at list price "
        "(the part a precision can change); **resources** = compute plus the network bytes moved (the same for "
        "every mode); **charged** = what the server billed, which also spreads the idle capacity of one fixed "
        "2-vCPU server over the answers (README, Cost).",
        "",
        "## Per mode",
        "",
        "| mode | cost / 1M, compute | cost / 1M, resources | cost / 1M, charged | accuracy | fp32 / int8 share "
        "| cache hits | rejected |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | ${r['compute_per_1m']:.5f} | ${r['list_per_1m']:.5f} | ${r['charged_per_1m']:.5f} | {r['accuracy']:.2%} | "
            f"{r['shares']['fp32']:.0%} / {r['shares']['int8']:.0%} | {r['cache']:.0%} | {r['rejected']} |"
        )
    lines += [
        "",
        "## Where the CPU goes (the servers' own metrics)",
        "",
        "`costserve_cpu_seconds_total` by phase: inference per computed image (its share of its batch's runtime "
        "call), handling per answered image (decode, cache, bookkeeping, message conversion on the event loop).",
        "",
        "| mode | inference CPU per computed image | handling CPU per answer |",
        "| --- | --- | --- |",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['inference_us']:.0f} µs | {r['handling_us']:.0f} µs |")
    lines += ["", "## Latency per phase (ms, client side; p99 counts rejected calls at the time they failed)", ""]
    header = "| mode | " + " | ".join(f"{name} p50 | {name} p99 | {name} rejected" for name, _ in PHASES) + " |"
    lines += [header, "| --- |" + " --- |" * (3 * len(PHASES))]
    for name, r in results.items():
        cells = []
        for phase in r["phases"]:
            cells += [_ms(phase["p50"]), _ms(phase["p99"]), f"{phase['rejected']}" + (f" ({', '.join(phase['codes'])})" if phase["codes"] else "")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    lines += ["", "## Targets", "", "| target | AUTO policy | measured | verdict |", "| --- | --- | --- | --- |"]
    overload = 1
    for name in ("auto cost_first", "auto accuracy_first"):
        auto = results[name]
        compute_ratio = auto["compute_per_1m"] / fp32["compute_per_1m"]
        ratio = auto["list_per_1m"] / fp32["list_per_1m"]
        charged_ratio = auto["charged_per_1m"] / fp32["charged_per_1m"]
        points = (auto["accuracy"] - fp32["accuracy"]) * 100
        a_p99, f_p99 = auto["phases"][overload]["p99"], fp32["phases"][overload]["p99"]
        a_rej, f_rej = auto["phases"][overload]["rejected"], fp32["phases"][overload]["rejected"]
        verdict = lambda ok: "PASS" if ok else "MISS"  # noqa: E731
        lines += [
            f"| cost per 1M ≤ 70% of fp32-only (compute) | {name} | {compute_ratio:.0%} | {verdict(compute_ratio <= 0.7)} |",
            f"| cost per 1M ≤ 70% of fp32-only (resources) | {name} | {ratio:.0%} | {verdict(ratio <= 0.7)} |",
            f"| cost per 1M ≤ 70% of fp32-only (charged) | {name} | {charged_ratio:.0%} | {verdict(charged_ratio <= 0.7)} |",
            f"| accuracy ≥ fp32-only − 0.5 points | {name} | {points:+.2f} points | {verdict(points >= -0.5)} |",
            f"| overload p99 ≤ {SLO_MS:.0f} ms where fp32-only's is not | {name} | {_ms(a_p99)} ms vs fp32 {_ms(f_p99)} ms | "
            f"{verdict(a_p99 is not None and a_p99 <= SLO_MS and (f_p99 is None or f_p99 > SLO_MS))} |",
            f"| fewer rejections than fp32-only in the overload | {name} | {a_rej} vs {f_rej} | {verdict(a_rej < f_rej)} |",
        ]
    lines += [
        "| a tenant over budget is refused within 1 s of crossing; others unaffected | – | by construction: spend is "
        "added when a response is priced, so the very next request is refused; `tests/test_policy_server.py::"
        "test_budget_degrades_then_refuses_then_resets` checks it | not measured here |",
        "",
    ]
    text = "\n".join(lines)
    return text


async def run_mode(
    model_dir: Path, workdir: Path, name: str, policy: str, precision: int, workload: Workload, inputs: Inputs
) -> dict:
    with costserve(model_dir, workdir, "--policy", policy) as server:
        outcomes = await drive(await serving_target(server), precision, workload, inputs)
        split = cpu_split(server)
    summary = {**summarize(outcomes), **split}
    print(
        f"{name:>20}: {summary['predictions']} predictions, compute ${summary['compute_per_1m']:.5f}/1M, resources ${summary['list_per_1m']:.5f}/1M, "
        f"charged ${summary['charged_per_1m']:.5f}/1M, inference {summary['inference_us']:.0f} us/computed image, "
        f"handling {summary['handling_us']:.0f} us/answer, accuracy {summary['accuracy']:.2%}, "
        f"overload p99 {_ms(summary['phases'][1]['p99'])} ms, rejected {summary['rejected']}",
        flush=True,
    )
    return summary


async def main_async(args: argparse.Namespace) -> int:
    started = time.monotonic()
    serving.ensure_model(args.model_dir)
    inputs = Inputs()
    workdir = Path(tempfile.mkdtemp(prefix="costserve-policy-"))  # the servers' logs
    with costserve(args.model_dir, workdir) as server:
        capacity = await calibrate(await serving_target(server), inputs)
    print(f"fp32 capacity: {capacity:.0f} requests/s of {IMAGES_PER_REQUEST} images", flush=True)
    workload = make_workload(capacity, args.phase_seconds)
    results = {}
    for name, policy, precision in MODES:
        results[name] = await run_mode(args.model_dir, workdir, name, policy, precision, workload, inputs)
    text = write_results(results, capacity, workload, args.phase_seconds, time.monotonic() - started)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "digits")
    parser.add_argument("--phase-seconds", type=float, default=12.0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
