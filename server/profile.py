"""What computing an image costs on this host, per variant and batch size: measured, not assumed.

Whether int8 is cheaper than fp32, and whether a larger batch is cheaper per image,
depends on the CPU (AVX-512 and VNNI favour int8; on an AVX2-only host int8 can be
twice as slow) and on the model. So when a version is loaded, :func:`measure` warms
every variant at each allowed batch size and times them side by side, round after
round, on the inference path the batcher uses (stacking uint8 images, preprocessing,
the runtime), off the event loop, in a fraction of a second. Live
batches then keep a recent average per batch size beside it
(:meth:`VariantProfile.observe`), exported with it.

Two decisions read the profile, from the warm-up's figures:

* the batcher's **batch limit** (:attr:`VariantProfile.batch_limit`): batches stop
  growing where the CPU per image stops falling, at the largest allowed size within
  :data:`FLAT_TOLERANCE` of the cheapest (``--max-batch-size`` stays the upper bound).
  Where the cost per image is flat the largest size is kept: each batch also costs the
  event loop a hand-off that the runtime's figures do not show, and fewer batches pay
  it fewer times;
* the policy's orderings (:class:`CostProfile`): the cheaper variant per image, the
  faster one, and variants **dominated** on this host (another allowed variant is
  cheaper, faster and at least as accurate), which ``AUTO`` never picks.

Each variant is compared at its batch limit, the size its batches run at under load,
when cost and throughput matter most.

The decisions compare figures measured at load, side by side, before any request.
Live figures cover only the sizes and variants in use, and under load they carry the
host's contention (on this 2-core host fp32's CPU per image at batch 32 went from 95
to 173 µs while the event loop and the load client shared its cores): read against
the warm-up figures of a variant not in use, they made the idle variant look cheaper
and flipped ``AUTO`` back and forth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from costserve.server.domain import Precision
from costserve.server.load import ewma
from costserve.server.runtimes import Runtime

#: Time spent timing a version's variants at load, every size of every variant together, per variant, in
#: seconds (a large model may take longer: every size is timed at least :data:`MEASURE_ROUNDS_MIN` times).
MEASURE_BUDGET_S = 0.3
#: Fewest and most timed calls per variant and batch size at load.
MEASURE_ROUNDS_MIN = 2
MEASURE_ROUNDS_MAX = 7
#: A batch size whose CPU per image is within this share of the cheapest counts as cheapest (the
#: warm-up's figures vary by about 10% between starts on a busy host).
FLAT_TOLERANCE = 0.20
#: One variant must beat another by more than this share to count as cheaper or faster.
MARGIN = 0.05
#: Weight of a live batch in a batch size's recent average.
LIVE_WEIGHT = 0.1


@dataclass(slots=True)
class SizeCost:
    """What one image costs at one batch size: CPU-seconds and wall seconds."""

    cpu_s: float
    wall_s: float
    #: Live batches the figures average (0: the measurement at load).
    batches: int = 0


class VariantProfile:
    """The measured cost per image of one variant at each allowed batch size, and its batch limit."""

    def __init__(self, precision: Precision, sizes: Mapping[int, SizeCost]) -> None:
        if not sizes:
            raise ValueError("a profile needs at least one batch size")
        self.precision = precision
        #: The warm-up's figures by batch size: what the decisions read.
        self.sizes: dict[int, SizeCost] = dict(sorted(sizes.items()))
        #: Recent averages of live batches by batch size (a size appears once a batch of it ran).
        self.live: dict[int, SizeCost] = {}
        #: Largest batch the batcher forms: where the CPU per image stops falling.
        self.batch_limit = self._cheapest_size()

    def cpu_per_image(self) -> float:
        """CPU-seconds per image at the batch limit."""
        return self.sizes[self.batch_limit].cpu_s

    def wall_per_image(self) -> float:
        """Wall seconds per image at the batch limit (one inference thread: the inverse of its throughput)."""
        return self.sizes[self.batch_limit].wall_s

    def at(self, batch_size: int) -> SizeCost:
        """The cost per image at the smallest profiled size of at least ``batch_size`` (else the largest)."""
        for size, cost in self.sizes.items():
            if size >= batch_size:
                return cost
        return self.sizes[max(self.sizes)]

    def observe(self, batch_size: int, cpu_seconds: float, wall_seconds: float) -> None:
        """Fold a live batch of ``batch_size`` images that used ``cpu_seconds`` over ``wall_seconds`` into the
        recent average of its size (:attr:`live`). Only profiled sizes count: a padded partial batch mixes two."""
        if batch_size not in self.sizes:
            return
        cpu_s, wall_s = cpu_seconds / batch_size, wall_seconds / batch_size
        live = self.live.get(batch_size)
        if live is None:
            # A new dict rather than a new key: the metrics thread may be iterating the old one.
            self.live = {**self.live, batch_size: SizeCost(cpu_s, wall_s, batches=1)}
            return
        live.cpu_s = ewma(live.cpu_s, cpu_s, LIVE_WEIGHT)
        live.wall_s = ewma(live.wall_s, wall_s, LIVE_WEIGHT)
        live.batches += 1

    def why(self) -> str:
        """Why batches stop at the limit, in one line for logs."""
        per_image = ", ".join(f"{size}: {cost.cpu_s * 1e6:.1f}" for size, cost in self.sizes.items())
        if self.batch_limit == max(self.sizes):
            return f"CPU per image does not rise up to the largest batch (µs by batch size: {per_image})"
        return f"CPU per image rises past batch {self.batch_limit} (µs by batch size: {per_image})"

    def _cheapest_size(self) -> int:
        cheapest = min(cost.cpu_s for cost in self.sizes.values())
        return max(size for size, cost in self.sizes.items() if cost.cpu_s <= cheapest * (1 + FLAT_TOLERANCE))


class CostProfile:
    """The measured profiles of a version's variants, and the orderings the policy reads from them."""

    def __init__(self, variants: Iterable[VariantProfile]) -> None:
        self.variants: dict[Precision, VariantProfile] = {variant.precision: variant for variant in variants}

    def cheapest(self, candidates: Sequence[Precision]) -> Precision | None:
        """The candidate with the lowest CPU per image, when it beats every other by :data:`MARGIN`; else None."""
        return self._best(candidates, VariantProfile.cpu_per_image)

    def fastest(self, candidates: Sequence[Precision]) -> Precision | None:
        """The candidate with the lowest wall time per image, when it beats every other by :data:`MARGIN`; else None."""
        return self._best(candidates, VariantProfile.wall_per_image)

    def dominated(self, candidates: Sequence[Precision], accuracy: Mapping[Precision, float | None]) -> set[Precision]:
        """Candidates another candidate beats on this host: cheaper and faster, and at least as accurate."""
        return {
            precision
            for precision in candidates
            for other in candidates
            if other is not precision and self._beats(other, precision) and _as_accurate(other, precision, accuracy)
        }

    def verdict(self) -> str:
        """One line comparing the variants per image at their batch limits (empty with fewer than two)."""
        if Precision.FP32 not in self.variants or Precision.INT8 not in self.variants:
            return ""
        fp32, int8 = self.variants[Precision.FP32], self.variants[Precision.INT8]
        if fp32.cpu_per_image() <= 0:
            return ""  # a clock too coarse to time it: no ratio to give
        ratio = int8.cpu_per_image() / fp32.cpu_per_image()
        at = (
            f"at batch {fp32.batch_limit}"
            if fp32.batch_limit == int8.batch_limit
            else f"at their batch limits ({fp32.batch_limit} and {int8.batch_limit})"
        )
        return f"on this host int8 costs {ratio:.2g}x fp32 per image {at}"

    def _beats(self, better: Precision, worse: Precision) -> bool:
        a, b = self.variants.get(better), self.variants.get(worse)
        if a is None or b is None:
            return False
        cheaper = a.cpu_per_image() * (1 + MARGIN) < b.cpu_per_image()
        return cheaper and a.wall_per_image() * (1 + MARGIN) < b.wall_per_image()

    def _best(self, candidates: Sequence[Precision], per_image: Callable[[VariantProfile], float]) -> Precision | None:
        measured = [(per_image(self.variants[p]), p) for p in candidates if p in self.variants]
        if len(measured) < 2 or len(measured) < len(candidates):
            return None
        measured.sort(key=lambda item: item[0])
        (best_cost, best), (runner_up, _) = measured[0], measured[1]
        return best if best_cost * (1 + MARGIN) < runner_up else None


def _as_accurate(better: Precision, worse: Precision, accuracy: Mapping[Precision, float | None]) -> bool:
    a, b = accuracy.get(better), accuracy.get(worse)
    if b is None:
        return True  # unknown accuracy claims nothing over a variant that is cheaper and faster
    return a is not None and a >= b


def measure(
    runtimes: Mapping[Precision, Runtime], batch_sizes: Sequence[int], budget_s: float = MEASURE_BUDGET_S
) -> CostProfile:
    """Warm every variant at every batch size, so nothing is built while serving, and time them side by side.

    One untimed pass over every variant and size comes first, then rounds, each of which times
    every variant at every size once, as many as fit in ``budget_s`` per variant (at least
    :data:`MEASURE_ROUNDS_MIN`, at most :data:`MEASURE_ROUNDS_MAX`). So every figure is taken as
    often, over the same span, under the same conditions; the fastest call of each counts (what
    the others add is other work on the host). The images are random uint8 levels, the path a
    batch of encoded or uint8 images takes. Run it off the event loop.
    """
    rng = np.random.default_rng(0)
    shapes = {runtime.input_shape for runtime in runtimes.values()}
    batches = {
        (shape, size): list(rng.integers(0, 256, size=(size, *shape), dtype=np.uint8))
        for shape in shapes
        for size in batch_sizes
    }
    calls = [(precision, size) for precision in runtimes for size in batch_sizes]

    def timed(precision: Precision, size: int) -> tuple[float, float]:
        runtime = runtimes[precision]
        return runtime.time_batch(batches[(runtime.input_shape, size)])

    pass_s = sum(timed(precision, size)[1] for precision, size in calls)
    budget = budget_s * len(runtimes)
    rounds = min(MEASURE_ROUNDS_MAX, max(MEASURE_ROUNDS_MIN, int(budget / max(pass_s, 1e-9))))
    best = {call: (float("inf"), float("inf")) for call in calls}
    for _ in range(rounds):
        for call in calls:
            cpu, wall = timed(*call)
            best[call] = (min(best[call][0], cpu), min(best[call][1], wall))
    return CostProfile(
        VariantProfile(
            precision,
            {
                size: SizeCost(best[(precision, size)][0] / size, best[(precision, size)][1] / size)
                for size in batch_sizes
            },
        )
        for precision in runtimes
    )
