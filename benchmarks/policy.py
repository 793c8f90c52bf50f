"""Does cost-aware serving save money? One load ramp, served four ways.

Starts a real ``costserve-server`` per mode on 127.0.0.1 (port 0) and drives the same
open-loop (Poisson) ramp at each: light -> about twice fp32's capacity -> light, with
a realistic repeat mix (a share of requests re-send an input already sent). The load
goes through the open-loop engine of ``costserve loadtest``, so each latency counts from
the request's scheduled send time; capacity is that tool's closed loop. Modes:

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import grpc
import numpy as np

from benchmarks.launch import REPO_ROOT, ServerProcess, ensure_model, start_benchmark_server
from benchmarks.payloads import PREDICT
from benchmarks.report import NOTES_MARKER, existing_notes, markdown_table, verdict
from costserve import metrics_text
from costserve.loadtest import LoadtestConfig, run_loadtest
from costserve.loadtest.generator import Timed, open_loop
from costserve.loadtest.inputs import InputPool, load_holdout_digits, variant
from costserve.loadtest.samples import percentile
from costserve.v1 import classifier_pb2 as pb

RESULTS = REPO_ROOT / "benchmarks" / "RESULTS-policy.md"
SLO_MS = 100.0
#: Load of each phase as a multiple of the measured fp32 capacity.
PHASES = (("light", 0.35), ("overload", 2.0), ("light again", 0.35))
#: Share of requests that re-send an input sent before (cache hits when the cache has it).
REPEAT_SHARE = 0.3
IMAGES_PER_REQUEST = 16
DEADLINE_S = 1.0
#: Capacity: closed loop with this many calls in flight, for this long (seconds), on a server of its own.
CALIBRATION_CONCURRENCY = 16
CALIBRATION_S = 5.0
#: Flags of every mode's server: AUTO is held to the objective (explicit precisions are not).
SERVER_FLAGS = ("--latency-slo-ms", str(SLO_MS), "--over-slo", "refuse")
MODES = (
    ("fp32", "accuracy_first", pb.PRECISION_FP32),
    ("int8", "accuracy_first", pb.PRECISION_INT8),
    ("auto cost_first", "cost_first", pb.PRECISION_AUTO),
    ("auto accuracy_first", "accuracy_first", pb.PRECISION_AUTO),
)


@contextlib.contextmanager
def costserve(model_dir: Path, workdir: Path, *flags: str) -> Iterator[ServerProcess]:
    """``costserve-server serve`` on a free port with :data:`SERVER_FLAGS`, SERVING; stopped on exit."""
    with start_benchmark_server(model_dir, *SERVER_FLAGS, *flags, name="costserve", workdir=workdir) as server:
        server.wait_serving()
        yield server


def cpu_split(server: ServerProcess) -> dict[str, float]:
    """CPU-seconds per image from the server's metrics: inference per computed image, handling per answer."""
    samples = metrics_text.scrape(server.metrics_url)
    images = metrics_text.total(samples, "costserve_images_total")
    computed = metrics_text.total(samples, "costserve_images_total", cache="miss")
    inference = metrics_text.total(samples, "costserve_cpu_seconds_total", phase="inference")
    handling = metrics_text.total(samples, "costserve_cpu_seconds_total", phase="handling")
    return {"inference_us": 1e6 * inference / max(computed, 1), "handling_us": 1e6 * handling / max(images, 1)}


@dataclass
class Outcome:
    """One request of the ramp: its phase, latency from its scheduled time, and what it answered and cost."""

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
    """Poisson arrivals per phase at its multiple of ``capacity_rps``; a share of them repeat earlier inputs."""
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
    """The load test's labelled inputs (:class:`~costserve.loadtest.inputs.InputPool`), each encoded once.

    Past the pool's distinct inputs, a second corner pixel is tagged too (the label does not
    change), so that every input the ramp calls distinct really is.
    """

    def __init__(self) -> None:
        self.pool = InputPool(*load_holdout_digits())
        self._extra: dict[int, bytes] = {}

    def request_bytes(self, ids: list[int], precision: int) -> bytes:
        """A serialized PredictRequest of these inputs, joined from each input's encoded field.

        Serialized protobuf messages merge when concatenated (repeated fields append), so the
        load generator builds a 16-image request by joining bytes: its CPU stays with the server.
        """
        tail = pb.PredictRequest(precision=precision).SerializeToString()
        return b"".join([*(self._field(input_id) for input_id in ids), tail])

    def _field(self, input_id: int) -> bytes:
        if input_id < self.pool.size:
            return self.pool.field(input_id)
        if input_id not in self._extra:
            pixels = variant(self.pool.images, input_id % self.pool.size)
            pixels[0, 1] ^= input_id // self.pool.size
            image = pb.Image(pixels=pb.Pixels(shape=list(pixels.shape), dtype=pb.DTYPE_UINT8, data=pixels.tobytes()))
            self._extra[input_id] = pb.PredictRequest(images=[image]).SerializeToString()
        return self._extra[input_id]

    def label(self, input_id: int) -> int:
        """The known label of input ``input_id``."""
        return self.pool.label(input_id)


def calibrate(target: str) -> float:
    """fp32 capacity in requests/s: ``costserve loadtest``'s closed loop, every image distinct and computed."""
    config = LoadtestConfig(
        target=target,
        concurrency=(CALIBRATION_CONCURRENCY,),
        duration_s=CALIBRATION_S,
        warmup_s=1.0,
        images_per_request=IMAGES_PER_REQUEST,
        precision="fp32",
        skip_cache=True,
        channels=1,
    )
    return run_loadtest(config).steps[0].summary()["throughput_rps"]


def outcome(phase: int, ids: list[int], inputs: Inputs, timed: Timed[pb.PredictResponse]) -> Outcome:
    """What one request of the ramp got, its latency counted from its scheduled time."""
    if timed.error is not None or timed.result is None:
        code = timed.error.code().name if timed.error is not None else "UNKNOWN"
        return Outcome(phase, timed.latency_s, False, code)
    reply = timed.result
    cost = reply.cost
    return Outcome(
        phase,
        timed.latency_s,
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


async def drive(target: str, precision: int, workload: Workload, inputs: Inputs) -> list[Outcome]:
    """Send the workload's arrivals through the load generator's open-loop engine; one outcome per request."""
    requests = [inputs.request_bytes(ids, precision) for _, _, ids in workload.arrivals]  # encoded before the clock
    async with grpc.aio.insecure_channel(target) as channel:
        predict = channel.unary_unary(PREDICT, response_deserializer=pb.PredictResponse.FromString)
        await predict(inputs.request_bytes([0, 1, 2, 3], pb.PRECISION_FP32), timeout=10)  # warm the channel
        outcomes: list[Outcome] = []

        def done(number: int, timed: Timed[pb.PredictResponse]) -> None:
            _, phase, ids = workload.arrivals[number]
            outcomes.append(outcome(phase, ids, inputs, timed))

        begin = asyncio.get_running_loop().time()
        schedule = [begin + at for at, _, _ in workload.arrivals]
        await open_loop(schedule, lambda number: predict(requests[number], timeout=DEADLINE_S), done)
        return outcomes


def _pct(values: list[float], q: float) -> float | None:
    return percentile(values, q) * 1000 if values else None


def summarize(outcomes: list[Outcome]) -> dict:
    """Cost per 1M predictions three ways, accuracy, precision shares, cache hits, and latency per phase."""
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
        "- fp32 capacity, measured first (closed loop, 16 in flight, every image computed): "
        f"**{capacity:.0f} requests/s** of {IMAGES_PER_REQUEST} images.",
        "- Open-loop Poisson arrivals, the same arrivals and inputs for every mode, "
        + ", ".join(f"{name} {rate:.0f} req/s for {phase_s:.0f} s" for (name, _), rate in zip(PHASES, workload.rates))
        + f" ({len(workload.arrivals)} requests).",
        f"- {REPEAT_SHARE:.0%} of requests re-send an input sent before; the rest are distinct variants of the "
        f"held-out digits (labels known). Each call has a {DEADLINE_S:.0f} s deadline. Every server runs with "
        f"`{' '.join(SERVER_FLAGS)}`: AUTO requests are held to the objective (refused at once when no variant "
        "is predicted to answer within it), explicit precisions queue. A fresh server (cold cache) per mode. "
        "The load generator sends each request as bytes joined from pre-encoded images, so its CPU stays "
        "with the server, through `costserve loadtest`'s open-loop engine: each latency counts from the "
        "request's scheduled send time.",
        "- Cost per 1M predictions three ways: **compute** = the CPU and memory the answers used, at list price "
        "(the part a precision can change); **resources** = compute plus the network bytes moved (the same for "
        "every mode); **charged** = what the server billed, which also spreads the idle capacity of one fixed "
        "2-vCPU server over the answers (docs/cost-and-policy.md, The cost model).",
        "",
        "## Per mode",
        "",
        markdown_table(
            ["mode", "cost / 1M, compute", "cost / 1M, resources", "cost / 1M, charged", "accuracy",
             "fp32 / int8 share", "cache hits", "rejected"],
            [
                [name, f"${r['compute_per_1m']:.5f}", f"${r['list_per_1m']:.5f}", f"${r['charged_per_1m']:.5f}",
                 f"{r['accuracy']:.2%}", f"{r['shares']['fp32']:.0%} / {r['shares']['int8']:.0%}", f"{r['cache']:.0%}",
                 r["rejected"]]
                for name, r in results.items()
            ],
        ),
    ]  # fmt: skip
    lines += [
        "",
        "## Where the CPU goes (the servers' own metrics)",
        "",
        "`costserve_cpu_seconds_total` by phase: inference per computed image (its share of its batch's runtime "
        "call), handling per answered image (decode, cache, bookkeeping, message conversion on the event loop).",
        "",
        markdown_table(
            ["mode", "inference CPU per computed image", "handling CPU per answer"],
            [[name, f"{r['inference_us']:.0f} µs", f"{r['handling_us']:.0f} µs"] for name, r in results.items()],
        ),
        "",
        "## Latency per phase (ms, client side; p99 counts rejected calls at the time they failed)",
        "",
    ]
    phase_rows = []
    for name, r in results.items():
        cells = [name]
        for phase in r["phases"]:
            codes = f" ({', '.join(phase['codes'])})" if phase["codes"] else ""
            cells += [_ms(phase["p50"]), _ms(phase["p99"]), f"{phase['rejected']}{codes}"]
        phase_rows.append(cells)
    header = ["mode", *(f"{name} {column}" for name, _ in PHASES for column in ("p50", "p99", "rejected"))]
    lines.append(markdown_table(header, phase_rows))

    targets = []
    overload = 1
    for name in ("auto cost_first", "auto accuracy_first"):
        auto = results[name]
        compute_ratio = auto["compute_per_1m"] / fp32["compute_per_1m"]
        ratio = auto["list_per_1m"] / fp32["list_per_1m"]
        charged_ratio = auto["charged_per_1m"] / fp32["charged_per_1m"]
        points = (auto["accuracy"] - fp32["accuracy"]) * 100
        a_p99, f_p99 = auto["phases"][overload]["p99"], fp32["phases"][overload]["p99"]
        a_rej, f_rej = auto["phases"][overload]["rejected"], fp32["phases"][overload]["rejected"]
        targets += [
            ["cost per 1M ≤ 70% of fp32-only (compute)", name, f"{compute_ratio:.0%}", verdict(compute_ratio <= 0.7)],
            ["cost per 1M ≤ 70% of fp32-only (resources)", name, f"{ratio:.0%}", verdict(ratio <= 0.7)],
            ["cost per 1M ≤ 70% of fp32-only (charged)", name, f"{charged_ratio:.0%}", verdict(charged_ratio <= 0.7)],
            ["accuracy ≥ fp32-only − 0.5 points", name, f"{points:+.2f} points", verdict(points >= -0.5)],
            [
                f"overload p99 ≤ {SLO_MS:.0f} ms where fp32-only's is not", name,
                f"{_ms(a_p99)} ms vs fp32 {_ms(f_p99)} ms",
                verdict(a_p99 is not None and a_p99 <= SLO_MS and (f_p99 is None or f_p99 > SLO_MS)),
            ],
            ["fewer rejections than fp32-only in the overload", name, f"{a_rej} vs {f_rej}", verdict(a_rej < f_rej)],
        ]  # fmt: skip
    targets.append(
        [
            "a tenant over budget is refused within 1 s of crossing; others unaffected", "–",
            "by construction: spend is added when a response is priced, so the very next request is refused; "
            "`tests/test_policy_server.py::test_budget_degrades_then_refuses_then_resets` checks it",
            "not measured here",
        ]
    )  # fmt: skip
    lines += ["", "## Targets", "", markdown_table(["target", "AUTO policy", "measured", "verdict"], targets), ""]
    text = "\n".join(lines)
    return text


def run_mode(
    model_dir: Path, workdir: Path, name: str, policy: str, precision: int, workload: Workload, inputs: Inputs
) -> dict:
    """Serve the workload with one mode on a fresh server; its summary and CPU split."""
    with costserve(model_dir, workdir, "--policy", policy) as server:
        outcomes = asyncio.run(drive(server.target, precision, workload, inputs))
        split = cpu_split(server)
    summary = {**summarize(outcomes), **split}
    print(
        f"{name:>20}: {summary['predictions']} predictions, compute ${summary['compute_per_1m']:.5f}/1M, "
        f"resources ${summary['list_per_1m']:.5f}/1M, charged ${summary['charged_per_1m']:.5f}/1M, "
        f"inference {summary['inference_us']:.0f} us/computed image, handling {summary['handling_us']:.0f} us/answer, "
        f"accuracy {summary['accuracy']:.2%}, overload p99 {_ms(summary['phases'][1]['p99'])} ms, "
        f"rejected {summary['rejected']}",
        flush=True,
    )
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``python -m benchmarks.policy``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.policy", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "digits")
    parser.add_argument("--phase-seconds", type=float, default=12.0, help="seconds of each phase (default 12)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.policy``."""
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    ensure_model(args.model_dir)
    inputs = Inputs()
    workdir = Path(tempfile.mkdtemp(prefix="costserve-policy-"))  # the servers' logs
    with costserve(args.model_dir, workdir) as server:
        capacity = calibrate(server.target)
    print(f"fp32 capacity: {capacity:.0f} requests/s of {IMAGES_PER_REQUEST} images", flush=True)
    workload = make_workload(capacity, args.phase_seconds)
    results = {}
    for name, policy, precision in MODES:
        results[name] = run_mode(args.model_dir, workdir, name, policy, precision, workload, inputs)
    notes = existing_notes(args.output) or "\n"
    text = write_results(results, capacity, workload, args.phase_seconds, time.monotonic() - started)
    args.output.write_text(text.rstrip("\n") + "\n\n" + NOTES_MARKER + notes)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
