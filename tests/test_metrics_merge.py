"""The machine's /metrics under --workers (costserve.server.metrics_merge), against real worker endpoints.

Each worker is a real ``start_metrics_server`` on 127.0.0.1 port 0 serving a real
``ServiceMetrics`` on its own registry; the merging collector scrapes them over HTTP.
Pids are made up: the collector only compares them.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, make_wsgi_app
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from costserve.server.metrics import ServiceMetrics
from costserve.server.metrics_http import MetricsHttpServer, start_metrics_server
from costserve.server.metrics_merge import MERGE_RULES, WorkerEndpoint, WorkerMetrics

HOST = "127.0.0.1"
PREDICT = ("digits", "v1", "Predict", "fp32")
OK = {"model": "digits", "protocol": "v1", "method": "Predict", "precision": "fp32", "code": "OK"}
DURATION = {"model": "digits", "protocol": "v1", "method": "Predict", "precision": "fp32"}

#: A sample's name and label pairs -> its value.
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Worker:
    """A worker's metrics as a worker process holds them, served on a real endpoint."""

    def __init__(self, index: int, pid: int, utilization: float = 0.5, provisioned_usd: float = 100.0) -> None:
        self.registry = CollectorRegistry()
        self.metrics = ServiceMetrics(self.registry)
        self.metrics.track_cost(lambda: provisioned_usd, lambda: utilization)
        self.server: MetricsHttpServer = start_metrics_server(self.registry, HOST, 0)
        self.endpoint = WorkerEndpoint(index, pid, self.server.port)


@pytest.fixture
def start_worker() -> Iterator[Callable[..., Worker]]:
    """Start workers for the test; every endpoint is closed at its end."""
    started: list[Worker] = []

    def start(index: int, pid: int, **options: Any) -> Worker:
        worker = Worker(index, pid, **options)
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.server.close()


def _supervisor(
    endpoints: list[WorkerEndpoint], provisioned_usd: Callable[[], float] | None = None, timeout_s: float = 2.0
) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(WorkerMetrics(lambda: list(endpoints), timeout_s=timeout_s, provisioned_usd=provisioned_usd))
    return registry


def _scrape(registry: CollectorRegistry) -> Samples:
    """Render ``registry`` as Prometheus text and parse it back, as Prometheus would read it."""
    samples: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"{key} exposed twice"
            samples[key] = sample.value
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for sample_name, labels in samples if sample_name == name]


def _two_workers_with_traffic(start_worker: Callable[..., Worker]) -> list[Worker]:
    first, second = start_worker(0, 1000), start_worker(1, 1001)
    first.metrics.requests.labels(*PREDICT, "OK").inc(3)
    second.metrics.requests.labels(*PREDICT, "OK").inc(4)
    second.metrics.requests.labels(*PREDICT, "UNAVAILABLE").inc(2)
    for value in (0.0007, 0.003):
        first.metrics.request_duration.labels(*PREDICT).observe(value)
    second.metrics.request_duration.labels(*PREDICT).observe(0.003)
    first.metrics.cache_hits.inc(5)
    second.metrics.cache_hits.inc(6)
    return [first, second]


def test_counters_and_histograms_add_up_over_workers(start_worker: Callable[..., Worker]) -> None:
    workers = _two_workers_with_traffic(start_worker)
    samples = _scrape(_supervisor([worker.endpoint for worker in workers]))

    assert _value(samples, "costserve_requests_total", **OK) == 7
    assert _value(samples, "costserve_requests_total", **{**OK, "code": "UNAVAILABLE"}) == 2
    assert _value(samples, "costserve_cache_hits_total") == 11
    bucket = "costserve_request_duration_seconds_bucket"
    assert _value(samples, bucket, **DURATION, le="0.0005") == 0
    assert _value(samples, bucket, **DURATION, le="0.001") == 1
    assert _value(samples, bucket, **DURATION, le="0.004") == 3
    assert _value(samples, bucket, **DURATION, le="+Inf") == 3
    assert _value(samples, "costserve_request_duration_seconds_count", **DURATION) == 3
    assert _value(samples, "costserve_request_duration_seconds_sum", **DURATION) == pytest.approx(0.0067)
    assert not any("worker" in labels for labels in _series(samples, "costserve_requests_total"))


def test_machine_wide_gauges_appear_once_from_the_lowest_index(start_worker: Callable[..., Worker]) -> None:
    workers = [start_worker(1, 1001, utilization=0.25), start_worker(0, 1000, utilization=0.5)]
    for worker, price in zip(workers, (0.05, 0.04)):
        worker.metrics.price.labels("cpu").set(price)
        worker.metrics.model_info.labels("digits", "1", "fp32", "savedmodel", "0.98").set(1)
        worker.metrics.model_versions.labels("digits", "available").set(1)
    samples = _scrape(_supervisor([worker.endpoint for worker in workers]))

    assert _value(samples, "costserve_utilization") == 0.5
    assert _value(samples, "costserve_price_usd", resource="cpu") == 0.04
    assert _series(samples, "costserve_model_info") == [
        {"name": "digits", "version": "1", "precision": "fp32", "format": "savedmodel", "accuracy": "0.98"}
    ]
    assert _value(samples, "costserve_model_versions", model="digits", state="available") == 1


def test_gauges_of_each_worker_carry_its_index(start_worker: Callable[..., Worker]) -> None:
    first, second = start_worker(0, 1000), start_worker(1, 1001)
    first.metrics.track_queue_depth("digits", "fp32", lambda: 3)
    second.metrics.track_queue_depth("digits", "fp32", lambda: 5)
    second.metrics.cache_bytes.set(5000)
    samples = _scrape(_supervisor([first.endpoint, second.endpoint]))

    assert _value(samples, "costserve_queue_depth", model="digits", precision="fp32", worker="0") == 3
    assert _value(samples, "costserve_queue_depth", model="digits", precision="fp32", worker="1") == 5
    assert _value(samples, "costserve_cache_bytes", worker="1") == 5000
    for name in ("costserve_event_loop_lag_seconds", "process_resident_memory_bytes", "process_cpu_seconds_total"):
        assert sorted(labels["worker"] for labels in _series(samples, name)) == ["0", "1"], name


def test_provisioned_cost_is_the_supervisors_alone(start_worker: Callable[..., Worker]) -> None:
    endpoints = [start_worker(0, 1000, provisioned_usd=100.0).endpoint, start_worker(1, 1001).endpoint]

    samples = _scrape(_supervisor(endpoints, provisioned_usd=lambda: 7.5))

    assert _value(samples, "costserve_provisioned_cost_usd_total") == 7.5
    assert _series(_scrape(_supervisor(endpoints)), "costserve_provisioned_cost_usd_total") == []


def test_load_failures_count_each_version_once(start_worker: Callable[..., Worker]) -> None:
    workers = [start_worker(0, 1000), start_worker(1, 1001)]
    for worker in workers:
        worker.metrics.model_load_failures.labels("broken").inc()  # every worker fails the same version
    workers[1].metrics.model_load_failures.labels("broken").inc()
    samples = _scrape(_supervisor([worker.endpoint for worker in workers]))

    assert _value(samples, "costserve_model_load_failures_total", model="broken") == 2
    assert not any(name.endswith("_created") for name, _ in samples)


def test_metrics_not_in_the_table_sum_if_counters_and_stay_per_worker_if_gauges(
    start_worker: Callable[..., Worker],
) -> None:
    workers = [start_worker(0, 1000), start_worker(1, 1001)]
    for worker, value in zip(workers, (2, 3)):
        Counter("costserve_new_things", "Things.", registry=worker.registry).inc(value)
        Gauge("costserve_new_level", "A level.", registry=worker.registry).set(value)
    samples = _scrape(_supervisor([worker.endpoint for worker in workers]))

    assert "costserve_new_things_total" not in MERGE_RULES and "costserve_new_level" not in MERGE_RULES
    assert _value(samples, "costserve_new_things_total") == 5
    assert _value(samples, "costserve_new_level", worker="0") == 2
    assert _value(samples, "costserve_new_level", worker="1") == 3
    assert _value(samples, "costserve_new_level") is None


def test_a_worker_that_does_not_answer_is_skipped_and_counted(start_worker: Callable[..., Worker]) -> None:
    workers = _two_workers_with_traffic(start_worker)
    workers[1].metrics.cache_bytes.set(1234)
    registry = _supervisor([worker.endpoint for worker in workers])
    before = _scrape(registry)
    assert _value(before, "costserve_worker_scrape_failures_total", worker="1") == 0

    workers[1].server.close()
    after = _scrape(registry)

    assert _value(after, "costserve_worker_scrape_failures_total", worker="1") == 1
    assert _value(after, "costserve_worker_scrape_failures_total", worker="0") == 0
    assert _value(after, "costserve_cache_bytes", worker="1") is None
    assert _value(after, "costserve_cache_bytes", worker="0") == 0
    # Its counters stand at their last scrape's values rather than drop out of the sums.
    assert _value(after, "costserve_requests_total", **OK) == 7
    assert _value(after, "costserve_request_duration_seconds_count", **DURATION) == 3


def test_a_worker_that_accepts_but_never_answers_is_skipped(start_worker: Callable[..., Worker]) -> None:
    answering = start_worker(0, 1000)
    answering.metrics.cache_hits.inc(2)
    with socket.create_server((HOST, 0)) as silent:  # listens, never accepts: the request is never read
        stuck = WorkerEndpoint(1, 1001, silent.getsockname()[1])
        samples = _scrape(_supervisor([answering.endpoint, stuck], timeout_s=0.2))

    assert _value(samples, "costserve_worker_scrape_failures_total", worker="1") == 1
    assert _value(samples, "costserve_cache_hits_total") == 2


@pytest.mark.parametrize("unlisted_first", [True, False], ids=["unlisted-then-restarted", "pid-replaced"])
def test_a_restarted_worker_does_not_look_like_a_counter_reset(
    start_worker: Callable[..., Worker], unlisted_first: bool
) -> None:
    workers = _two_workers_with_traffic(start_worker)
    endpoints = [worker.endpoint for worker in workers]
    registry = _supervisor(endpoints)
    history = [_scrape(registry)]

    workers[1].server.close()  # crashed ...
    history.append(_scrape(registry))
    del endpoints[1]
    if unlisted_first:  # ... noticed by the supervisor before its restart ...
        history.append(_scrape(registry))
    restarted = start_worker(1, 2001)  # ... and started again, from zero
    endpoints.append(restarted.endpoint)
    history.append(_scrape(registry))
    restarted.metrics.requests.labels(*PREDICT, "OK").inc(1)
    restarted.metrics.request_duration.labels(*PREDICT).observe(0.02)
    history.append(_scrape(registry))

    assert _value(history[-1], "costserve_requests_total", **OK) == 8
    assert _value(history[-1], "costserve_requests_total", **{**OK, "code": "UNAVAILABLE"}) == 2
    assert _value(history[-1], "costserve_request_duration_seconds_count", **DURATION) == 4
    assert _value(history[-1], "costserve_cache_hits_total") == 11
    for earlier, later in zip(history, history[1:]):
        for key, value in _machine_cumulative(earlier).items():
            assert later[key] >= value, key


def _machine_cumulative(samples: Samples) -> Samples:
    """The summed counter and histogram samples: those without a worker label."""
    return {
        key: value
        for key, value in samples.items()
        if key[0].endswith(("_total", "_bucket", "_sum", "_count")) and "worker" not in dict(key[1])
    }


@pytest.mark.parametrize("accept", ["text/plain", "application/openmetrics-text; version=1.0.0"])
def test_the_merged_exposition_parses_in_both_formats(start_worker: Callable[..., Worker], accept: str) -> None:
    workers = _two_workers_with_traffic(start_worker)
    workers[0].metrics.model_load_failures.labels("broken").inc()
    app = make_wsgi_app(_supervisor([worker.endpoint for worker in workers], provisioned_usd=lambda: 1.0))
    answer: list[str] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": "", "HTTP_ACCEPT": accept}
    body = b"".join(app(environ, lambda status, headers, exc_info=None: answer.append(status))).decode()

    assert answer == ["200 OK"]
    parse = parse_openmetrics if accept.startswith("application/openmetrics-text") else text_string_to_metric_families
    families = {family.name: family for family in parse(body)}
    requests = families["costserve_requests"]
    assert requests.type == "counter"
    assert {sample.value for sample in requests.samples if sample.labels == OK} == {7}
    assert families["costserve_request_duration_seconds"].type == "histogram"
    assert families["costserve_utilization"].documentation.startswith("Measured utilization")


def test_the_name_filter_keeps_the_named_merged_series(start_worker: Callable[..., Worker]) -> None:
    workers = _two_workers_with_traffic(start_worker)
    registry = CollectorRegistry(support_collectors_without_names=True)
    registry.register(WorkerMetrics(lambda: [worker.endpoint for worker in workers]))
    filtered = generate_latest(registry.restricted_registry(["costserve_cache_hits_total"])).decode()

    assert [family.name for family in text_string_to_metric_families(filtered)] == ["costserve_cache_hits"]
    assert "costserve_cache_hits_total 11.0" in filtered
