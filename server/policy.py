"""Which variant answers a request, and why.

:meth:`Policy.choose` takes the request (precision asked for, accuracy floor, cost
ceiling, deadline) and the :class:`Load` the core measured (queue depth, predicted
wait from recent batch times, demand, CPU utilization, predicted cost of an image
per variant, the tenant's budget state) and returns a :class:`Decision`: a precision
and a reason from :data:`REASONS`, a bounded label value.

Which variant is cheaper per image, and which is faster, is read from the version's
measured :class:`~costserve.server.profile.CostProfile` on this host, never assumed:
on an AVX2-only CPU int8 can cost twice what fp32 does. Without a profile, or when
the variants measure within a few percent of each other, int8 is taken to be the
cheaper and faster one.

* An explicit precision is honoured (``requested``) or refused with
  :class:`ConstraintUnmet` when it is below the accuracy floor or predicted above
  the cost ceiling.
* ``AUTO`` first sets aside the variants dominated on this host (another allowed
  variant is cheaper, faster and at least as accurate): it never picks them, and when
  one variant is left it answers (``dominates``). It keeps the variants that meet the
  floor and the ceiling; if only one is left, it answers (``accuracy_floor`` or
  ``cost_ceiling``). Otherwise, in order: a tenant near its budget gets the cheaper
  variant (``budget_near``); under load pressure the faster one (``load_shed``); a
  deadline that the most accurate variant's predicted wait would miss but another's
  would not gets that other (``deadline``); else the mode decides: ``cost_first``
  takes the cheaper variant, ``accuracy_first`` the most accurate.
* With ``refuse_over_slo`` (``--over-slo refuse``), an ``AUTO`` request is held to
  the objective: if its variant is predicted to wait (in the event loop and the
  batch queue) more than ``admit_fraction`` of the objective, the faster variant
  answers when allowed and within it (``load_shed``), and otherwise the request is
  refused at once with :class:`OverObjective` (RESOURCE_EXHAUSTED), so the requests
  accepted keep the objective under overload. Explicit precisions are not held to
  it: they queue up to ``--max-queue`` and their deadline.
* Load pressure has hysteresis. It starts when the longest predicted wait of the
  variants' queues exceeds ``enter_fraction`` of the latency objective or CPU
  utilization reaches ``utilization_high``; it ends only after that wait stayed under
  ``exit_fraction`` of the objective, utilization under ``utilization_high`` and the
  demand (images to compute per second) under ``exit_demand_fraction`` of the demand
  seen when pressure started, all for ``hold_s`` seconds in a row. Shedding empties
  the slower variant's queue at once, so the wait alone would flip straight back; the
  demand test is what keeps it from flapping.

The cache is consulted by the core before the policy: an ``AUTO`` request whose
images are all cached under a variant meeting its floor is answered from there
(reason ``cache``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from costserve.server.budgets import BudgetStatus
from costserve.server.domain import Precision, PredictionRequest
from costserve.server.errors import ConstraintUnmet, OverObjective

if TYPE_CHECKING:  # the profile imports the runtimes; the policy only reads it
    from costserve.server.profile import CostProfile

POLICIES = ("cost_first", "accuracy_first")
#: Every reason a decision may carry (the ``reason`` label of ``costserve_decisions_total``).
REASONS = (
    "requested",
    "cache",
    "dominates",
    "accuracy_floor",
    "cost_ceiling",
    "budget_near",
    "load_shed",
    "deadline",
    "cost_first",
    "accuracy_first",
)


@dataclass(frozen=True)
class Decision:
    """The variant chosen for a request and the reason, a bounded label value."""

    precision: Precision
    reason: str


@dataclass(frozen=True)
class Load:
    """What the core measured just before choosing; every field has a harmless default."""

    #: Images waiting per variant.
    queue_depth: Mapping[Precision, int] = field(default_factory=dict)
    #: Predicted seconds before a new image of each variant would be computed (queue × recent time per image).
    predicted_wait_s: Mapping[Precision, float] = field(default_factory=dict)
    #: Images needing computation per second, over the last second (both variants).
    demand_per_s: float = 0.0
    #: Measured utilization of the provisioned CPU (0..1, before the pricing clamp).
    utilization: float = 0.0
    #: Predicted cost of computing one image per variant, in USD (recent average); absent while unknown.
    predicted_cost_per_image_usd: Mapping[Precision, float] = field(default_factory=dict)
    #: Where the request's tenant stands against its budget (OVER is refused before choosing).
    budget: BudgetStatus = BudgetStatus.NONE
    #: How late the event loop runs (seconds): what a request waits before its handler runs.
    loop_lag_s: float = 0.0


@dataclass(frozen=True)
class PolicyConfig:
    """Policy knobs; the latency objective comes from ``--latency-slo-ms``."""

    mode: str = "accuracy_first"
    latency_slo_s: float = 0.1
    enter_fraction: float = 0.5
    exit_fraction: float = 0.2
    utilization_high: float = 0.9
    exit_demand_fraction: float = 0.6
    hold_s: float = 3.0
    #: Refuse AUTO requests no variant is predicted to answer within the objective (``--over-slo refuse``).
    refuse_over_slo: bool = False
    #: With ``refuse_over_slo``: the share of the objective a request may be predicted to wait in the
    #: queue. Measured waits under overload spread to about four times their mean; the rest of the
    #: objective covers that spread, computing, and the trip back.
    admit_fraction: float = 0.25


class Policy:
    """Chooses fp32 or int8 per request; holds the load-shedding state (one per core).

    ``accuracy`` maps each variant the model version has to its held-out accuracy (None
    when it was not measured: such a variant answers no request with an accuracy floor);
    ``model`` names the version in messages; ``clock`` is monotonic seconds (tests pass
    their own); ``profile`` is the version's measured cost per image on this host (None:
    int8 is assumed the cheaper and faster variant).
    """

    def __init__(
        self,
        accuracy: Mapping[Precision, float | None] | None = None,
        config: PolicyConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        model: str = "the model",
        profile: CostProfile | None = None,
    ) -> None:
        self.accuracy: dict[Precision, float | None] = dict(accuracy or {Precision.FP32: 1.0, Precision.INT8: 1.0})
        self.model = model
        self.profile = profile
        self.config = config or PolicyConfig()
        if self.config.mode not in POLICIES:
            raise ValueError(f"policy {self.config.mode!r} is not one of {', '.join(POLICIES)}")
        self.clock = clock
        #: True while AUTO traffic is moved to the faster variant to hold the latency objective.
        self.shedding = False
        self._decisions: dict[tuple[Precision, str], Decision] = {}
        self._entered_demand = 0.0
        self._calm_since: float | None = None

    def decision(self, precision: Precision, reason: str) -> Decision:
        """The one shared :class:`Decision` for ``precision`` and ``reason`` (built once, not per request)."""
        key = (precision, reason)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._decisions[key] = Decision(precision, reason)
        return decision

    def allowed(self, request: PredictionRequest) -> list[Precision]:
        """Variants meeting the request's accuracy floor, most accurate first (unknown accuracy last)."""
        variants = sorted(self.accuracy, key=lambda precision: -(self.accuracy[precision] or -1.0))
        if request.min_accuracy <= 0:
            return variants
        return [precision for precision in variants if (self.accuracy[precision] or 0.0) >= request.min_accuracy]

    def observe(self, load: Load) -> bool:
        """Update the load-shedding state from ``load``; return whether shedding now."""
        config = self.config
        # The longest queue: whichever variant AUTO sends to, pressure shows there first.
        wait = max(load.predicted_wait_s.values(), default=0.0)
        now = self.clock()
        if not self.shedding:
            if wait > config.enter_fraction * config.latency_slo_s or load.utilization >= config.utilization_high:
                self.shedding = True
                self._entered_demand = load.demand_per_s
                self._calm_since = None
            return self.shedding
        calm = (
            wait < config.exit_fraction * config.latency_slo_s
            and load.utilization < config.utilization_high
            and load.demand_per_s <= config.exit_demand_fraction * self._entered_demand
        )
        if not calm:
            self._calm_since = None
        elif self._calm_since is None:
            self._calm_since = now
        elif now - self._calm_since >= config.hold_s:
            self.shedding = False
            self._calm_since = None
        return self.shedding

    def choose(self, request: PredictionRequest, load: Load | None = None) -> Decision:
        """The variant for ``request`` under ``load``; raises :class:`ConstraintUnmet` when none fits."""
        load = load or Load()
        ceiling = request.max_cost_usd
        if request.precision is not Precision.AUTO:  # honoured or refused; the load state is AUTO's
            precision = request.precision
            if precision not in self.accuracy:
                raise ConstraintUnmet(
                    f"{self.model} has no {precision.value} variant (it serves "
                    f"{', '.join(p.value for p in self.accuracy)}); ask for PRECISION_AUTO or another precision"
                )
            accuracy = self.accuracy[precision]
            if request.min_accuracy > 0 and accuracy is None:
                raise ConstraintUnmet(
                    f"the held-out accuracy of {self.model}'s {precision.value} variant is unknown (imported "
                    "without --holdout data), so it cannot meet min_accuracy; drop the floor or re-import with "
                    "held-out data"
                )
            if accuracy is not None and accuracy < request.min_accuracy:
                raise ConstraintUnmet(
                    f"precision {precision.value} has held-out accuracy {accuracy:.4f}, "
                    f"below the request's min_accuracy {request.min_accuracy:.4f}; "
                    "lower the floor or ask for PRECISION_AUTO"
                )
            per_image = load.predicted_cost_per_image_usd.get(precision)
            predicted = None if per_image is None else per_image * len(request.images)
            if ceiling > 0 and predicted is not None and predicted > ceiling:
                raise ConstraintUnmet(
                    f"precision {precision.value} is predicted to cost ${predicted:.3g} for this request, "
                    f"above its max_cost_usd ${ceiling:.3g}; raise the ceiling or ask for PRECISION_AUTO"
                )
            return self.decision(precision, "requested")

        shedding = self.observe(load)
        candidates = self.allowed(request)
        if not candidates:
            known = [accuracy for accuracy in self.accuracy.values() if accuracy is not None]
            if not known:
                raise ConstraintUnmet(
                    f"the held-out accuracy of every variant of {self.model} is unknown (imported without "
                    "--holdout data), so none can meet min_accuracy; drop the floor or re-import with held-out data"
                )
            raise ConstraintUnmet(
                f"no variant reaches min_accuracy {request.min_accuracy:.4f}; the best held-out accuracy is "
                f"{max(known):.4f}"
            )
        if ceiling > 0:
            count = len(request.images)
            predicted_cost = {p: load.predicted_cost_per_image_usd.get(p, 0.0) * count for p in candidates}
            affordable = [p for p in candidates if predicted_cost[p] <= ceiling]
            if not affordable:
                cheapest = min(predicted_cost.values())
                raise ConstraintUnmet(
                    f"every variant meeting the accuracy floor is predicted to cost more than max_cost_usd "
                    f"${ceiling:.3g} (the cheapest ${cheapest:.3g}); raise the ceiling or lower the floor"
                )
            if len(affordable) < len(candidates):
                return self._held_to_objective(self.decision(affordable[0], "cost_ceiling"), affordable, load)
        if self.profile is not None and len(candidates) > 1:
            dominated = self.profile.dominated(candidates, self.accuracy)
            if dominated:
                candidates = [precision for precision in candidates if precision not in dominated]
                if len(candidates) == 1:
                    return self._held_to_objective(self.decision(candidates[0], "dominates"), candidates, load)
        return self._held_to_objective(self._choose_auto(request, load, candidates, shedding), candidates, load)

    def cheaper(self, candidates: list[Precision]) -> Precision:
        """The candidate cheaper per image on this host (the profile's; else int8 when allowed, else the first)."""
        measured = self.profile.cheapest(candidates) if self.profile is not None else None
        if measured is not None:
            return measured
        return Precision.INT8 if Precision.INT8 in candidates else candidates[0]

    def faster(self, candidates: list[Precision]) -> Precision:
        """The candidate faster per image on this host (the profile's; else int8 when allowed, else the first)."""
        measured = self.profile.fastest(candidates) if self.profile is not None else None
        if measured is not None:
            return measured
        return Precision.INT8 if Precision.INT8 in candidates else candidates[0]

    def _choose_auto(
        self, request: PredictionRequest, load: Load, candidates: list[Precision], shedding: bool
    ) -> Decision:
        if len(candidates) == 1 and len(self.accuracy) > 1:
            return self.decision(candidates[0], "accuracy_floor")
        if len(candidates) > 1:
            if load.budget is BudgetStatus.NEAR:
                return self.decision(self.cheaper(candidates), "budget_near")
            if shedding:
                return self.decision(self.faster(candidates), "load_shed")
            remaining = request.time_remaining_s
            wait = load.predicted_wait_s
            if (
                self.config.mode == "accuracy_first"
                and remaining is not None
                and wait.get(candidates[0], 0.0) > remaining
            ):
                for precision in candidates[1:]:
                    if wait.get(precision, 0.0) < remaining:
                        return self.decision(precision, "deadline")
        if self.config.mode == "cost_first":
            return self.decision(self.cheaper(candidates), "cost_first")
        return self.decision(candidates[0], "accuracy_first")

    def _held_to_objective(self, decision: Decision, candidates: list[Precision], load: Load) -> Decision:
        """``decision``, held to the objective when ``refuse_over_slo`` is set.

        That is ``decision`` if its variant is predicted to start in time, else the faster
        variant if allowed and in time, else :class:`OverObjective`.
        """
        if not self.config.refuse_over_slo:
            return decision
        # What a request arriving now waits before its handler runs counts against the objective too.
        bound = self.config.admit_fraction * self.config.latency_slo_s - load.loop_lag_s
        wait = load.predicted_wait_s
        if wait.get(decision.precision, 0.0) <= bound:
            return decision
        # Only toward the faster variant: it drains its queue soonest.
        faster = self.faster(candidates)
        if decision.precision is not faster and wait.get(faster, 0.0) <= bound:
            return self.decision(faster, "load_shed")
        shortest = min(wait.get(precision, 0.0) for precision in candidates) + load.loop_lag_s
        raise OverObjective(
            f"overloaded: the variants this request allows are predicted to wait at least "
            f"{shortest * 1000:.0f} ms in the server, over {self.config.admit_fraction:.0%} of the latency "
            f"objective of {self.config.latency_slo_s * 1000:.0f} ms; retry with backoff "
            "(or ask for an explicit precision to queue)"
        )
