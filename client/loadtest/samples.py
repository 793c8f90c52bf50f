"""What one process measured in one step (:class:`Samples`), their exact pooling, and percentiles."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: Percentiles every step reports (``max`` comes on top).
PERCENTILES = (50, 90, 95, 99)


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
    #: Predictions of inputs whose label is known (all of them for the digits; none for a flat --inputs folder).
    labelled: int = 0
    #: Those of them that named the known label.
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
        labelled=sum(part.labelled for part in parts),
        correct=sum(part.correct for part in parts),
        precisions=sum((part.precisions for part in parts), Counter()),
        cost_usd=sum(part.cost_usd for part in parts),
        elapsed_s=max((part.elapsed_s for part in parts), default=0.0),
        loop_cpu_s=sum(part.loop_cpu_s for part in parts),
        wall_s=max((part.wall_s for part in parts), default=0.0),
        inputs_wrapped=any(part.inputs_wrapped for part in parts),
    )


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, nearest-rank: a measured value, never an interpolation.

    The smallest value with at least ``q`` percent of the values at or below it; NaN without values.
    """
    if len(values) == 0:
        return math.nan
    return float(np.quantile(np.asarray(values, dtype=np.float64), q / 100, method="inverted_cdf"))


def percentiles_ms(latencies_s: np.ndarray) -> dict[str, float | None]:
    """p50/p90/p95/p99/max/mean in ms, nearest-rank (each a measured latency), or None without samples."""
    names = [f"p{q}" for q in PERCENTILES] + ["max", "mean"]
    if len(latencies_s) == 0:
        return dict.fromkeys(names)
    values = [percentile(latencies_s, q) for q in PERCENTILES] + [latencies_s.max(), latencies_s.mean()]
    return {name: float(value) * 1000 for name, value in zip(names, values)}
