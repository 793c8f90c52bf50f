"""The policy on its own: every decision and its reason, and load-shedding hysteresis, from synthetic load."""

from __future__ import annotations

import dataclasses

import pytest

from costserve.server.budgets import BudgetStatus
from costserve.server.domain import ImageInput, Precision, PredictionRequest
from costserve.server.errors import ConstraintUnmet, OverObjective
from costserve.server.policy import REASONS, Decision, Load, Policy, PolicyConfig

ACCURACY = {Precision.FP32: 0.98, Precision.INT8: 0.97}
SLO = 0.1
CALM = Load(predicted_wait_s={Precision.FP32: 0.0, Precision.INT8: 0.0}, demand_per_s=100.0)
PRESSED = Load(predicted_wait_s={Precision.FP32: 0.08, Precision.INT8: 0.001}, demand_per_s=1000.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _policy(mode: str = "accuracy_first", clock: FakeClock | None = None) -> Policy:
    return Policy(ACCURACY, PolicyConfig(mode=mode, latency_slo_s=SLO, hold_s=3.0), clock=clock or FakeClock())


def _request(precision: Precision = Precision.AUTO, **fields: object) -> PredictionRequest:
    return PredictionRequest(images=[ImageInput(encoded=b"x")], precision=precision, **fields)  # type: ignore[arg-type]


# --- explicit precision -----------------------------------------------------------------


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.INT8])
def test_explicit_precision_is_honoured_even_under_pressure(precision: Precision) -> None:
    policy = _policy(mode="cost_first")
    assert policy.choose(_request(precision), PRESSED).precision is precision
    assert policy.choose(_request(precision), PRESSED).reason == "requested"


def test_explicit_precision_below_the_accuracy_floor_is_refused() -> None:
    with pytest.raises(ConstraintUnmet, match=r"int8 has held-out accuracy 0\.9700, below .* 0\.9750"):
        _policy().choose(_request(Precision.INT8, min_accuracy=0.975), CALM)
    assert _policy().choose(_request(Precision.FP32, min_accuracy=0.975), CALM).reason == "requested"


def test_explicit_precision_above_the_cost_ceiling_is_refused() -> None:
    load = Load(predicted_cost_per_image_usd={Precision.FP32: 2e-7, Precision.INT8: 5e-8})
    with pytest.raises(ConstraintUnmet, match=r"fp32 is predicted to cost \$2e-07 .* max_cost_usd \$1e-07"):
        _policy().choose(_request(Precision.FP32, max_cost_usd=1e-7), load)
    assert _policy().choose(_request(Precision.INT8, max_cost_usd=1e-7), load).reason == "requested"


def test_explicit_precision_with_no_cost_history_is_honoured() -> None:
    assert _policy().choose(_request(Precision.FP32, max_cost_usd=1e-12), Load()).precision is Precision.FP32


# --- AUTO -------------------------------------------------------------------------------


def test_modes_choose_fp32_or_int8_when_capacity_is_free() -> None:
    assert _policy("accuracy_first").choose(_request(), CALM) == Decision(Precision.FP32, "accuracy_first")
    assert _policy("cost_first").choose(_request(), CALM) == Decision(Precision.INT8, "cost_first")


def test_accuracy_floor_leaves_fp32() -> None:
    assert _policy("cost_first").choose(_request(min_accuracy=0.975), CALM) == Decision(
        Precision.FP32, "accuracy_floor"
    )
    # The floor wins over load and budget: int8 would not meet it.
    assert _policy().choose(_request(min_accuracy=0.975), PRESSED).precision is Precision.FP32


def test_an_unreachable_floor_is_refused() -> None:
    with pytest.raises(ConstraintUnmet, match=r"no variant reaches min_accuracy 0\.9900; the best .* 0\.9800"):
        _policy().choose(_request(min_accuracy=0.99), CALM)


def test_cost_ceiling_leaves_int8_or_refuses() -> None:
    load = Load(predicted_cost_per_image_usd={Precision.FP32: 2e-7, Precision.INT8: 5e-8})
    assert _policy().choose(_request(max_cost_usd=1e-7), load) == Decision(Precision.INT8, "cost_ceiling")
    with pytest.raises(ConstraintUnmet, match=r"cheapest \$5e-08"):
        _policy().choose(_request(max_cost_usd=1e-8), load)
    with pytest.raises(ConstraintUnmet):  # int8 is cheap enough but below the floor
        _policy().choose(_request(max_cost_usd=1e-7, min_accuracy=0.975), load)


def test_a_tenant_near_its_budget_gets_int8() -> None:
    load = Load(budget=BudgetStatus.NEAR)
    assert _policy().choose(_request(), load) == Decision(Precision.INT8, "budget_near")
    assert _policy().choose(_request(Precision.FP32), load).reason == "requested"


def test_a_deadline_fp32_would_miss_takes_int8() -> None:
    load = Load(predicted_wait_s={Precision.FP32: 0.03, Precision.INT8: 0.001})
    assert _policy().choose(_request(time_remaining_s=0.02), load) == Decision(Precision.INT8, "deadline")
    assert _policy().choose(_request(time_remaining_s=5.0), load) == Decision(Precision.FP32, "accuracy_first")


def test_every_reason_is_in_the_bounded_set() -> None:
    policy = _policy()
    decisions = [
        policy.choose(_request(), CALM),
        policy.choose(_request(Precision.INT8), CALM),
        policy.choose(_request(min_accuracy=0.975), CALM),
        policy.choose(_request(), Load(budget=BudgetStatus.NEAR)),
        policy.choose(_request(), PRESSED),
    ]
    assert {decision.reason for decision in decisions} <= set(REASONS)


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="fastest"):
        Policy(ACCURACY, PolicyConfig(mode="fastest"))


# --- load shedding and hysteresis ---------------------------------------------------------


def test_predicted_wait_past_half_the_objective_sheds_auto_to_int8() -> None:
    policy = _policy()
    assert policy.choose(_request(), Load(predicted_wait_s={Precision.FP32: 0.049})).reason == "accuracy_first"
    assert policy.choose(_request(), Load(predicted_wait_s={Precision.FP32: 0.051})) == Decision(
        Precision.INT8, "load_shed"
    )
    assert policy.shedding


def test_high_utilization_sheds() -> None:
    policy = _policy()
    assert policy.choose(_request(), Load(utilization=0.95)) == Decision(Precision.INT8, "load_shed")


def test_shedding_holds_while_demand_stays_high_though_the_fp32_queue_emptied() -> None:
    clock = FakeClock()
    policy = _policy(clock=clock)
    policy.choose(_request(), PRESSED)
    # int8 drains the fp32 queue at once; the demand that caused it is still there.
    for _ in range(100):
        clock.now += 0.1
        decision = policy.choose(_request(), Load(predicted_wait_s={Precision.FP32: 0.0}, demand_per_s=900.0))
        assert decision.reason == "load_shed"


def test_shedding_ends_only_after_load_stays_low_for_the_hold_time() -> None:
    clock = FakeClock()
    policy = _policy(clock=clock)
    policy.choose(_request(), PRESSED)  # enters at 1000 images/s
    low = Load(predicted_wait_s={Precision.FP32: 0.0}, demand_per_s=300.0)
    clock.now = 1.0
    assert policy.choose(_request(), low).reason == "load_shed"  # calm starts
    clock.now = 3.9
    assert policy.choose(_request(), low).reason == "load_shed"  # 2.9 s calm: not yet
    clock.now = 4.0
    assert policy.choose(_request(), low) == Decision(Precision.FP32, "accuracy_first")
    assert not policy.shedding


def test_a_blip_of_load_restarts_the_hold() -> None:
    clock = FakeClock()
    policy = _policy(clock=clock)
    policy.choose(_request(), PRESSED)
    low = Load(demand_per_s=300.0)
    clock.now = 1.0
    policy.choose(_request(), low)
    clock.now = 3.0
    policy.choose(_request(), Load(demand_per_s=800.0))  # above 60% of 1000: not calm
    clock.now = 4.5
    assert policy.choose(_request(), low).reason == "load_shed"
    clock.now = 7.4
    assert policy.choose(_request(), low).reason == "load_shed"
    clock.now = 7.5
    assert policy.choose(_request(), low).reason == "accuracy_first"


def test_no_flapping_under_a_steady_overload() -> None:
    """A load that fp32 cannot hold but int8 can: once shed, it stays shed."""
    clock = FakeClock()
    policy = _policy(clock=clock)
    switches, shedding = 0, False
    for step in range(600):  # 60 s, a decision every 100 ms
        clock.now = step * 0.1
        # fp32's queue grows whenever fp32 answers AUTO traffic; int8 keeps it empty.
        wait = 0.0 if shedding else 0.06
        load = Load(predicted_wait_s={Precision.FP32: wait}, demand_per_s=1000.0)
        now_shedding = policy.choose(_request(), load).reason == "load_shed"
        switches += now_shedding != shedding
        shedding = now_shedding
    assert switches == 1 and shedding


def test_leaving_needs_demand_well_below_where_fp32_broke() -> None:
    clock = FakeClock()
    policy = _policy(clock=clock)
    policy.choose(_request(), PRESSED)  # fp32 broke at 1000 images/s
    for step in range(1, 100):
        clock.now = step * 0.1
        assert policy.choose(_request(), Load(demand_per_s=700.0)).reason == "load_shed"


# --- held to the objective (--over-slo refuse) -------------------------------------------


def _refusing(mode: str = "accuracy_first") -> Policy:
    return Policy(ACCURACY, PolicyConfig(mode=mode, latency_slo_s=SLO, refuse_over_slo=True), clock=FakeClock())


def test_over_slo_refuse_moves_auto_to_int8_while_int8_starts_in_time() -> None:
    bound = 0.25 * SLO
    load = Load(predicted_wait_s={Precision.FP32: 0.0, Precision.INT8: bound})
    assert _refusing("cost_first").choose(_request(), load) == Decision(Precision.INT8, "cost_first")
    backed_up = Load(predicted_wait_s={Precision.FP32: bound * 1.01, Precision.INT8: 0.0})
    # Under the shedding threshold, so only the objective moves it.
    assert _refusing().choose(_request(), backed_up) == Decision(Precision.INT8, "load_shed")


def test_over_slo_refuse_refuses_auto_when_no_variant_starts_in_time() -> None:
    load = Load(predicted_wait_s={Precision.FP32: 0.0, Precision.INT8: 0.3 * SLO})
    with pytest.raises(OverObjective, match="latency objective"):
        _refusing("cost_first").choose(_request(), load)  # never moved to the costlier fp32 for speed
    with pytest.raises(OverObjective):
        _refusing().choose(_request(min_accuracy=0.975), Load(predicted_wait_s={Precision.FP32: 0.3 * SLO}))


def test_over_slo_refuse_counts_the_event_loop_lag() -> None:
    load = Load(predicted_wait_s={Precision.FP32: 0.1 * SLO, Precision.INT8: 0.1 * SLO}, loop_lag_s=0.2 * SLO)
    with pytest.raises(OverObjective):
        _refusing().choose(_request(), load)
    assert _refusing().choose(_request(), dataclasses.replace(load, loop_lag_s=0.1 * SLO)).precision is Precision.FP32


def test_over_slo_refuse_never_refuses_an_explicit_precision_or_queue_mode() -> None:
    load = Load(predicted_wait_s={Precision.FP32: SLO, Precision.INT8: SLO})
    assert _refusing().choose(_request(Precision.FP32), load) == Decision(Precision.FP32, "requested")
    assert _policy().choose(_request(), load).precision is Precision.INT8  # queue mode: shed, not refused


# --- versions with unknown accuracy or one variant ----------------------------------------


def _auto(**fields: object) -> PredictionRequest:
    return PredictionRequest(images=[ImageInput(encoded=b"x")], **fields)  # type: ignore[arg-type]


def test_unknown_accuracy_serves_without_a_floor_and_refuses_one_saying_why() -> None:
    policy = Policy({Precision.FP32: None, Precision.INT8: None}, model="model 'shapes' version 1")
    assert policy.choose(_auto()).precision is Precision.FP32
    for request in (_auto(min_accuracy=0.5), _auto(min_accuracy=0.5, precision=Precision.INT8)):
        with pytest.raises(ConstraintUnmet, match="unknown"):
            policy.choose(request)


def test_a_known_variant_meets_the_floor_when_the_other_is_unknown() -> None:
    policy = Policy({Precision.FP32: 0.9, Precision.INT8: None})
    assert policy.allowed(_auto(min_accuracy=0.5)) == [Precision.FP32]
    assert policy.choose(_auto(min_accuracy=0.5)) == Decision(Precision.FP32, "accuracy_floor")


def test_an_fp32_only_version_answers_auto_and_refuses_int8() -> None:
    policy = Policy({Precision.FP32: 0.95}, PolicyConfig(mode="cost_first"), model="model 'shapes' version 2")
    assert policy.choose(_auto()) == Decision(Precision.FP32, "cost_first")
    with pytest.raises(ConstraintUnmet, match="has no int8 variant"):
        policy.choose(_auto(precision=Precision.INT8))
