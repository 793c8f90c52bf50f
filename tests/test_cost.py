"""The cost model: prices, utilization, and per-request costs that add up to the bill."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import EXAMPLES, REPO_ROOT, RunningServer, ServerProcess
from costserve import Client, image_message
from costserve.server.cost import GB, CostMeter, PriceFileError, Prices, UtilizationWindow, load_prices
from costserve.v1 import classifier_pb2 as pb
from costserve.v1 import classifier_pb2_grpc as pb_grpc


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_shipped_price_file_holds_the_defaults() -> None:
    shipped = load_prices(REPO_ROOT / "deploy" / "prices.toml")
    defaults = Prices()
    for name in ("vcpu_hour_usd", "memory_gb_hour_usd", "network_gb_usd", "vcpus", "memory_gb", "window_seconds", "min_utilization"):
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
    prices = Prices(vcpu_hour_usd=3.6, memory_gb_hour_usd=0.36, network_gb_usd=2.0, vcpus=2, memory_gb=4, window_seconds=1e9, min_utilization=0.01)
    meter = CostMeter(prices)
    meter.window._started -= 100  # 100 s of history: R = cpu / (100 s * 2 vCPUs)
    cost = meter.charge(cpu_seconds=50.0, network_bytes=GB // 2)
    utilization = 50.0 / 200.0
    assert cost.utilization == pytest.approx(utilization)
    assert cost.cpu_usd == pytest.approx(3.6 / 3600 * 50.0 / utilization)
    assert cost.memory_gb_seconds == pytest.approx(50.0 * 4 / 2)
    assert cost.memory_usd == pytest.approx(0.36 / 3600 * 100.0 / utilization)
    assert cost.network_usd == pytest.approx(1.0)
    assert cost.usd == pytest.approx(cost.cpu_usd + cost.memory_usd + cost.network_usd)


def test_utilization_below_the_clamp_charges_as_if_at_the_clamp() -> None:
    meter = CostMeter(Prices(min_utilization=0.5, window_seconds=1e9))
    meter.window._started -= 1000
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
        assert server.metric("costserve_requests_total", {"method": "Predict", "precision": precision, "code": "OK"}) == 3
        assert server.metric("costserve_images_total", {"precision": precision, "cache": "miss"}) == images
    assert server.metric("costserve_cache_misses_total") == sum(sent.values())


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_costs_add_up_to_the_provisioned_bill(model_dir: Path, tmp_path: Path) -> None:
    """Over a window of steady traffic, per-request costs sum to provisioned cost plus network (within 5%).

    Steady means a constant arrival rate (open loop, below capacity): the work per second
    then does not depend on what else the machine is doing, as a closed loop's would.
    """
    window_s, warm_s, measure_s, rate = 3.0, 4.0, 8.0, 250.0
    prices_file = tmp_path / "prices.toml"
    prices_file.write_text(
        "[prices]\nvcpu_hour_usd = 0.04\nmemory_gb_hour_usd = 0.005\nnetwork_gb_usd = 0.01\n"
        f"[provisioned]\nvcpus = 2\nmemory_gb = 4\n[utilization]\nwindow_seconds = {window_s}\nmin_utilization = 0.01\n"
    )
    prices = load_prices(prices_file)
    server = ServerProcess(model_dir, "--metrics-port", "0", "--prices", str(prices_file))
    try:
        assert server.serving.wait(120), server.log
        completed: list[tuple[float, pb.Cost]] = []
        failed: list[BaseException] = []
        lock = threading.Lock()

        def record(future: grpc.Future) -> None:
            at = time.monotonic()
            with lock:
                if future.exception() is None:
                    completed.append((at, future.result().cost))
                else:
                    failed.append(future.exception())

        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            started = time.monotonic()
            stop_at = started + warm_s + measure_s
            calls = []
            for sequence in range(int(rate * (warm_s + measure_s))):
                send_at = started + sequence / rate
                if (pause := send_at - time.monotonic()) > 0:
                    time.sleep(pause)
                request = pb.PredictRequest(
                    images=[image_message(_pixels(10_000_000 + sequence))],
                    precision=pb.PRECISION_FP32 if sequence % 3 else pb.PRECISION_INT8,
                    skip_cache=True,
                )
                call = stub.Predict.future(request, timeout=30)
                call.add_done_callback(record)
                calls.append(call)
            for call in calls:
                call.exception(timeout=60)
        assert not failed, failed[:3]
        assert time.monotonic() - stop_at < 2.0, "the generator fell behind its schedule"
        begin, end = started + warm_s, started + warm_s + measure_s
        window = [cost for at, cost in completed if begin <= at < end]
        assert len(window) > 100, f"too little traffic to measure: {len(window)} requests"
        assert all(cost.utilization > prices.min_utilization for cost in window), "utilization fell to the clamp"
        charged_provisioned = sum(cost.cpu_usd + cost.memory_usd for cost in window)
        provisioned = prices.provisioned_usd_per_second * (end - begin)
        assert charged_provisioned == pytest.approx(provisioned, rel=0.05)
        network = sum(cost.network_usd for cost in window)
        assert network == pytest.approx(sum(cost.network_bytes for cost in window) * prices.network_gb_usd / GB)
        assert sum(cost.usd for cost in window) == pytest.approx(provisioned + network, rel=0.05)

        scraped = _scrape(server.metrics_port)
        assert scraped[("costserve_provisioned_cost_usd_total", ())] > provisioned
        charged_total = sum(value for (name, _), value in scraped.items() if name == "costserve_cost_usd_total")
        assert charged_total == pytest.approx(sum(cost.usd for _, cost in completed), rel=1e-6)
    finally:
        server.stop()
