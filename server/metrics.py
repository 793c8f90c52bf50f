"""Prometheus metrics of the service, on a registry passed in.

Names start ``costserve_``, use base units, counters end ``_total``; label values
are bounded (method names, precisions, status code names, fixed reasons). Tests
build a fresh ``CollectorRegistry`` and read values with ``get_sample_value``.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.process_collector import ProcessCollector

#: Request latency buckets, in seconds (0.5 ms .. 10 s).
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.5, 5.0, 10.0)
#: Batch size buckets, in images.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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
            "Images or requests refused or dropped before inference, by reason "
            "(invalid_input, queue_full, deadline_exceeded, cancelled, unavailable).",
            ["reason"],
            registry=registry,
        )
        self.model_info = Gauge(
            "costserve_model_info",
            "The model being served (value 1), with its version, precision, format and held-out accuracy.",
            ["name", "version", "precision", "format", "accuracy"],
            registry=registry,
        )

    def track_queue_depth(self, precision: str, depth: Callable[[], int]) -> None:
        """Read a batcher's queue depth at scrape time."""
        self.queue_depth.labels(precision).set_function(depth)

    def track_cache_entries(self, entries: Callable[[], int]) -> None:
        """Read the cache's size at scrape time."""
        self.cache_entries.set_function(entries)
