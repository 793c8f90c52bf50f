"""The inference core: the one object that owns the request flow.

validate + decode -> policy -> cache lookup -> batcher -> runtime -> fill cache
-> metrics -> result. Every protocol front end (the costserve.v1 gRPC servicer
today) is a thin adapter over :meth:`InferenceCore.predict`, so a feature is
written once, here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import numpy as np

from costserve.server.batcher import BatchAnswer, Batcher
from costserve.server.cache import CacheKey, PredictionCache, pixels_digest
from costserve.server.cost import CostMeter, Prices
from costserve.server.domain import ImagePrediction, Precision, PredictionRequest, PredictionResult
from costserve.server.errors import CostserveError, DeadlineExceeded, InvalidInput, Unavailable
from costserve.server.inputs import decode_image
from costserve.server.metrics import ServiceMetrics
from costserve.server.model_store import LoadedModel
from costserve.server.policy import Policy
from costserve.server.runtimes import allowed_batch_sizes
from costserve.server.settings import Settings

log = logging.getLogger(__name__)

_REJECTION_REASONS = {
    "InvalidInput": "invalid_input",
    "Overloaded": "queue_full",
    "DeadlineExceeded": "deadline_exceeded",
    "Unavailable": "unavailable",
}


class InferenceCore:
    """Classifies images with a loaded model; create, ``await start()``, then ``predict``."""

    def __init__(
        self,
        model: LoadedModel,
        settings: Settings,
        metrics: ServiceMetrics,
        meter: CostMeter | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self.meter = meter or CostMeter(Prices())
        self.policy = policy or Policy()
        self.cache = PredictionCache(settings.cache_size, on_evict=metrics.cache_evictions.inc)
        self.batchers = {
            precision: Batcher(
                runtime,
                max_batch_size=settings.max_batch_size,
                batch_timeout_s=settings.batch_timeout_s,
                max_queue=settings.max_queue,
                metrics=metrics,
            )
            for precision, runtime in model.runtimes.items()
        }
        self.ready = False
        metrics.track_cache_entries(lambda: len(self.cache))
        metrics.track_cost(self.meter.provisioned_usd, self.meter.utilization)
        prices = self.meter.prices
        metrics.price.labels("cpu").set(prices.vcpu_hour_usd)
        metrics.price.labels("memory").set(prices.memory_gb_hour_usd)
        metrics.price.labels("network").set(prices.network_gb_usd)
        metrics.provisioned.labels("vcpus").set(prices.vcpus)
        metrics.provisioned.labels("memory_gb").set(prices.memory_gb)
        self._create_series()
        for precision in model.runtimes:
            variant = model.metadata.variant(precision)
            metrics.model_info.labels(
                model.metadata.name, model.version, precision.value, variant.format, f"{variant.accuracy:.4f}"
            ).set(1)

    def _create_series(self) -> None:
        """Create the labelled series at 0, so dashboards show 0 rather than no data before traffic."""
        metrics = self.metrics
        for reason in _REJECTION_REASONS.values():
            metrics.rejected.labels(reason)
        metrics.rejected.labels("cancelled")
        for precision in self.model.runtimes:
            label = precision.value
            metrics.requests.labels("Predict", label, "OK")
            metrics.request_duration.labels("Predict", label)
            for cache in ("hit", "miss"):
                metrics.images.labels(label, cache)
            for resource in ("cpu", "memory", "network"):
                metrics.cost.labels(resource, label)
            for phase in ("handling", "inference"):
                metrics.cpu_seconds.labels(label, phase)
            metrics.network_bytes.labels(label)
            metrics.request_cost.labels(label)

    async def start(self) -> None:
        """Warm every runtime at every batch size (off the loop), then start the batchers."""
        sizes = allowed_batch_sizes(self.settings.max_batch_size)
        loop = asyncio.get_running_loop()
        for runtime in self.model.runtimes.values():
            await loop.run_in_executor(None, runtime.warm_up, sizes)
        for batcher in self.batchers.values():
            await batcher.start()
        self.ready = True

    async def stop(self) -> None:
        """Answer whatever is queued, then stop the batchers."""
        self.ready = False
        for batcher in self.batchers.values():
            await batcher.stop()

    async def predict(self, request: PredictionRequest, method: str = "Predict") -> PredictionResult:
        """Classify every image of ``request``; raises :class:`CostserveError` subclasses on failure."""
        precision_label = request.precision.value
        try:
            result = await self._predict(request)
        except CostserveError as error:
            self.count_failure(method, precision_label, error)
            raise
        except asyncio.CancelledError:  # the caller went away (or its deadline passed)
            self.metrics.requests.labels(method, precision_label, "CANCELLED").inc()
            self.metrics.rejected.labels("cancelled").inc()
            raise
        precision_label = result.predictions[0].precision.value
        self.metrics.requests.labels(method, precision_label, "OK").inc()
        self.metrics.request_duration.labels(method, precision_label).observe(result.server_seconds)
        for prediction in result.predictions:
            self.metrics.images.labels(prediction.precision.value, "hit" if prediction.cache_hit else "miss").inc()
        return result

    def count_failure(self, method: str, precision_label: str, error: CostserveError) -> None:
        """Count a failed request; front ends call it for requests refused before :meth:`predict`."""
        self.metrics.requests.labels(method, precision_label, error.status.name).inc()
        reason = _REJECTION_REASONS.get(type(error).__name__)
        if reason:
            self.metrics.rejected.labels(reason).inc()

    def charge(self, result: PredictionResult, network_bytes: int, adapter_cpu_seconds: float = 0.0) -> PredictionResult:
        """Price an answered request; front ends call it with the bytes moved and their own CPU.

        Returns ``result`` with its cost filled in, and counts the cost in the metrics.
        """
        handling = result.handling_cpu_seconds + adapter_cpu_seconds
        cost = self.meter.charge(handling + result.inference_cpu_seconds, network_bytes)
        precision = result.precision.value
        self.metrics.cpu_seconds.labels(precision, "handling").inc(handling)
        self.metrics.cpu_seconds.labels(precision, "inference").inc(result.inference_cpu_seconds)
        self.metrics.network_bytes.labels(precision).inc(network_bytes)
        self.metrics.cost.labels("cpu", precision).inc(cost.cpu_usd)
        self.metrics.cost.labels("memory", precision).inc(cost.memory_usd)
        self.metrics.cost.labels("network", precision).inc(cost.network_usd)
        self.metrics.request_cost.labels(precision).observe(cost.usd)
        return dataclasses.replace(result, handling_cpu_seconds=handling, cost=cost)

    async def _predict(self, request: PredictionRequest) -> PredictionResult:
        started = time.perf_counter()
        cpu_mark = time.thread_time()  # the event loop's CPU: this coroutine's own steps
        handling_cpu = 0.0
        inference_cpu = 0.0
        if not self.ready:
            raise Unavailable("the model is loading or the server is shutting down; retry shortly")
        count = len(request.images)
        if count == 0:
            raise InvalidInput(f"the request has no images; send 1 to {self.settings.max_images_per_request}")
        if count > self.settings.max_images_per_request:
            raise InvalidInput(
                f"the request has {count} images; at most {self.settings.max_images_per_request} per request "
                "(split it, or use PredictStream)"
            )
        loop = asyncio.get_running_loop()
        deadline = None
        if request.time_remaining_s is not None:
            if request.time_remaining_s <= 0:
                raise DeadlineExceeded("the request's deadline had passed when it arrived")
            deadline = loop.time() + request.time_remaining_s

        pixels = [decode_image(image, self.model.input_shape, index) for index, image in enumerate(request.images)]
        decision = self.policy.choose(request)
        precision = decision.precision
        use_cache = self.cache.enabled and not request.skip_cache

        predictions: list[ImagePrediction | None] = [None] * count
        keys: list[CacheKey | None] = [None] * count
        misses: list[int] = []
        for index, image in enumerate(pixels):
            if use_cache:
                keys[index] = CacheKey(self.model.version, precision, pixels_digest(image))
                cached = self.cache.get(keys[index])
                if cached is not None:
                    self.metrics.cache_hits.inc()
                    predictions[index] = ImagePrediction(cached, precision, cache_hit=True, batch_size=0)
                    continue
                self.metrics.cache_misses.inc()
            misses.append(index)

        if misses:
            handling_cpu += time.thread_time() - cpu_mark
            answers = await self._compute(precision, [pixels[index] for index in misses], deadline)
            cpu_mark = time.thread_time()
            for index, answer in zip(misses, answers):
                inference_cpu += answer.cpu_seconds
                predictions[index] = ImagePrediction(
                    answer.probabilities, precision, cache_hit=False, batch_size=answer.batch_size
                )
                if keys[index] is not None:
                    self.cache.put(keys[index], answer.probabilities)  # type: ignore[arg-type]

        return PredictionResult(
            predictions=predictions,  # type: ignore[arg-type]
            model_version=self.model.version,
            server_seconds=time.perf_counter() - started,
            handling_cpu_seconds=handling_cpu + time.thread_time() - cpu_mark,
            inference_cpu_seconds=inference_cpu,
        )

    async def _compute(self, precision: Precision, images: list[np.ndarray], deadline: float | None) -> list[BatchAnswer]:
        futures = self.batchers[precision].submit(images, deadline)
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            # One image failed or the caller went away: the others need not be computed.
            for future in futures:
                future.cancel()
            raise
