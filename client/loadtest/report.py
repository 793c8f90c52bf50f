"""A load test's results (:class:`LoadReport`, a :class:`StepResult` per step) and their table, JSON, CSV and plot."""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from costserve.loadtest.config import LoadStep, LoadtestConfig, RepeatSpec
from costserve.loadtest.protocols import CODECS
from costserve.loadtest.samples import Samples, merge, percentile, percentiles_ms

#: A generator process busier than this share of a core may be the bottleneck it measures.
BUSY_GENERATOR = 0.9
#: Open loop: sending later than this behind schedule (p99) is worth a note, in seconds.
LATE_SEND_S = 0.005
#: What the JSON report's ``settings.token`` says when the calls carried a token.
REDACTED = "<redacted>"


@dataclass
class StepResult:
    """One load level: what each process measured, and the pooled summary."""

    step: LoadStep
    index: int
    workers: list[Samples]
    config: LoadtestConfig

    @property
    def reports_cache_hits(self) -> bool:
        """Whether the protocol the step went by says which answers were cache hits."""
        return CODECS[self.config.protocol].reports_cache_hits

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
        send_lag_p99 = percentile(merged.send_lags_s, 99)
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
            # None too when the protocol's answers do not say (TF Serving).
            "cache_hit_ratio": merged.cache_hits / ok_images if ok_images and self.reports_cache_hits else None,
            # Of the answers to inputs with a known label; None without any (a flat --inputs folder).
            "accuracy": merged.correct / merged.labelled if merged.labelled else None,
            "precision_mix": {name: count / ok_images for name, count in sorted(merged.precisions.items())},
            "cost_usd_per_prediction": mean_cost,
            "cost_usd_per_million": mean_cost * 1e6 if mean_cost is not None else None,
            "client": {
                "processes": len(self.workers),
                "loop_cpu_cores": merged.loop_cpu_s / merged.wall_s if merged.wall_s else 0.0,
                "send_lag_p99_ms": None if math.isnan(send_lag_p99) else send_lag_p99 * 1000,
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
        send_lag_p99 = percentile(self.merged.send_lags_s, 99)
        if send_lag_p99 > LATE_SEND_S:  # NaN (no open-loop sends) is not
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
    #: The model version that answered the run's first call: ``NAME version V``.
    model: str
    config: LoadtestConfig
    steps: list[StepResult]
    #: Where the inputs came from: ``held-out digits``, or the ``--inputs`` folder.
    inputs: str = "held-out digits"
    #: Warnings about the whole run (its inputs), beside each step's own notes.
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (the ``--json`` document)."""
        settings = asdict(self.config)
        settings["repeat"] = str(self.config.repeat)
        # A report is shared and kept: it says whether calls carried a token, never which.
        settings["token"] = REDACTED if self.config.token else None
        return {
            "target": self.target,
            "model": self.model,
            "inputs": self.inputs,
            "settings": settings,
            "steps": [step.summary() for step in self.steps],
            "notes": self.notes,
        }


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
        f"{'costserve.v1 PredictStream' if config.stream else CODECS[config.protocol].title}, "
        f"{config.images_per_request} image(s)/request, "
        f"precision {config.precision}, inputs {inputs} from {report.inputs}"
        f"{', cache skipped' if config.skip_cache else ''}, "
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
    return "\n".join(lines + details + [f"note: {note}" for note in report.notes]) + "\n"


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
