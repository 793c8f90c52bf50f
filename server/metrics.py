"""Prometheus metrics of the service, on a registry passed in.

Names start ``costserve_``, use base units, counters end ``_total``; label values
are bounded (method names, precisions, status code names, fixed reasons). Tests
build a fresh ``CollectorRegistry`` and read values with ``get_sample_value``.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

#: Request latency buckets, in seconds (0.5 ms .. 10 s).
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.5, 5.0, 10.0)
#: Batch size buckets, in images.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: Request cost buckets, in USD (1e-10 .. 1e-4: a millionth of a cent to a hundredth).
COST_BUCKETS = tuple(10.0**exponent * mantissa for exponent in range(-10, -4) for mantissa in (1, 2.5, 5)) + (1e-4,)


class _ProvisionedCost(Collector):
    """``costserve_provisioned_cost_usd_total``, read from a function at scrape time."""

    def __init__(self, read: Callable[[], float]) -> None:
        self._read = read

    def collect(self):  # type: ignore[no-untyped-def]
        family = CounterMetricFamily(
            "costserve_provisioned_cost_usd",
            "What the provisioned CPU and memory have cost since the server started, in USD.",
        )
        family.add_metric([], self._read())
        yield family


class ServiceMetrics:
    """Every metric costserve exports, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, process_collector: bool = True) -> None:
        self.registry = registry
        if process_collector:
            ProcessCollector(registry=registry)
        self.requests = Counter(
            "costserve_requests_total",
            "Prediction requests answered, by method, precision that answered (or was asked) and status code.",
            ["method", "precision", "code"],
            registry=registry,
        )
        self.images = Counter(
            "costserve_images_total",
            "Images classified, by precision that answered and whether the cache answered.",
            ["precision", "cache"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "costserve_request_duration_seconds",
            "Time from a request entering the core to its answer, in seconds.",
            ["method", "precision"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_duration = Histogram(
            "costserve_queue_duration_seconds",
            "Time an image waited in the batch queue before its batch started, in seconds.",
            ["precision"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_duration = Histogram(
            "costserve_inference_duration_seconds",
            "Wall time of one runtime call (one batch), in seconds.",
            ["precision"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "costserve_batch_size",
            "Images per runtime call, padding excluded.",
            ["precision"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "costserve_queue_depth", "Images waiting in the batch queue.", ["precision"], registry=registry
        )
        self.cache_hits = Counter("costserve_cache_hits_total", "Cache lookups that found an answer.", registry=registry)
        self.cache_misses = Counter(
            "costserve_cache_misses_total", "Cache lookups that found nothing.", registry=registry
        )
        self.cache_evictions = Counter(
            "costserve_cache_evictions_total", "Entries evicted to make room (least recently used first).", registry=registry
        )
        self.cache_entries = Gauge("costserve_cache_entries", "Entries in the prediction cache.", registry=registry)
        self.rejected = Counter(
            "costserve_rejected_total",
            "Requests that got no answer, by reason "
            "(invalid_input, queue_full, deadline_exceeded, cancelled, unavailable, budget, constraint).",
            ["reason"],
            registry=registry,
        )
        self.model_info = Gauge(
            "costserve_model_info",
            "The model being served (value 1), with its version, precision, format and held-out accuracy.",
            ["name", "version", "precision", "format", "accuracy"],
            registry=registry,
        )

        self.request_cost = Histogram(
            "costserve_request_cost_usd",
            "Cost of one answered request, in USD.",
            ["precision"],
            buckets=COST_BUCKETS,
            registry=registry,
        )
        self.cost = Counter(
            "costserve_cost_usd_total",
            "Cost charged to answered requests, in USD, by resource (cpu, memory, network) and precision.",
            ["resource", "precision"],
            registry=registry,
        )
        self.cpu_seconds = Counter(
            "costserve_cpu_seconds_total",
            "CPU-seconds attributed to answered requests, by precision and phase (inference, handling).",
            ["precision", "phase"],
            registry=registry,
        )
        self.network_bytes = Counter(
            "costserve_network_bytes_total",
            "Bytes of answered requests and their responses, by precision.",
            ["precision"],
            registry=registry,
        )
        self.utilization = Gauge(
            "costserve_utilization",
            "Measured utilization of the provisioned CPU over the pricing window (0..1, before the clamp).",
            registry=registry,
        )
        self.price = Gauge(
            "costserve_price_usd",
            "Prices in force: cpu per vCPU-hour, memory per GB-hour, network per GB, in USD.",
            ["resource"],
            registry=registry,
        )
        self.provisioned = Gauge(
            "costserve_provisioned",
            "Provisioned resources: vcpus, memory_gb.",
            ["resource"],
            registry=registry,
        )

        self.decisions = Counter(
            "costserve_decisions_total",
            "Policy decisions, by precision chosen and reason (requested, cache, accuracy_floor, cost_ceiling, "
            "budget_near, load_shed, deadline, cost_first, accuracy_first).",
            ["precision", "reason"],
            registry=registry,
        )
        self.load_shedding = Gauge(
            "costserve_load_shedding",
            "1 while AUTO traffic is moved to int8 to hold the latency objective, else 0.",
            registry=registry,
        )
        self.tenant_spend = Counter(
            "costserve_tenant_spend_usd_total",
            "Cost charged per tenant, in USD (tenants with a budget by name, everyone else as other).",
            ["tenant"],
            registry=registry,
        )
        self.tenant_budget = Gauge(
            "costserve_tenant_budget_usd",
            "Each configured tenant's budget, in USD per period (hour or day).",
            ["tenant", "period"],
            registry=registry,
        )
        self.budget_rejections = Counter(
            "costserve_budget_rejections_total",
            "Requests refused because their tenant had spent its budget.",
            ["tenant"],
            registry=registry,
        )

    def track_cost(self, provisioned_usd: Callable[[], float], utilization: Callable[[], float]) -> None:
        """Read the provisioned cost and the utilization at scrape time."""
        self.registry.register(_ProvisionedCost(provisioned_usd))
        self.utilization.set_function(utilization)

    def track_queue_depth(self, precision: str, depth: Callable[[], int]) -> None:
        """Read a batcher's queue depth at scrape time."""
        self.queue_depth.labels(precision).set_function(depth)

    def track_cache_entries(self, entries: Callable[[], int]) -> None:
        """Read the cache's size at scrape time."""
        self.cache_entries.set_function(entries)


class PrecisionSeries:
    """The labelled series of one precision, looked up once: ``labels()`` is too slow per request."""

    def __init__(self, metrics: ServiceMetrics, precision: str) -> None:
        self._metrics = metrics
        self._precision = precision
        self._methods: dict[str, tuple[Counter, Histogram]] = {}
        self.images_hit = metrics.images.labels(precision, "hit")
        self.images_miss = metrics.images.labels(precision, "miss")
        self.cost_cpu = metrics.cost.labels("cpu", precision)
        self.cost_memory = metrics.cost.labels("memory", precision)
        self.cost_network = metrics.cost.labels("network", precision)
        self.cpu_handling = metrics.cpu_seconds.labels(precision, "handling")
        self.cpu_inference = metrics.cpu_seconds.labels(precision, "inference")
        self.network_bytes = metrics.network_bytes.labels(precision)
        self.request_cost = metrics.request_cost.labels(precision)

    def method(self, method: str) -> tuple[Counter, Histogram]:
        """The answered-requests counter and the duration histogram of ``method``."""
        series = self._methods.get(method)
        if series is None:
            series = self._methods[method] = (
                self._metrics.requests.labels(method, self._precision, "OK"),
                self._metrics.request_duration.labels(method, self._precision),
            )
        return series
