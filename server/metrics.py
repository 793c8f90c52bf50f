"""Prometheus metrics of the service, on a registry passed in.

Names start ``costserve_``, use base units, counters end ``_total``; label values
are bounded (model names of the repository, method names, precisions, status code
names, fixed reasons). Tests
build a fresh ``CollectorRegistry`` and read values with ``get_sample_value``.

Counters and histograms that change per request or per batch are
:class:`LoopCounter` and :class:`LoopHistogram` series: plain numbers updated
without a lock, because only the event-loop thread writes them, and turned into
Prometheus families when ``/metrics`` is scraped. A ``prometheus_client`` counter
takes a lock and checks its state on every ``inc``, about 2 µs; with a dozen
updates per request that was a tenth of a cache hit's time. Gauges stay
``prometheus_client`` gauges (set rarely, or read at scrape time).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from costserve.server.errors import CostserveError

if TYPE_CHECKING:  # read at scrape time only
    from costserve.server.profile import VariantProfile

#: Label values of ``costserve_rejected_total``: every :attr:`CostserveError.reason`, and cancelled.
REJECTION_REASONS = (
    "invalid_input",
    "malformed",
    "server_busy",
    "queue_full",
    "decode_queue_full",
    "over_objective",
    "deadline_exceeded",
    "cancelled",
    "unavailable",
    "budget",
    "constraint",
    "not_found",
    "unauthenticated",
    "permission_denied",
)
#: Request latency buckets, in seconds (0.5 ms .. 10 s).
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.5, 5.0, 10.0)
#: Batch size buckets, in images.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: Request cost buckets, in USD (1e-10 .. 1e-4: a millionth of a cent to a hundredth).
COST_BUCKETS = tuple(10.0**exponent * mantissa for exponent in range(-10, -4) for mantissa in (1, 2.5, 5)) + (1e-4,)


class LoopCounter:
    """One counter series; written only from the event-loop thread, read at scrape time."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (0 or more)."""
        self.value += amount


class LoopHistogram:
    """One histogram series; written only from the event-loop thread, read at scrape time."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        #: Observations per bucket (not cumulative); the last bucket is +Inf.
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """Count ``count`` observations of ``value``."""
        self.counts[bisect_left(self.bounds, value)] += count
        self.sum += value * count


#: The series type of a :class:`LoopFamily`.
SeriesT = TypeVar("SeriesT", LoopCounter, LoopHistogram)


class LoopFamily(ABC, Generic[SeriesT]):
    """A labelled family of series: a :class:`CounterFamily` or a :class:`HistogramFamily`.

    ``labels(*values)`` returns the series, creating it on first use; callers on the
    hot path keep the series rather than look it up per request.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], SeriesT] = {}

    def labels(self, *values: str) -> SeriesT:
        """The series with these label values (in ``labelnames`` order)."""
        series = self._series.get(values)
        if series is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            series = self._series[values] = self._new_series()
        return series

    @abstractmethod
    def _new_series(self) -> SeriesT:
        """An empty series of this family."""

    @abstractmethod
    def family(self) -> Metric:
        """The family as ``prometheus_client`` exposes it, read now."""


class CounterFamily(LoopFamily[LoopCounter]):
    """A labelled family of :class:`LoopCounter` series."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        self._unlabelled = self.labels() if not self.labelnames else None

    def _new_series(self) -> LoopCounter:
        return LoopCounter()

    def inc(self, amount: float = 1.0) -> None:
        """Add to the unlabelled counter (a family without labels)."""
        unlabelled = self._unlabelled
        if unlabelled is None:
            raise ValueError(f"{self.name} takes labels {self.labelnames}: inc() one of its labels(...)")
        unlabelled.inc(amount)

    def family(self) -> Metric:
        series = list(self._series.items())  # one C-level copy: the loop may add series meanwhile
        counters = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, counter in series:
            counters.add_metric(values, counter.value)
        return counters


class HistogramFamily(LoopFamily[LoopHistogram]):
    """A labelled family of :class:`LoopHistogram` series over the same ``buckets``."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        super().__init__(name, documentation, labelnames)
        if not self.labelnames:
            self.labels()

    def _new_series(self) -> LoopHistogram:
        return LoopHistogram(self.buckets)

    def family(self) -> Metric:
        series = list(self._series.items())  # one C-level copy: the loop may add series meanwhile
        histograms = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        edges = [floatToGoString(bound) for bound in self.buckets] + ["+Inf"]
        for values, histogram in series:
            counts, total = list(histogram.counts), histogram.sum
            histograms.add_metric(values, list(zip(edges, itertools.accumulate(counts))), total)
        return histograms


_FamilyT = TypeVar("_FamilyT", CounterFamily, HistogramFamily)


class _LoopFamilies(Collector):
    """Exports every :class:`LoopFamily` of a :class:`ServiceMetrics` at scrape time."""

    def __init__(self, families: list[CounterFamily | HistogramFamily]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            yield family.family()


class _ProvisionedCost(Collector):
    """``costserve_provisioned_cost_usd_total``, read from a function at scrape time."""

    def __init__(self, read: Callable[[], float]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "costserve_provisioned_cost_usd",
            "What the provisioned CPU and memory have cost since the server started, in USD.",
        )
        family.add_metric([], self._read())
        yield family


class _TransportCalls(Collector):
    """``costserve_grpc_calls_started_total``: gRPC's own count of calls received, read at scrape time."""

    def __init__(self, read: Callable[[], int]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "costserve_grpc_calls_started",
            "Calls gRPC received, every service included, whether or not they reached costserve's handlers: "
            "less costserve_requests_total and health/reflection calls, the calls gRPC dropped "
            "(--max-pending-calls) or that expired before the event loop took them up.",
        )
        calls.add_metric([], self._read())
        yield calls


class _CostProfiles(Collector):
    """Each model's measured cost per image by variant and batch size, and its batch limits, read at scrape time."""

    def __init__(self, read: Callable[[], Sequence[tuple[str, VariantProfile]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        cpu = GaugeMetricFamily(
            "costserve_profile_cpu_seconds_per_image",
            "CPU-seconds one image costs on this host at each batch size, for the latest version of each model: "
            'source="warmup" measured at load, every size and variant side by side (what the decisions read); '
            'source="live" the recent average of live batches of that size.',
            labels=["model", "precision", "batch_size", "source"],
        )
        wall = GaugeMetricFamily(
            "costserve_profile_seconds_per_image",
            "Wall seconds per image on the inference thread at each batch size (sources as the CPU figure).",
            labels=["model", "precision", "batch_size", "source"],
        )
        limit = GaugeMetricFamily(
            "costserve_batch_limit",
            "Largest batch the server forms: where the profile's CPU per image stops falling (at most "
            "--max-batch-size).",
            labels=["model", "precision"],
        )
        for model, variant in self._read():
            precision = variant.precision.value
            for source, costs in (("warmup", variant.sizes), ("live", variant.live)):
                for size, cost in list(costs.items()):
                    cpu.add_metric([model, precision, str(size), source], cost.cpu_s)
                    wall.add_metric([model, precision, str(size), source], cost.wall_s)
            limit.add_metric([model, precision], variant.batch_limit)
        yield from (cpu, wall, limit)


class ServiceMetrics:
    """Every metric costserve exports, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, process_collector: bool = True) -> None:
        self.registry = registry
        self._loop_families: list[CounterFamily | HistogramFamily] = []
        if process_collector:
            ProcessCollector(registry=registry)
        self.requests = self._counter(
            "costserve_requests_total",
            "Calls by model (empty when refused before one was found), protocol (v1, v2, tfserving), method, "
            "precision that answered (or was asked; auto when none was) and status code.",
            ["model", "protocol", "method", "precision", "code"],
        )
        self.images = self._counter(
            "costserve_images_total",
            "Images classified, by model, precision that answered and whether the cache answered.",
            ["model", "precision", "cache"],
        )
        self.request_duration = self._histogram(
            "costserve_request_duration_seconds",
            "Time from a request entering the core to its answer, in seconds, by model, protocol, method and "
            "precision.",
            ["model", "protocol", "method", "precision"],
            buckets=LATENCY_BUCKETS,
        )
        self.queue_duration = self._histogram(
            "costserve_queue_duration_seconds",
            "Time an image waited in the batch queue before its batch started, in seconds.",
            ["model", "precision"],
            buckets=LATENCY_BUCKETS,
        )
        self.inference_duration = self._histogram(
            "costserve_inference_duration_seconds",
            "Wall time of one runtime call (one batch), in seconds.",
            ["model", "precision"],
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = self._histogram(
            "costserve_batch_size",
            "Images per runtime call, padding excluded.",
            ["model", "precision"],
            buckets=BATCH_BUCKETS,
        )
        self.queue_depth = Gauge(
            "costserve_queue_depth", "Images waiting in the batch queues.", ["model", "precision"], registry=registry
        )
        self.cache_hits = self._counter("costserve_cache_hits_total", "Cache lookups that found an answer.")
        self.cache_misses = self._counter("costserve_cache_misses_total", "Cache lookups that found nothing.")
        self.cache_evictions = self._counter(
            "costserve_cache_evictions_total", "Entries evicted to make room (least recently used first)."
        )
        self.cache_entries = Gauge("costserve_cache_entries", "Entries in the prediction cache.", registry=registry)
        self.cache_bytes = Gauge(
            "costserve_cache_bytes", "Bytes the prediction cache's entries hold (estimated).", registry=registry
        )
        self.rejected = self._counter(
            "costserve_rejected_total",
            "Requests that got no answer, by reason (" + ", ".join(REJECTION_REASONS) + ").",
            ["reason"],
        )
        self.model_info = Gauge(
            "costserve_model_info",
            "Each model version being served (value 1), with its precision, format and held-out accuracy "
            "(unknown when not measured).",
            ["name", "version", "precision", "format", "accuracy"],
            registry=registry,
        )
        self.model_versions = Gauge(
            "costserve_model_versions",
            "Versions of each model of the repository by state (loading, available, unloading, failed).",
            ["model", "state"],
            registry=registry,
        )
        self.model_load_failures = Counter(
            "costserve_model_load_failures",
            "Model versions that failed to load (the reason is in the log and in ListModels).",
            ["model"],
            registry=registry,
        )

        self.request_cost = self._histogram(
            "costserve_request_cost_usd",
            "Cost of one answered request, in USD.",
            ["model", "precision"],
            buckets=COST_BUCKETS,
        )
        self.cost = self._counter(
            "costserve_cost_usd_total",
            "Cost charged to answered requests, in USD, by model, resource (cpu, memory, network) and precision.",
            ["model", "resource", "precision"],
        )
        self.cpu_seconds = self._counter(
            "costserve_cpu_seconds_total",
            "CPU-seconds attributed to answered requests, by model, precision and phase (inference, handling).",
            ["model", "precision", "phase"],
        )
        self.network_bytes = self._counter(
            "costserve_network_bytes_total",
            "Bytes of answered requests and their responses, by model and precision.",
            ["model", "precision"],
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

        self.decisions = self._counter(
            "costserve_decisions_total",
            "Policy decisions, by model, precision chosen and reason (requested, cache, accuracy_floor, "
            "cost_ceiling, budget_near, load_shed, deadline, cost_first, accuracy_first).",
            ["model", "precision", "reason"],
        )
        self.loop_lag = Gauge(
            "costserve_event_loop_lag_seconds",
            "How late the event loop runs a timer (recent average), in seconds: what a request waits "
            "for the loop before and between its steps.",
            registry=registry,
        )
        self.load_shedding = Gauge(
            "costserve_load_shedding",
            "1 while AUTO traffic is moved to the faster variant to hold the latency objective, else 0.",
            registry=registry,
        )
        self.tenant_spend = self._counter(
            "costserve_tenant_spend_usd_total",
            "Cost charged per tenant, in USD (tenants with a budget by name, everyone else as other).",
            ["tenant"],
        )
        self.tenant_budget = Gauge(
            "costserve_tenant_budget_usd",
            "Each configured tenant's budget, in USD per period (hour or day).",
            ["tenant", "period"],
            registry=registry,
        )
        self.budget_rejections = self._counter(
            "costserve_budget_rejections_total",
            "Requests refused because their tenant had spent its budget.",
            ["tenant"],
        )

    def _counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> CounterFamily:
        return self._add_loop_family(CounterFamily(name, documentation, labelnames))

    def _histogram(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> HistogramFamily:
        return self._add_loop_family(HistogramFamily(name, documentation, labelnames, buckets))

    def _add_loop_family(self, family: _FamilyT) -> _FamilyT:
        if not self._loop_families:
            self.registry.register(_LoopFamilies(self._loop_families))
        self._loop_families.append(family)
        return family

    def count_answered(self, protocol: str, method: str, precision: str = "auto", model: str = "") -> None:
        """Count a call answered OK that the core does not count itself (``GetModelInfo``, ``ListModels``)."""
        self.requests.labels(model, protocol, method, precision, "OK").inc()

    def count_refused(self, protocol: str, method: str, precision: str, error: CostserveError, model: str = "") -> None:
        """Count a call that ended with ``error``: its status under ``model``, ``protocol``, ``method`` and
        ``precision``, and its reason."""
        self.requests.labels(model, protocol, method, precision, error.status.name).inc()
        if error.reason:
            self.rejected.labels(error.reason).inc()

    def track_cost(self, provisioned_usd: Callable[[], float], utilization: Callable[[], float]) -> None:
        """Read the provisioned cost and the utilization at scrape time."""
        self.registry.register(_ProvisionedCost(provisioned_usd))
        self.utilization.set_function(utilization)

    def track_profiles(self, read: Callable[[], Sequence[tuple[str, VariantProfile]]]) -> None:
        """Read the models' cost profiles and batch limits at scrape time."""
        self.registry.register(_CostProfiles(read))

    def track_transport(self, read: Callable[[], int]) -> None:
        """Read the calls gRPC received at scrape time."""
        self.registry.register(_TransportCalls(read))

    def track_queue_depth(self, model: str, precision: str, depth: Callable[[], int]) -> None:
        """Read a model's queue depth at scrape time."""
        self.queue_depth.labels(model, precision).set_function(depth)

    def track_cache(self, entries: Callable[[], int], size_bytes: Callable[[], int]) -> None:
        """Read the cache's entries and bytes at scrape time."""
        self.cache_entries.set_function(entries)
        self.cache_bytes.set_function(size_bytes)


class PrecisionSeries:
    """The labelled series of one model's precision, looked up once rather than per request."""

    def __init__(self, metrics: ServiceMetrics, model: str, precision: str) -> None:
        self._metrics = metrics
        self._model = model
        self._precision = precision
        self._methods: dict[tuple[str, str], tuple[LoopCounter, LoopHistogram]] = {}
        self.images_hit = metrics.images.labels(model, precision, "hit")
        self.images_miss = metrics.images.labels(model, precision, "miss")
        self.cost_cpu = metrics.cost.labels(model, "cpu", precision)
        self.cost_memory = metrics.cost.labels(model, "memory", precision)
        self.cost_network = metrics.cost.labels(model, "network", precision)
        self.cpu_handling = metrics.cpu_seconds.labels(model, precision, "handling")
        self.cpu_inference = metrics.cpu_seconds.labels(model, precision, "inference")
        self.network_bytes = metrics.network_bytes.labels(model, precision)
        self.request_cost = metrics.request_cost.labels(model, precision)

    def method(self, protocol: str, method: str) -> tuple[LoopCounter, LoopHistogram]:
        """The answered-requests counter and the duration histogram of ``method`` of ``protocol``."""
        series = self._methods.get((protocol, method))
        if series is None:
            series = self._methods[(protocol, method)] = (
                self._metrics.requests.labels(self._model, protocol, method, self._precision, "OK"),
                self._metrics.request_duration.labels(self._model, protocol, method, self._precision),
            )
        return series
