"""The cost model: prices, utilization, and per-request costs that add up to the bill."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import EXAMPLES, REPO_ROOT, RunningServer
from helpers import FakeClock

from costserve import Client, image_message
from costserve.server.cost import GB, CostMeter, PriceFileError, Prices, UtilizationWindow, load_prices
from costserve.server.domain import CostBreakdown
from costserve.server.machine import MachineState
from costserve.v1 import classifier_pb2 as pb
from costserve.v1 import classifier_pb2_grpc as pb_grpc


def test_the_shipped_price_file_holds_the_defaults() -> None:
    shipped = load_prices(REPO_ROOT / "deploy" / "prices.toml")
    defaults = Prices()
    for name in (
        "vcpu_hour_usd",
        "memory_gb_hour_usd",
        "network_gb_usd",
        "vcpus",
        "memory_gb",
        "window_seconds",
        "min_utilization",
    ):
        assert getattr(shipped, name) == getattr(defaults, name), name
    assert "Google Cloud" in shipped.source and "2026-11-28" in shipped.source


@pytest.mark.parametrize(
    "body, message",
    [
        ("[prices]\nvcpu_hour_usd = -1\n", "vcpu_hour_usd"),
        ("[prices]\nvcpu_hour_usd = 'cheap'\n", "vcpu_hour_usd"),
        ("[provisioned]\nvcpus = 0\n", "above 0"),
        ("[utilization]\nmin_utilization = 0\n", "min_utilization"),
        ("[prices\n", "cannot read"),
    ],
)
def test_a_bad_price_file_is_refused(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(body)
    with pytest.raises(PriceFileError, match=message):
        load_prices(path)


def test_utilization_is_attributed_cpu_over_the_trailing_window() -> None:
    clock = FakeClock()
    window = UtilizationWindow(window_s=10, vcpus=2, clock=clock)
    clock.now += 10
    window.add(4.0)
    assert window.utilization() == pytest.approx(4.0 / (10 * 2))
    clock.now += 5
    window.add(2.0)
    assert window.utilization() == pytest.approx(6.0 / 20)
    clock.now += 6  # the first 4 CPU-seconds left the window
    assert window.utilization() == pytest.approx(2.0 / 20)
    clock.now += 10
    assert window.utilization() == 0.0


def test_charge_follows_the_formula() -> None:
    prices = Prices(
        vcpu_hour_usd=3.6,
        memory_gb_hour_usd=0.36,
        network_gb_usd=2.0,
        vcpus=2,
        memory_gb=4,
        window_seconds=1e9,
        min_utilization=0.01,
    )
    clock = FakeClock()
    meter = CostMeter(prices, clock=clock)
    clock.now += 100  # 100 s of history: R = cpu / (100 s * 2 vCPUs)
    cost = meter.charge(cpu_seconds=50.0, network_bytes=GB // 2)
    utilization = 50.0 / 200.0
    assert cost.utilization == pytest.approx(utilization)
    assert cost.cpu_usd == pytest.approx(3.6 / 3600 * 50.0 / utilization)
    assert cost.memory_gb_seconds == pytest.approx(50.0 * 4 / 2)
    assert cost.memory_usd == pytest.approx(0.36 / 3600 * 100.0 / utilization)
    assert cost.network_usd == pytest.approx(1.0)
    assert cost.usd == pytest.approx(cost.cpu_usd + cost.memory_usd + cost.network_usd)


def test_utilization_below_the_clamp_charges_as_if_at_the_clamp() -> None:
    clock = FakeClock()
    meter = CostMeter(Prices(min_utilization=0.5, window_seconds=1e9), clock=clock)
    clock.now += 1000
    cost = meter.charge(cpu_seconds=0.001, network_bytes=0)
    assert cost.utilization == 0.5
    assert cost.cpu_usd == pytest.approx(Prices().vcpu_hour_usd / 3600 * 0.001 / 0.5)


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(28, 28), dtype=np.uint8)


def test_a_request_that_used_more_cpu_is_charged_more(client: Client) -> None:
    small = client.predict([_pixels(1)], precision="fp32", skip_cache=True)
    large = client.predict([_pixels(seed) for seed in range(2, 66)], precision="fp32", skip_cache=True)
    assert large.cost.cpu_seconds > small.cost.cpu_seconds > 0
    assert large.cost.usd > small.cost.usd > 0
    assert large.cost.network_bytes > small.cost.network_bytes > 0


def test_cache_hits_are_charged_less_than_misses(client: Client) -> None:
    images = [_pixels(seed) for seed in range(100, 132)]
    miss = client.predict(images, precision="int8")
    hit = client.predict(images, precision="int8")
    assert all(p.cache_hit for p in hit.predictions) and not any(p.cache_hit for p in miss.predictions)
    assert hit.cost.cpu_seconds < miss.cost.cpu_seconds
    assert hit.cost.usd < miss.cost.usd


def test_cost_is_in_the_response_the_trailers_and_the_metrics(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        request = pb.PredictRequest(images=[image_message(path) for path in EXAMPLES], precision=pb.PRECISION_INT8)
        response, call = stub.Predict.with_call(request, timeout=30)
        trailers = dict(call.trailing_metadata())
        stream = list(stub.PredictStream(iter([request, request]), timeout=30))
    cost = response.cost
    assert cost.usd == pytest.approx(cost.cpu_usd + cost.memory_usd + cost.network_usd)
    assert float(trailers["x-costserve-cost-usd"]) == cost.usd
    assert cost.network_bytes >= request.ByteSize() + response.ByteSize() - 8
    total = cost.usd + sum(reply.cost.usd for reply in stream)
    charged = sum(
        server.metric("costserve_cost_usd_total", {"resource": resource, "precision": "int8"})
        for resource in ("cpu", "memory", "network")
    )
    assert charged == pytest.approx(total, rel=1e-9)
    assert server.metric("costserve_request_cost_usd_count", {"precision": "int8"}) == 3
    assert server.metric("costserve_cpu_seconds_total", {"precision": "int8", "phase": "inference"}) > 0


def test_metric_counts_equal_what_the_client_sent(server: RunningServer, client: Client) -> None:
    sent = {"fp32": 0, "int8": 0}
    for round_ in range(6):
        precision = "fp32" if round_ % 2 else "int8"
        images = [_pixels(1000 + round_ * 10 + index) for index in range(round_ + 1)]
        client.predict(images, precision=precision)
        sent[precision] += len(images)
    for precision, images in sent.items():
        assert (
            server.metric("costserve_requests_total", {"method": "Predict", "precision": precision, "code": "OK"}) == 3
        )
        assert server.metric("costserve_images_total", {"precision": precision, "cache": "miss"}) == images
    assert server.metric("costserve_cache_misses_total") == sum(sent.values())


@pytest.mark.parametrize("shares", [(1,), (1, 1), (3, 1)], ids=["one-process", "two-workers", "two-workers-uneven"])
@pytest.mark.parametrize("requests_per_s, cpu_per_request_s", [(250.0, 0.004), (40.0, 0.01)])
def test_costs_add_up_to_the_provisioned_bill(
    requests_per_s: float, cpu_per_request_s: float, shares: tuple[int, ...]
) -> None:
    """Over a window of steady traffic, per-request costs sum to the provisioned cost plus network.

    Steady means a constant arrival rate and work per request. The meter runs on a fake
    clock, so the property is checked exactly however busy the host; the server tests
    check that what it charges reaches the responses and the metrics. With ``shares``
    of more than one worker, each worker process has its own meter on one machine's
    shared state, and requests go to them in those proportions.
    """
    prices = Prices(
        vcpu_hour_usd=0.04, memory_gb_hour_usd=0.005, network_gb_usd=0.01, vcpus=2, memory_gb=4,
        window_seconds=3.0, min_utilization=0.01,
    )  # fmt: skip
    clock = FakeClock()
    warm_s, measure_s = 4.0, 8.0
    charged: list[tuple[float, CostBreakdown]] = []
    with _meters(prices, clock, workers=len(shares)) as meters:
        route = [meters[worker] for worker, share in enumerate(shares) for _ in range(share)]
        for sequence in range(int(requests_per_s * (warm_s + measure_s))):
            clock.now = 1000.0 + sequence / requests_per_s
            meter = route[sequence % len(route)]
            charged.append((clock.now, meter.charge(cpu_per_request_s, network_bytes=2_000 + sequence % 7)))
    begin, end = 1000.0 + warm_s, 1000.0 + warm_s + measure_s
    window = [cost for at, cost in charged if begin <= at < end]
    assert all(cost.utilization > prices.min_utilization for cost in window), "utilization fell to the clamp"
    provisioned = prices.provisioned_usd_per_second * (end - begin)
    assert sum(cost.cpu_usd + cost.memory_usd for cost in window) == pytest.approx(provisioned, rel=0.02)
    network = sum(cost.network_usd for cost in window)
    assert network == pytest.approx(sum(cost.network_bytes for cost in window) * prices.network_gb_usd / GB)
    assert sum(cost.usd for cost in window) == pytest.approx(provisioned + network, rel=0.02)
    assert meters[0].provisioned_usd() == pytest.approx(prices.provisioned_usd_per_second * (clock.now - 1000.0))


@contextlib.contextmanager
def _meters(prices: Prices, clock: FakeClock, workers: int) -> Iterator[list[CostMeter]]:
    """``workers`` meters on ``clock``: one on its own, or one per worker slot of a machine's shared state."""
    if workers == 1:
        yield [CostMeter(prices, clock)]
        return
    machine = MachineState.create(workers, [], started=clock())
    attached = [MachineState.attach(machine.name, worker) for worker in range(workers)]
    try:
        yield [CostMeter(prices, clock, worker) for worker in attached]
    finally:
        for state in (*attached, machine):
            state.close()
        machine.unlink()
