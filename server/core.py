"""The inference core: the one object that owns the request flow.

convert (the front end's) -> count check -> decode -> budget -> cache lookup ->
policy -> batcher -> runtime -> fill cache -> encode (the front end's) -> price ->
count -> priced answer. Every protocol front end (the costserve.v1 gRPC servicer
today) is a thin adapter over :meth:`InferenceCore.predict`: it hands over how to
convert its message and how to encode the result, and maps errors to its status
codes. Measuring the request's CPU, pricing it and counting every outcome happen
here, so a feature is written once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import time
from collections.abc import Callable

from costserve.server.batcher import BatchAnswer, Batcher
from costserve.server.budgets import OTHER_TENANT, Budgets, BudgetStatus, TenantLedger
from costserve.server.cache import CacheKey, PredictionCache
from costserve.server.cost import CostMeter, Prices
from costserve.server.domain import (
    CostBreakdown,
    ImagePrediction,
    Precision,
    PredictionRequest,
    PredictionResult,
    PricedAnswer,
    Response,
    WireCall,
)
from costserve.server.errors import BudgetExceeded, CostserveError, DeadlineExceeded, Unavailable
from costserve.server.inputs import DecodedImage, DecodePool, ImageLimits, decode_all
from costserve.server.load import Clock, LoadMonitor, ewma
from costserve.server.metrics import REJECTION_REASONS, PrecisionSeries, ServiceMetrics
from costserve.server.model_store import LoadedModel
from costserve.server.policy import REASONS, Decision, Load, Policy, PolicyConfig
from costserve.server.runtimes import allowed_batch_sizes
from costserve.server.settings import Settings

log = logging.getLogger(__name__)

#: A cancelled call this close to its deadline (or past it) was cancelled by the deadline, in seconds.
DEADLINE_SLACK_S = 0.002


class InferenceCore:
    """Classifies images with a loaded model; create, ``await start()``, then ``predict``.

    ``clock`` (monotonic seconds) times the load signals and the policy's hold; tests pass
    a fake one, or swap ``core.monitor.clock`` later.
    """

    def __init__(
        self,
        model: LoadedModel,
        settings: Settings,
        metrics: ServiceMetrics,
        meter: CostMeter | None = None,
        policy: Policy | None = None,
        ledger: TenantLedger | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self.meter = meter or CostMeter(Prices())
        #: Every load signal: demand, loop lag, and the batchers' recent load.
        self.monitor = LoadMonitor(clock)
        self.policy = policy or Policy(
            {precision: model.metadata.variant(precision).accuracy for precision in model.runtimes},
            PolicyConfig(
                mode=settings.policy,
                latency_slo_s=settings.latency_slo_s,
                refuse_over_slo=settings.over_slo == "refuse",
            ),
            clock=self.monitor.now,
        )
        self.ledger = ledger or TenantLedger(Budgets({}))
        #: Recent USD charged per computed image, per variant (EWMA): the cost ceiling's prediction.
        self.cost_per_image: dict[Precision, float] = {}
        self.cache = PredictionCache(settings.cache_size, on_evict=metrics.cache_evictions.inc)
        self.batchers = {
            precision: Batcher(
                runtime,
                max_batch_size=settings.max_batch_size,
                batch_timeout_s=settings.batch_timeout_s,
                batch_fill_timeout_s=settings.batch_fill_timeout_s,
                max_queue=settings.max_queue,
                metrics=metrics,
            )
            for precision, runtime in model.runtimes.items()
        }
        #: What one request may ask of the decoder; pixel caps sized from the model's input unless set.
        self.limits = ImageLimits.for_model(
            model.input_shape, settings.max_images_per_request, settings.max_image_pixels, settings.max_request_pixels
        )
        self.decode_pool = DecodePool(settings.decode_threads, settings.max_decode_queue)
        self.ready = False
        self._series = {precision: PrecisionSeries(metrics, precision.value) for precision in model.runtimes}
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
        for reason in REJECTION_REASONS:
            self.metrics.rejected.labels(reason)
        for tenant, budget in self.ledger.budgets.tenants.items():
            self.metrics.tenant_spend.labels(tenant)
            self.metrics.budget_rejections.labels(tenant)
            self.metrics.tenant_budget.labels(tenant, budget.period).set(budget.usd)
        self.metrics.tenant_spend.labels(OTHER_TENANT)
        self.metrics.load_shedding.set_function(lambda: float(self.policy.shedding))
        self.metrics.loop_lag.set_function(lambda: self.monitor.loop_lag.seconds)
        for precision, series in self._series.items():
            series.method("Predict")
            for reason in REASONS:
                self.metrics.decisions.labels(precision.value, reason)

    async def start(self) -> None:
        """Warm every runtime at every batch size (off the loop), then start the batchers."""
        sizes = allowed_batch_sizes(self.settings.max_batch_size)
        loop = asyncio.get_running_loop()
        for runtime in self.model.runtimes.values():
            await loop.run_in_executor(None, runtime.warm_up, sizes)
        # TensorFlow and the warm model leave some 370,000 long-lived objects the garbage
        # collector tracks; a full collection walks them all and stalls the event loop for
        # about 140 ms (more under load). Freezing moves them out of its sight (they are
        # still freed normally). Done before the loop lag is measured: it stalls once.
        gc.collect()
        gc.freeze()
        for batcher in self.batchers.values():
            await batcher.start()
        self.monitor.loop_lag.start()
        self.ready = True

    async def stop(self) -> None:
        """Answer whatever is queued, then stop the batchers."""
        self.ready = False
        self.monitor.loop_lag.stop()
        for batcher in self.batchers.values():
            await batcher.stop()
        self.decode_pool.close()

    async def predict(
        self, convert: Callable[[], PredictionRequest], wire: WireCall[Response]
    ) -> PricedAnswer[Response]:
        """Answer one call: convert its request, classify every image, encode, price and count.

        ``convert`` builds the request from the front end's message (raising
        :class:`~costserve.server.errors.InvalidInput` for a bad one); ``wire`` says how the
        call is counted and how its response is encoded and sized. Every outcome is counted
        under ``wire.method``; failures raise :class:`CostserveError` subclasses. The request
        is charged the event loop's CPU from conversion to encoding (less what other requests
        used while it waited for its batch), its share of the inference batches, and the bytes
        moved.
        """
        cpu_started = time.thread_time()  # the event loop's CPU clock: two reads per request
        started = time.monotonic()
        self.monitor.loop_lag.touch()
        precision = wire.asked_precision
        remaining: float | None = None
        try:
            request = convert()
            precision, remaining = request.precision, request.time_remaining_s
            result = await self._predict(request)
            response, bytes_out = wire.encode(result)
        except CostserveError as error:
            self.metrics.count_refused(wire.method, precision.value, error)
            raise
        except asyncio.CancelledError:
            # gRPC cancels the handler both when the caller goes away and when its deadline
            # passes; the caller sees DEADLINE_EXCEEDED for the latter, and so do the counts.
            expired = remaining is not None and time.monotonic() - started >= remaining - DEADLINE_SLACK_S
            code, reason = ("DEADLINE_EXCEEDED", "deadline_exceeded") if expired else ("CANCELLED", "cancelled")
            self.metrics.requests.labels(wire.method, precision.value, code).inc()
            self.metrics.rejected.labels(reason).inc()
            raise
        except Exception:
            self.metrics.requests.labels(wire.method, precision.value, "INTERNAL").inc()
            raise
        handling_cpu = time.thread_time() - cpu_started - result.waiting_loop_cpu_seconds
        cost = self._charge(result, wire.bytes_in + bytes_out, handling_cpu)
        series = self._series[result.precision]
        answered, duration = series.method(wire.method)
        answered.inc()
        duration.observe(result.server_seconds)
        hits = result.cache_hits
        if hits:
            series.images_hit.inc(hits)
        if hits < len(result.predictions):
            series.images_miss.inc(len(result.predictions) - hits)
        return PricedAnswer(result, response, cost)

    def describe(self, method: str = "GetModelInfo") -> LoadedModel:
        """The model served, for a front end's model-information call; counts the call under ``method``."""
        self.metrics.count_answered(method)
        return self.model

    def _charge(self, result: PredictionResult, network_bytes: int, handling_cpu_seconds: float) -> CostBreakdown:
        """Price an answered request; counts the cost in the metrics and the tenant's spend."""
        cost = self.meter.charge(handling_cpu_seconds + result.inference_cpu_seconds, network_bytes)
        series = self._series[result.precision]
        series.cpu_handling.inc(handling_cpu_seconds)
        series.cpu_inference.inc(result.inference_cpu_seconds)
        series.network_bytes.inc(network_bytes)
        series.cost_cpu.inc(cost.cpu_usd)
        series.cost_memory.inc(cost.memory_usd)
        series.cost_network.inc(cost.network_usd)
        series.request_cost.observe(cost.usd)
        self.metrics.tenant_spend.labels(self.ledger.label(result.tenant)).inc(cost.usd)
        self.ledger.charge(result.tenant, cost.usd)
        computed = len(result.predictions) - result.cache_hits
        if computed:
            self.cost_per_image[result.precision] = ewma(self.cost_per_image.get(result.precision), cost.usd / computed)
        return cost

    def load(self, budget: BudgetStatus = BudgetStatus.NONE) -> Load:
        """The load signals the policy reads (:meth:`LoadMonitor.snapshot`), plus ``budget``."""
        snapshot = self.monitor.snapshot(self.batchers, self.meter.utilization, self.cost_per_image)
        return snapshot if budget is BudgetStatus.NONE else dataclasses.replace(snapshot, budget=budget)

    def _decide(
        self, request: PredictionRequest, digests: list[bytes] | None
    ) -> tuple[Decision, list[ImagePrediction | None]]:
        """Refuse a tenant over budget, answer AUTO from the cache when it can, else ask the policy.

        ``digests`` are the images' pixel digests, None when the cache is not to be used. Also
        returns the cache lookups already made under the chosen variant (see :meth:`_lookup`),
        so that no image is looked up twice.
        """
        state = self.ledger.state(request.tenant)
        if state.status is BudgetStatus.OVER:
            self.metrics.budget_rejections.labels(self.ledger.label(request.tenant)).inc()
            raise BudgetExceeded(state.refusal(self.ledger.clock()))
        looked_up: dict[Precision, list[ImagePrediction | None]] = {}
        if digests is not None and request.precision is Precision.AUTO:
            for precision in self.policy.allowed(request):
                answers = looked_up[precision] = self._lookup(precision, digests)
                if len(answers) == len(digests) and answers[-1] is not None:
                    return self.policy.decision(precision, "cache"), answers
        decision = self.policy.choose(request, self.load(state.status))
        return decision, looked_up.get(decision.precision, [])

    def _lookup(self, precision: Precision, digests: list[bytes]) -> list[ImagePrediction | None]:
        """Cached answers under ``precision``, in image order, up to and including the first miss (None)."""
        answers: list[ImagePrediction | None] = []
        for digest in digests:
            answers.append(self._cached(precision, digest))
            if answers[-1] is None:
                break
        return answers

    def _cached(self, precision: Precision, digest: bytes) -> ImagePrediction | None:
        entry = self.cache.get(CacheKey(self.model.version, precision.value, digest))
        if entry is None:
            return None
        probabilities, label, score = entry
        return ImagePrediction(probabilities, precision, True, 0, label, score)

    def _remember(self, precision: Precision, digest: bytes, answer: BatchAnswer) -> None:
        # Entries hold only strings, bytes, numbers and arrays, which the garbage collector
        # stops tracking: a full cache then adds nothing to the collector's passes, which
        # otherwise stall the event loop for tens of milliseconds as the cache grows.
        self.cache.put(
            CacheKey(self.model.version, precision.value, digest), (answer.probabilities, answer.label, answer.score)
        )

    async def _predict(self, request: PredictionRequest) -> PredictionResult:
        started = time.perf_counter()
        if not self.ready:
            raise Unavailable("the model is loading or the server is shutting down; retry shortly")
        count = len(request.images)
        self.limits.check_count(count)
        deadline = None
        if request.time_remaining_s is not None:
            if request.time_remaining_s <= 0:
                raise DeadlineExceeded("the request's deadline had passed when it arrived")
            deadline = asyncio.get_running_loop().time() + request.time_remaining_s

        images = await self._decode(request)
        use_cache = self.cache.enabled and not request.skip_cache
        digests = [image.digest for image in images] if use_cache else None
        decision, looked_up = self._decide(request, digests)
        precision = decision.precision
        self.metrics.decisions.labels(precision.value, decision.reason).inc()

        predictions: list[ImagePrediction | None] = [None] * count
        misses: list[int] = []
        if digests is None:
            misses = list(range(count))
        else:
            for index, digest in enumerate(digests):
                cached = looked_up[index] if index < len(looked_up) else self._cached(precision, digest)
                if cached is None:
                    misses.append(index)
                else:
                    predictions[index] = cached
            if len(misses) < count:
                self.metrics.cache_hits.inc(count - len(misses))
            if misses:
                self.metrics.cache_misses.inc(len(misses))

        inference_cpu = waiting_cpu = 0.0
        if misses:
            if deadline is not None:
                self._refuse_if_late(precision, deadline)
            self.monitor.demand.record(len(misses))
            cpu_mark = time.thread_time()
            answers = await self._compute(precision, [images[index] for index in misses], deadline)
            waiting_cpu = time.thread_time() - cpu_mark
            for index, answer in zip(misses, answers):
                inference_cpu += answer.cpu_seconds
                predictions[index] = ImagePrediction(
                    answer.probabilities, precision, False, answer.batch_size, answer.label, answer.score
                )
                if digests is not None:
                    self._remember(precision, digests[index], answer)

        answered = [prediction for prediction in predictions if prediction is not None]
        assert len(answered) == count, f"{count - len(answered)} of {count} images left without a prediction"
        return PredictionResult(
            predictions=answered,
            model_version=self.model.version,
            server_seconds=time.perf_counter() - started,
            waiting_loop_cpu_seconds=waiting_cpu,
            inference_cpu_seconds=inference_cpu,
            decision_reason=decision.reason,
            tenant=request.tenant,
            cache_hits=count - len(misses),
        )

    def _refuse_if_late(self, precision: Precision, deadline: float) -> None:
        """Refuse now a request its batch queue is predicted to hold past its deadline.

        Under overload, computing it would spend the capacity that answers others in time
        on an answer nobody waits for; refusing at once costs almost nothing.
        """
        wait_s = self.batchers[precision].predicted_wait_s() + self.monitor.loop_lag.seconds
        left_s = deadline - asyncio.get_running_loop().time()
        if wait_s > left_s:
            raise DeadlineExceeded(
                f"the {precision.value} queue is predicted to hold the request {wait_s:.3f} s, past its deadline "
                f"({max(left_s, 0.0):.3f} s left); it was not computed. Retry with a longer deadline or later"
            )

    async def _decode(self, request: PredictionRequest) -> list[DecodedImage]:
        """Decode the request's images: inline when light, on a decode thread when heavy (see ImageLimits)."""
        heavy = self.limits.check_pixels(request.images)
        arguments = (request.images, self.model.input_shape, self.limits.max_image_pixels)
        if not heavy:
            return decode_all(*arguments)
        return await self.decode_pool.run(decode_all, *arguments)

    async def _compute(
        self, precision: Precision, images: list[DecodedImage], deadline: float | None
    ) -> list[BatchAnswer]:
        futures = self.batchers[precision].submit([image.model_input for image in images], deadline)
        if len(futures) == 1:
            return await futures[0]  # cancelling the caller cancels the future too
        try:
            parts = await asyncio.gather(*futures)
        except BaseException:
            # One part failed or the caller went away: the others need not be computed.
            for future in futures:
                future.cancel()
            raise
        return [answer for part in parts for answer in part]
