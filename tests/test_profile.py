"""Cost profiles: what an image costs per variant and batch size on this host, and the decisions read from it."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from conftest import REPO_ROOT
from helpers import INT8_CHEAPER, INT8_SLOWER, CostedRuntime, flat_profile

from costserve.server.batcher import Batcher
from costserve.server.budgets import BudgetStatus
from costserve.server.domain import ImageInput, Precision, PredictionRequest
from costserve.server.policy import Load, Policy, PolicyConfig
from costserve.server.profile import FLAT_TOLERANCE, CostProfile, SizeCost, VariantProfile, measure
from costserve.server.runtimes import allowed_batch_sizes
from costserve.server.servicer import PRECISION_FROM_PROTO
from costserve.v1 import classifier_pb2 as pb
from costserve.v1 import classifier_pb2_grpc as pb_grpc

ACCURACY = {Precision.FP32: 0.98, Precision.INT8: 0.97}
#: int8 slower on this host, but the more accurate of the two: it is not dominated.
INT8_SLOWER_BUT_MORE_ACCURATE = {Precision.FP32: 0.97, Precision.INT8: 0.98}
CALM = Load(predicted_wait_s={Precision.FP32: 0.0, Precision.INT8: 0.0}, demand_per_s=100.0)
PRESSED = Load(predicted_wait_s={Precision.FP32: 0.08, Precision.INT8: 0.001}, demand_per_s=1000.0)
#: Batch 8 is cheapest per image; past it the per-image cost rises (as a MobileNetV2's does on an AVX2 host).
EIGHT_CHEAPEST = {1: 200e-6, 2: 130e-6, 4: 95e-6, 8: 76e-6, 16: 100e-6, 32: 120e-6}
DIGIT_PNG = (REPO_ROOT / "examples" / "digits" / "digit_7.png").read_bytes()


def _profile(costs: dict[int, float], precision: Precision = Precision.FP32) -> VariantProfile:
    return VariantProfile(precision, {size: SizeCost(cost, cost) for size, cost in costs.items()})


def _request(**fields: Any) -> PredictionRequest:
    return PredictionRequest(images=[ImageInput(encoded=b"x")], **fields)


def _policy(
    costs: dict[Precision, float] | None, mode: str = "accuracy_first", accuracy: dict[Precision, float] | None = None
) -> Policy:
    return Policy(
        accuracy or ACCURACY,
        PolicyConfig(mode=mode, latency_slo_s=0.1),
        clock=lambda: 0.0,
        profile=None if costs is None else flat_profile(costs),
    )


# --- the profile --------------------------------------------------------------------------


def test_batches_stop_where_the_cost_per_image_stops_falling() -> None:
    assert _profile(EIGHT_CHEAPEST).batch_limit == 8
    # Flat past 4 (within the tolerance): the largest size is kept, so fewer batches pay the loop's hand-off.
    flat = {1: 100e-6, 2: 60e-6, 4: 40e-6, 8: 41e-6, 16: 40.5e-6, 32: 40e-6 * (1 + FLAT_TOLERANCE / 2)}
    assert _profile(flat).batch_limit == 32
    assert _profile({1: 1e-4}).batch_limit == 1


def test_live_batches_are_averaged_beside_the_warm_up_figures_which_decide() -> None:
    profile = _profile(EIGHT_CHEAPEST)
    profile.observe(8, 8 * 80e-6, 8 * 90e-6)
    assert profile.live[8] == SizeCost(80e-6, 90e-6, batches=1)
    # Under load the batches in use cost more (the host's contention); the limit and orderings hold.
    for _ in range(30):
        profile.observe(8, 8 * 300e-6, 8 * 300e-6)
    assert profile.live[8].batches == 31 and 250e-6 < profile.live[8].cpu_s < 300e-6
    assert profile.batch_limit == 8 and profile.cpu_per_image() == EIGHT_CHEAPEST[8]
    # A padded partial batch (5 images) mixes two sizes: it is not folded in.
    profile.observe(5, 5 * 1e-6, 5 * 1e-6)
    assert 5 not in profile.live and 5 not in profile.sizes


def test_orderings_need_a_clear_margin_and_every_candidate_measured() -> None:
    profile = flat_profile(INT8_SLOWER)
    both = [Precision.FP32, Precision.INT8]
    assert profile.cheapest(both) is Precision.FP32 and profile.fastest(both) is Precision.FP32
    assert profile.dominated(both, ACCURACY) == {Precision.INT8}
    assert profile.dominated(both, INT8_SLOWER_BUT_MORE_ACCURATE) == set()
    assert profile.dominated(both, {Precision.FP32: 0.98, Precision.INT8: None}) == {Precision.INT8}
    close = flat_profile({Precision.FP32: 1e-4, Precision.INT8: 1.02e-4})
    assert close.cheapest(both) is None and close.dominated(both, ACCURACY) == set()
    assert flat_profile({Precision.FP32: 1e-4}).cheapest(both) is None


def test_the_verdict_compares_the_variants_at_their_batch_limits() -> None:
    assert flat_profile(INT8_SLOWER).verdict() == "on this host int8 costs 2x fp32 per image at batch 32"
    mixed = CostProfile([_profile(EIGHT_CHEAPEST), _profile({1: 100e-6, 32: 38e-6}, Precision.INT8)])
    assert mixed.verdict() == "on this host int8 costs 0.5x fp32 per image at their batch limits (8 and 32)"
    assert flat_profile({Precision.FP32: 1e-4}).verdict() == ""


def test_measure_times_every_variant_at_every_batch_size_of_a_real_model(loaded_model: Any) -> None:
    sizes = allowed_batch_sizes(32)
    profile = measure(loaded_model.runtimes, sizes)
    assert set(profile.variants) == set(loaded_model.runtimes)
    for variant in profile.variants.values():
        assert sorted(variant.sizes) == sizes and not variant.live
        for cost in variant.sizes.values():
            assert 0 < cost.cpu_s < 0.05 and 0 < cost.wall_s < 0.05
            assert cost.cpu_s <= cost.wall_s * 1.5  # one thread: CPU cannot run far ahead of the wall clock


# --- the policy reads it ----------------------------------------------------------------------


def test_with_int8_cheaper_decisions_are_as_before() -> None:
    for costs in (INT8_CHEAPER, None):  # None: no profile, int8 is assumed the cheaper
        assert _policy(costs, "cost_first").choose(_request(), CALM).precision is Precision.INT8
        assert _policy(costs).choose(_request(), CALM).reason == "accuracy_first"
        shed = _policy(costs).choose(_request(), PRESSED)
        assert (shed.precision, shed.reason) == (Precision.INT8, "load_shed")
        near = _policy(costs).choose(_request(), Load(budget=BudgetStatus.NEAR))
        assert (near.precision, near.reason) == (Precision.INT8, "budget_near")


@pytest.mark.parametrize(
    ("mode", "load"),
    [("cost_first", CALM), ("accuracy_first", PRESSED), ("accuracy_first", Load(budget=BudgetStatus.NEAR))],
)
def test_with_int8_slower_and_less_accurate_auto_never_picks_it(mode: str, load: Load) -> None:
    decision = _policy(INT8_SLOWER, mode).choose(_request(), load)
    assert (decision.precision, decision.reason) == (Precision.FP32, "dominates")
    # Asked for explicitly, int8 is still served.
    assert _policy(INT8_SLOWER, mode).choose(_request(precision=Precision.INT8), load).precision is Precision.INT8


def test_with_int8_slower_but_more_accurate_each_rule_takes_the_measured_cheaper_or_faster() -> None:
    accuracy = INT8_SLOWER_BUT_MORE_ACCURATE
    cost_first = _policy(INT8_SLOWER, "cost_first", accuracy).choose(_request(), CALM)
    assert (cost_first.precision, cost_first.reason) == (Precision.FP32, "cost_first")
    shed = _policy(INT8_SLOWER, accuracy=accuracy).choose(_request(), PRESSED)
    assert (shed.precision, shed.reason) == (Precision.FP32, "load_shed")
    near = _policy(INT8_SLOWER, accuracy=accuracy).choose(_request(), Load(budget=BudgetStatus.NEAR))
    assert (near.precision, near.reason) == (Precision.FP32, "budget_near")
    calm = _policy(INT8_SLOWER, accuracy=accuracy).choose(_request(), CALM)
    assert (calm.precision, calm.reason) == (Precision.INT8, "accuracy_first")


def test_held_to_the_objective_auto_moves_to_the_faster_variant() -> None:
    config = PolicyConfig(latency_slo_s=0.1, refuse_over_slo=True)
    # int8 is the more accurate here, and slower: when its queue is long, fp32 (faster, and in time) answers.
    policy = Policy(INT8_SLOWER_BUT_MORE_ACCURATE, config, clock=lambda: 0.0, profile=flat_profile(INT8_SLOWER))
    backed_up = Load(predicted_wait_s={Precision.FP32: 0.0, Precision.INT8: 0.05})
    decision = policy.choose(_request(), backed_up)
    assert (decision.precision, decision.reason) == (Precision.FP32, "load_shed")


def test_pressure_shows_on_the_queue_auto_uses_even_when_that_is_int8() -> None:
    # int8 the more accurate and the slower: AUTO (accuracy_first) sends to int8, whose queue backs up.
    policy = _policy(INT8_SLOWER, accuracy=INT8_SLOWER_BUT_MORE_ACCURATE)
    backed_up = Load(predicted_wait_s={Precision.FP32: 0.0, Precision.INT8: 0.08}, demand_per_s=1000.0)
    decision = policy.choose(_request(), backed_up)
    assert (decision.precision, decision.reason) == (Precision.FP32, "load_shed") and policy.shedding


def test_the_cost_ceiling_is_applied_before_dominated_variants_are_set_aside() -> None:
    # fp32 dominates int8 on this host, but only int8 is predicted under the request's ceiling: it answers.
    load = Load(predicted_cost_per_image_usd={Precision.FP32: 3e-7, Precision.INT8: 1e-7})
    decision = _policy(INT8_SLOWER).choose(_request(max_cost_usd=2e-7), load)
    assert (decision.precision, decision.reason) == (Precision.INT8, "cost_ceiling")


# --- the batcher reads it ---------------------------------------------------------------------


def test_a_profile_where_batch_8_is_cheapest_caps_batches_at_8(loaded_model: Any, holdout: Any) -> None:
    # Ten times the stated costs, so that what the real runtime adds does not change the order.
    spy = CostedRuntime(loaded_model.runtimes[Precision.INT8], lambda size: 10 * EIGHT_CHEAPEST[size])
    images = list(holdout.holdout_images[:25])

    async def scenario() -> list[int]:
        sizes = allowed_batch_sizes(32)
        measured = await asyncio.get_running_loop().run_in_executor(None, measure, {Precision.INT8: spy}, sizes)
        profile = measured.variants[Precision.INT8]
        assert profile.batch_limit == 8
        spy.batches.clear()
        batcher = Batcher(spy, max_batch_size=32, batch_timeout_s=0, max_queue=64, profile=profile)
        await batcher.start()
        spy.gate.clear()
        spy.entered.clear()
        (running,) = batcher.submit(images[:1], deadline=None)
        await asyncio.get_running_loop().run_in_executor(None, spy.entered.wait, 30)
        waiting = batcher.submit(images[1:], deadline=None)
        spy.gate.set()
        answers = [answer for part in await asyncio.gather(running, *waiting) for answer in part]
        await batcher.stop()
        assert batcher.batch_limit == 8
        return [answer.batch_size for answer in answers]

    sizes = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    assert spy.batches == [1, 8, 8, 8]
    assert sizes == [1] + [8] * 24


# --- a served version exports it ----------------------------------------------------------------


def test_a_served_version_reports_its_measured_profile_everywhere(
    server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """GetModelInfo, ListModels, `costserve info` and the metrics show it; the cost ceiling predicts from it at once."""
    from costserve.cli import main as costserve_main

    profile = server.core.default.model.profile
    assert profile is not None and set(profile.variants) == {Precision.FP32, Precision.INT8}
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        # No request priced yet: the ceiling's prediction comes from the profile, so this is refused.
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(
                pb.PredictRequest(
                    images=[pb.Image(encoded=DIGIT_PNG)], precision=pb.PRECISION_FP32, max_cost_usd=1e-15
                ),
                timeout=30,
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # One image computed alone: a live batch of 1 beside the warm-up figures.
        assert Precision.INT8 not in server.core.default.cost_per_image
        predicted = server.core.default.profile_cost_per_image[Precision.INT8]
        one = pb.PredictRequest(images=[pb.Image(encoded=DIGIT_PNG)], precision=pb.PRECISION_INT8)
        priced = stub.Predict(one, timeout=30).cost.usd
        # The first priced answer replaces the profile's prediction (it does not average with it).
        assert server.core.default.cost_per_image[Precision.INT8] == pytest.approx(priced) != predicted
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        listing = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    assert info.cost_verdict == profile.verdict() and info.cost_verdict.startswith("on this host int8 costs ")
    for variant in info.variants:
        measured = profile.variants[PRECISION_FROM_PROTO[variant.precision]]
        assert variant.batch_limit == measured.batch_limit
        assert [cost.batch_size for cost in variant.cost_profile] == allowed_batch_sizes(32)
        assert [cost.cpu_seconds_per_image for cost in variant.cost_profile] == [
            c.cpu_s for c in measured.sizes.values()
        ]
        live = {cost.batch_size: cost.live_batches for cost in variant.cost_profile if cost.live_batches}
        assert live == ({1: 1} if variant.precision == pb.PRECISION_INT8 else {})
        if live:
            assert variant.cost_profile[0].live_cpu_seconds_per_image == measured.live[1].cpu_s > 0
    (model,) = listing.models
    assert model.versions[0].cost_verdict == info.cost_verdict
    for precision, measured in profile.variants.items():
        labels = {"model": "digits", "precision": precision.value}
        assert server.metric("costserve_batch_limit", labels) == measured.batch_limit
        for size, cost in measured.sizes.items():
            series = {**labels, "batch_size": str(size), "source": "warmup"}
            assert server.metric("costserve_profile_cpu_seconds_per_image", series) == pytest.approx(cost.cpu_s)
    live_series = {"precision": "int8", "batch_size": "1", "source": "live"}
    assert server.metric("costserve_profile_cpu_seconds_per_image", live_series) > 0

    assert costserve_main(["--target", server.target, "info"]) == 0
    out = capsys.readouterr().out
    assert "CPU per image on the server's host, in µs, by batch size" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("fp32 ", "int8 "))}
    fp32_row = rows["fp32"][-len(allowed_batch_sizes(32)) :]
    assert sum(cell.startswith("*") for cell in fp32_row) == 1
    assert "  live" in out  # int8's live row: its batch of 1
    assert info.cost_verdict in out
