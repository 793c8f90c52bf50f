"""Cost-aware serving end to end: reasons in responses and metrics, constraints, load shedding, budgets."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import RunningServer
from helpers import INT8_CHEAPER, INT8_SLOWER, FakeClock, SpyRuntime, state_costs

from costserve import Client, image_message
from costserve.server.budgets import period_start
from costserve.server.domain import Precision
from costserve.server.repository.store import LoadedModel
from costserve.v1 import classifier_pb2 as pb
from costserve.v1 import classifier_pb2_grpc as pb_grpc


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(28, 28), dtype=np.uint8)


def _request(seed: int, precision: int = pb.PRECISION_AUTO, **fields: Any) -> pb.PredictRequest:
    return pb.PredictRequest(images=[image_message(_pixels(seed))], precision=precision, **fields)


def _stub(server: RunningServer) -> tuple[grpc.Channel, pb_grpc.ClassifierStub]:
    channel = grpc.insecure_channel(server.target)
    return channel, pb_grpc.ClassifierStub(channel)


def _decisions(server: RunningServer, precision: str, reason: str) -> float:
    return server.metric("costserve_decisions_total", {"precision": precision, "reason": reason})


def test_reason_is_in_the_response_and_counted(server: RunningServer) -> None:
    state_costs(server, INT8_CHEAPER)
    channel, stub = _stub(server)
    with channel:
        auto = stub.Predict(_request(1), timeout=30)
        assert auto.decision_reason == "accuracy_first" and auto.predictions[0].precision == pb.PRECISION_FP32
        explicit = stub.Predict(_request(2, pb.PRECISION_INT8), timeout=30)
        assert explicit.decision_reason == "requested" and explicit.predictions[0].precision == pb.PRECISION_INT8
        # AUTO asks the cache first, under any variant meeting its floor: image 2 is cached as int8.
        cached = stub.Predict(_request(2), timeout=30)
        assert cached.decision_reason == "cache"
        assert cached.predictions[0].cache_hit and cached.predictions[0].precision == pb.PRECISION_INT8
        assert list(cached.predictions[0].probabilities) == list(explicit.predictions[0].probabilities)
    assert _decisions(server, "fp32", "accuracy_first") == 1
    assert _decisions(server, "int8", "requested") == 1
    assert _decisions(server, "int8", "cache") == 1
    assert _decisions(server, "fp32", "load_shed") == 0  # series exist before traffic


def test_cost_first_answers_auto_with_the_variant_cheaper_on_the_host(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(policy="cost_first")
    state_costs(server, INT8_CHEAPER)
    channel, stub = _stub(server)
    with channel:
        reply = stub.Predict(_request(3), timeout=30)
        assert reply.decision_reason == "cost_first" and reply.predictions[0].precision == pb.PRECISION_INT8
        # On a host where int8 is slower, and no more accurate, AUTO never picks it.
        state_costs(server, INT8_SLOWER)
        reply = stub.Predict(_request(4), timeout=30)
        assert reply.decision_reason == "dominates" and reply.predictions[0].precision == pb.PRECISION_FP32


def test_accuracy_floor_is_honoured_or_refused(
    start_server: Callable[..., RunningServer], loaded_model: LoadedModel
) -> None:
    # The trained variants score alike on the held-out digits; state a gap so the floor can fall inside it.
    metadata = loaded_model.metadata
    variants = {
        "fp32": dataclasses.replace(metadata.variants["fp32"], accuracy=0.98),
        "int8": dataclasses.replace(metadata.variants["int8"], accuracy=0.96),
    }
    model = dataclasses.replace(loaded_model, metadata=dataclasses.replace(metadata, variants=variants))
    server = start_server(model=model, policy="cost_first")
    state_costs(server, INT8_CHEAPER)
    with Client(server.target, timeout=30) as client:
        assert client.predict([_pixels(4)]).decision_reason == "cost_first"
        reply = client.predict([_pixels(5)], min_accuracy=0.97)
        assert reply.decision_reason == "accuracy_floor" and reply.predictions[0].precision == pb.PRECISION_FP32
        assert client.predict([_pixels(6)], precision="fp32", min_accuracy=0.98).decision_reason == "requested"
        with pytest.raises(grpc.RpcError) as error:
            client.predict([_pixels(7)], precision="int8", min_accuracy=0.97)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "int8 has held-out accuracy 0.9600, below the request's min_accuracy 0.9700" in error.value.details()
        with pytest.raises(grpc.RpcError) as error:
            client.predict([_pixels(8)], min_accuracy=0.99)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no variant reaches min_accuracy 0.9900" in error.value.details()
        with pytest.raises(grpc.RpcError) as error:
            client.predict([_pixels(9)], min_accuracy=1.5)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert server.metric("costserve_rejected_total", {"reason": "constraint"}) == 2
    assert server.metric("costserve_rejected_total", {"reason": "invalid_input"}) == 1


def test_cost_ceiling_refuses_an_explicit_precision_predicted_above_it(server: RunningServer) -> None:
    with Client(server.target, timeout=30) as client:
        for seed in range(10, 15):  # recent costs per variant: the ceiling's prediction
            client.predict([_pixels(seed)], precision="fp32", skip_cache=True)
            client.predict([_pixels(seed)], precision="int8", skip_cache=True)
        with pytest.raises(grpc.RpcError) as error:
            client.predict([_pixels(20)], precision="fp32", max_cost_usd=1e-15)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "above its max_cost_usd" in error.value.details()
        with pytest.raises(grpc.RpcError) as error:
            client.predict([_pixels(21)], max_cost_usd=1e-15)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        generous = client.predict([_pixels(22)], precision="fp32", max_cost_usd=1.0)
        assert generous.decision_reason == "requested" and generous.cost.usd < 1.0


def test_a_backed_up_fp32_queue_sheds_auto_to_int8_until_load_stays_low(
    start_server: Callable[..., RunningServer], loaded_model: LoadedModel
) -> None:
    spies = {precision: SpyRuntime(runtime) for precision, runtime in loaded_model.runtimes.items()}
    server = start_server(
        model=dataclasses.replace(loaded_model, runtimes=dict(spies)),
        latency_slo_ms=1.0,
        max_batch_size=1,
        cache_size=0,
    )
    state_costs(server, INT8_CHEAPER)
    fp32 = spies[Precision.FP32]
    # The demand window and the policy's hold run on the core's clock, which the test drives.
    clock = FakeClock()
    server.core.monitor.clock = clock
    channel, stub = _stub(server)
    with channel:
        stub.Predict(_request(30, pb.PRECISION_FP32), timeout=30)  # a batch time to predict waits from
        fp32.gate.clear()
        fp32.entered.clear()
        held = [stub.Predict.future(_request(31 + index, pb.PRECISION_FP32), timeout=60) for index in range(5)]
        assert fp32.entered.wait(30)
        deadline = time.monotonic() + 30
        while server.core.batchers[Precision.FP32].queue_depth < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        clock.advance(0.01)  # a fresh measurement of the load
        shed = stub.Predict(_request(40), timeout=30)
        assert shed.decision_reason == "load_shed" and shed.predictions[0].precision == pb.PRECISION_INT8
        assert server.metric("costserve_load_shedding") == 1
        fp32.gate.set()
        for future in held:
            future.result()
        # Load has fallen: the queue is empty and, a second later, so is the demand window.
        # Shedding ends only once that lasted the hold time.
        hold_s = server.core.policy.config.hold_s
        clock.advance(1.1)
        assert stub.Predict(_request(41), timeout=30).decision_reason == "load_shed"  # calm starts
        clock.advance(hold_s - 0.1)
        assert stub.Predict(_request(42), timeout=30).decision_reason == "load_shed"
        clock.advance(0.1)
        back = stub.Predict(_request(43), timeout=30)
        assert back.decision_reason == "accuracy_first" and back.predictions[0].precision == pb.PRECISION_FP32
        assert server.metric("costserve_load_shedding") == 0
    assert _decisions(server, "int8", "load_shed") == 3


def test_over_slo_refuse_refuses_auto_at_once_when_every_variant_is_backed_up(
    start_server: Callable[..., RunningServer], loaded_model: LoadedModel
) -> None:
    spies = {precision: SpyRuntime(runtime) for precision, runtime in loaded_model.runtimes.items()}
    server = start_server(
        model=dataclasses.replace(loaded_model, runtimes=dict(spies)),
        latency_slo_ms=0.01,  # any queued image is predicted past a quarter of it
        over_slo="refuse",
        max_batch_size=1,
        cache_size=0,
    )
    state_costs(server, INT8_CHEAPER)
    channel, stub = _stub(server)
    with channel:
        # A fresh, idle server serves AUTO: start-up's own stalls do not count as load.
        assert stub.Predict(_request(49), timeout=30).predictions
        for seed, precision in ((50, pb.PRECISION_FP32), (51, pb.PRECISION_INT8)):
            stub.Predict(_request(seed, precision), timeout=30)  # batch times to predict waits from
        held = []
        for spy, precision in ((spies[Precision.FP32], pb.PRECISION_FP32), (spies[Precision.INT8], pb.PRECISION_INT8)):
            spy.gate.clear()
            spy.entered.clear()
            held += [
                stub.Predict.future(_request(60 + index + 10 * precision, precision), timeout=60) for index in range(3)
            ]
            assert spy.entered.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and min(b.queue_depth for b in server.core.batchers.values()) < 2:
            time.sleep(0.01)

        # Refused at once, not after the queue: both runtimes are still held.
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(_request(80), timeout=30)
        assert all(not spy.gate.is_set() for spy in spies.values())
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "latency objective" in refused.value.details()
        # An explicit precision is not held to the objective: it queues and is answered.
        explicit = stub.Predict.future(_request(81, pb.PRECISION_INT8), timeout=60)
        for spy in spies.values():
            spy.gate.set()
        assert all(future.result().predictions for future in [*held, explicit])
    assert server.metric("costserve_rejected_total", {"reason": "over_objective"}) == 1


def test_budget_degrades_then_refuses_then_resets(start_budgeted_server: Callable[..., RunningServer]) -> None:
    server = start_budgeted_server(
        "near_fraction = 0.5\n[tenants.acme]\nusd_per_hour = 1e-06\n[tenants.globex]\nusd_per_hour = 1.0\n"
    )
    state_costs(server, INT8_CHEAPER)
    reasons: list[str] = []
    spent: list[float] = []
    with Client(server.target, timeout=30) as client:
        for seed in range(1000, 2000):
            try:
                reply = client.predict([_pixels(seed)], skip_cache=True, tenant="acme")
            except grpc.RpcError as error:
                refusal = error
                break
            reasons.append(reply.decision_reason)
            spent.append(reply.cost.usd)
        else:
            pytest.fail("the tenant was never refused")
        assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert re.search(
            r"tenant 'acme' has spent \$[0-9.e-]+ of its \$1e-06 per-hour budget; it resets at ", refusal.details()
        )
        # Refused on the first request after crossing: spend before the last answer was under the budget.
        assert sum(spent) >= 1e-6 > sum(spent[:-1])
        assert reasons[0] == "accuracy_first" and "budget_near" in reasons
        assert reasons.index("budget_near") > 0 and set(reasons[reasons.index("budget_near") :]) == {"budget_near"}
        # Still refused, also for an explicit precision, while other tenants are served as usual.
        with pytest.raises(grpc.RpcError) as error:
            client.predict([_pixels(1)], precision="int8", tenant="acme")
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for tenant in ("globex", "someone", None):
            assert client.predict([_pixels(2)], skip_cache=True, tenant=tenant).decision_reason == "accuracy_first"
        # The next hour starts: acme is served again.
        ledger = server.core.ledger
        next_hour = period_start(time.time(), "hour") + 3600
        ledger.clock = lambda: next_hour
        assert client.predict([_pixels(3)], skip_cache=True, tenant="acme").decision_reason == "accuracy_first"
    assert server.metric("costserve_budget_rejections_total", {"tenant": "acme"}) == 2
    assert server.metric("costserve_budget_rejections_total", {"tenant": "globex"}) == 0
    assert server.metric("costserve_rejected_total", {"reason": "budget"}) == 2
    assert server.metric("costserve_tenant_budget_usd", {"tenant": "acme", "period": "hour"}) == 1e-6
    assert server.metric("costserve_tenant_spend_usd_total", {"tenant": "acme"}) == pytest.approx(
        sum(spent) + ledger.state("acme").spent_usd
    )
    assert server.metric("costserve_tenant_spend_usd_total", {"tenant": "other"}) > 0
    assert server.metric("costserve_tenant_spend_usd_total", {"tenant": "globex"}) > 0
