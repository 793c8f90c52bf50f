"""The inference core: the one object that owns the request flow.

convert (the front end's) -> resolve model + version -> count check -> decode ->
budget -> cache lookup -> policy -> batcher -> runtime -> fill cache -> encode (the
front end's) -> price -> count -> priced answer. Every protocol front end (the costserve.v1 gRPC servicer
today) is a thin adapter over :meth:`InferenceCore.predict`: it hands over how to
convert its message and how to encode the result, and maps errors to its status
codes. Measuring the request's CPU, pricing it and counting every outcome happen
here, so a feature is written once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from costserve.server.batcher import BatchAnswer, Batcher
from costserve.server.budgets import OTHER_TENANT, Budgets, BudgetStatus, TenantLedger
from costserve.server.cache import CacheKey, PredictionCache
from costserve.server.cost import CostMeter, Prices
from costserve.server.domain import (
    CostBreakdown,
    ImagePrediction,
    ModelStatus,
    Precision,
    PredictionRequest,
    PredictionResult,
    PricedAnswer,
    Protocol,
    Response,
    VersionState,
    VersionStatus,
    WireCall,
)
from costserve.server.errors import BudgetExceeded, CostserveError, DeadlineExceeded, NotFound, Unavailable
from costserve.server.inputs import DecodedImage, DecodePool, ImageLimits, decode_all
from costserve.server.load import Clock, LoadMonitor, ewma
from costserve.server.metrics import REJECTION_REASONS, PrecisionSeries, ServiceMetrics
from costserve.server.policy import REASONS, Decision, Load, Policy, PolicyConfig
from costserve.server.profile import VariantProfile, measure
from costserve.server.repository.store import LoadedModel
from costserve.server.runtimes import allowed_batch_sizes
from costserve.server.settings import Settings

log = logging.getLogger(__name__)

#: A cancelled call this close to its deadline (or past it) was cancelled by the deadline, in seconds.
DEADLINE_SLACK_S = 0.002


@dataclass(eq=False)
class ServedVersion:
    """One model version being served: its batchers, policy, pixel limits and metric series.

    The core routes each request to one; a request admitted to it is answered by it,
    even if a newer version is switched in meanwhile (:attr:`in_flight` counts them).
    """

    model: LoadedModel
    batchers: dict[Precision, Batcher]
    policy: Policy
    #: What one request may ask of the decoder; pixel caps sized from this model's input unless set.
    limits: ImageLimits
    series: dict[Precision, PrecisionSeries]
    #: Recent USD charged per computed image, per variant (EWMA): the cost ceiling's prediction.
    cost_per_image: dict[Precision, float] = field(default_factory=dict)
    #: USD per image the measured profile predicts, per variant: the prediction until a variant's
    #: first priced answer puts it in :attr:`cost_per_image`.
    profile_cost_per_image: dict[Precision, float] = field(default_factory=dict)
    #: Requests admitted to this version and not answered yet.
    in_flight: int = 0
    #: Switched out and its batchers stopping or stopped: nothing more is computed or cached for it.
    retired: bool = False
    #: Read off the model once: requests read them several times each.
    name: str = field(init=False)
    version: str = field(init=False)
    input_shape: tuple[int, int, int] = field(init=False)
    resize: str = field(init=False)
    labels: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.name, self.version = self.model.name, self.model.version
        self.input_shape, self.resize = self.model.input_shape, self.model.preprocessing.resize
        self.labels = self.model.metadata.labels


def _model_info_labels(model: LoadedModel, precision: Precision) -> tuple[str, str, str, str, str]:
    """The ``costserve_model_info`` labels of one variant: name, version, precision, format, accuracy."""
    variant = model.variant(precision)
    accuracy = "unknown" if variant.accuracy is None else f"{variant.accuracy:.4f}"
    return model.name, model.version, precision.value, variant.format, accuracy


class InferenceCore:
    """Classifies images with the models it serves; create, ``await start()``, then ``predict``.

    ``model``, when given, is served from :meth:`start` on (tests and single-model
    use); the repository manager adds and removes versions with :meth:`add_version`
    and :meth:`remove_version` while the core serves. ``clock`` (monotonic seconds)
    times the load signals and the policy's hold; tests pass a fake one, or swap
    ``core.monitor.clock`` later.
    """

    def __init__(
        self,
        model: LoadedModel | None,
        settings: Settings,
        metrics: ServiceMetrics,
        meter: CostMeter | None = None,
        policy: Policy | None = None,
        ledger: TenantLedger | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.meter = meter or CostMeter(Prices())
        #: Every load signal: demand, loop lag, and the batchers' recent load.
        self.monitor = LoadMonitor(clock)
        self.ledger = ledger or TenantLedger(Budgets({}))
        #: Served versions by model name, then version name (ascending).
        self.models: dict[str, dict[str, ServedVersion]] = {}
        #: Lists every model and version with its state (the repository manager's, once attached).
        self.model_statuses: Callable[[], list[ModelStatus]] = self._served_statuses
        self.cache = PredictionCache(
            settings.cache_size, int(settings.cache_max_mb * 2**20), on_evict=metrics.cache_evictions.inc
        )
        #: The request-size limit every model shares (the pixel caps are each version's, see ServedVersion).
        self.limits = ImageLimits(settings.max_images_per_request)
        self.decode_pool = DecodePool(settings.decode_threads, settings.max_decode_queue)
        self.ready = False
        self._initial = model
        self._initial_policy = policy
        self._tracked_depths: set[tuple[str, Precision]] = set()
        #: Versions switched out whose batchers have not stopped yet (stopped by :meth:`stop` if it comes first).
        self._retiring: list[ServedVersion] = []
        metrics.track_cache(lambda: len(self.cache), lambda: self.cache.size_bytes)
        metrics.track_cost(self.meter.provisioned_usd, self.meter.utilization)
        metrics.track_profiles(self._latest_profiles)
        prices = self.meter.prices
        metrics.price.labels("cpu").set(prices.vcpu_hour_usd)
        metrics.price.labels("memory").set(prices.memory_gb_hour_usd)
        metrics.price.labels("network").set(prices.network_gb_usd)
        metrics.provisioned.labels("vcpus").set(prices.vcpus)
        metrics.provisioned.labels("memory_gb").set(prices.memory_gb)
        self._create_series()

    def _create_series(self) -> None:
        """Create the labelled series at 0, so dashboards show 0 rather than no data before traffic."""
        for reason in REJECTION_REASONS:
            self.metrics.rejected.labels(reason)
        for tenant, budget in self.ledger.budgets.tenants.items():
            self.metrics.tenant_spend.labels(tenant)
            self.metrics.budget_rejections.labels(tenant)
            self.metrics.tenant_budget.labels(tenant, budget.period).set(budget.usd)
        self.metrics.tenant_spend.labels(OTHER_TENANT)
        self.metrics.load_shedding.set_function(
            lambda: float(any(served.policy.shedding for served in self.served_versions()))
        )
        self.metrics.loop_lag.set_function(lambda: self.monitor.loop_lag.seconds)

    # -- the models served ------------------------------------------------------------------

    def served_versions(self) -> list[ServedVersion]:
        """Every version being served, by model name then version."""
        return [served for versions in list(self.models.values()) for served in list(versions.values())]

    def default_model_name(self) -> str:
        """The model answering requests that name none: ``--default-model``, else digits, else the first by name."""
        if self.settings.default_model:
            return self.settings.default_model
        if "digits" in self.models or not self.models:
            return "digits"
        return min(self.models)

    @property
    def default(self) -> ServedVersion:
        """The default model's latest served version (NotFound when none is served)."""
        return self.resolve("", "")

    @property
    def model(self) -> LoadedModel:
        """The default model's latest served version, loaded."""
        return self.default.model

    @property
    def policy(self) -> Policy:
        """The policy of the default model's latest version."""
        return self.default.policy

    @property
    def batchers(self) -> dict[Precision, Batcher]:
        """The batchers of the default model's latest version."""
        return self.default.batchers

    @property
    def cost_per_image(self) -> dict[Precision, float]:
        """The predicted cost per computed image of the default model's latest version."""
        return self.default.cost_per_image

    def resolve(self, name: str, version: str) -> ServedVersion:
        """The served version a request names ("" for the default model, its latest version), or NotFound."""
        name = name or self.default_model_name()
        versions = self.models.get(name)
        if not versions:
            served = ", ".join(sorted(self.models)) or "none yet"
            raise NotFound(f"no model named {name!r} is served; models served: {served} (see ListModels)")
        if not version:
            return versions[next(reversed(versions))]
        found = versions.get(version)
        if found is None:
            raise NotFound(
                f"model {name!r} has no version {version!r} being served; versions served: "
                f"{', '.join(versions)} (see ListModels)"
            )
        return found

    async def add_version(self, model: LoadedModel, policy: Policy | None = None) -> ServedVersion:
        """Warm and profile ``model`` at every batch size (off the loop), start its batchers, and switch it in.

        The measured :class:`~costserve.server.profile.CostProfile` becomes ``model.profile``: the
        batchers' batch limits and the policy's orderings come from it, and so does the predicted
        cost of an image until the first priced answer. The newest version of a model answers
        requests naming no version from now on.
        """
        sizes = allowed_batch_sizes(self.settings.max_batch_size)
        loop = asyncio.get_running_loop()
        profile = model.profile = await loop.run_in_executor(None, measure, model.runtimes, sizes)
        if policy is not None and policy.profile is None:
            policy.profile = profile
        name = model.name
        batchers = {
            precision: Batcher(
                runtime,
                max_batch_size=self.settings.max_batch_size,
                batch_timeout_s=self.settings.batch_timeout_s,
                batch_fill_timeout_s=self.settings.batch_fill_timeout_s,
                max_queue=self.settings.max_queue,
                metrics=self.metrics,
                model=name,
                profile=profile.variants[precision],
            )
            for precision, runtime in model.runtimes.items()
        }
        served = ServedVersion(
            model=model,
            batchers=batchers,
            policy=policy
            or Policy(
                model.accuracy(),
                PolicyConfig(
                    mode=self.settings.policy,
                    latency_slo_s=self.settings.latency_slo_s,
                    refuse_over_slo=self.settings.over_slo == "refuse",
                ),
                clock=self.monitor.now,
                model=f"model {name!r} version {model.version}",
                profile=profile,
            ),
            limits=ImageLimits.for_model(
                model.input_shape,
                self.settings.max_images_per_request,
                self.settings.max_image_pixels,
                self.settings.max_request_pixels,
            ),
            series={precision: PrecisionSeries(self.metrics, name, precision.value) for precision in model.runtimes},
            # An image alone (batch 1) at the measured CPU, priced now.
            profile_cost_per_image={
                precision: self.meter.predict(variant.at(1).cpu_s) for precision, variant in profile.variants.items()
            },
        )
        log.info(
            "model %s version %s: %s; %s",
            name,
            model.version,
            profile.verdict() or "cost per image measured on this host",
            "; ".join(f"{precision.value}: {variant.why()}" for precision, variant in profile.variants.items()),
        )
        for batcher in batchers.values():
            await batcher.start()
        for precision in model.runtimes:
            served.series[precision].method(Protocol.V1.value, "Predict")
            for reason in REASONS:
                self.metrics.decisions.labels(name, precision.value, reason)
            self.metrics.model_info.labels(*_model_info_labels(model, precision)).set(1)
            if (name, precision) not in self._tracked_depths:
                self._tracked_depths.add((name, precision))
                self.metrics.track_queue_depth(name, precision.value, functools.partial(self._depth, name, precision))
        versions = dict(self.models.get(name, {}))
        versions[model.version] = served
        # One assignment of a new dict: a request resolving meanwhile sees the old table or the new one.
        self.models = {**self.models, name: dict(sorted(versions.items(), key=lambda item: int(item[0])))}
        return served

    def _latest_profiles(self) -> list[tuple[str, VariantProfile]]:
        """Each model's latest served version's variant profiles, with the model's name (read at scrape time)."""
        found: list[tuple[str, VariantProfile]] = []
        for name, versions in list(self.models.items()):  # read from the metrics thread: snapshots
            latest = list(versions.values())[-1:]
            profile = latest[0].model.profile if latest else None
            if profile is not None:
                found.extend((name, variant) for variant in profile.variants.values())
        return found

    def cost_verdict(self, name: str, version: str) -> str:
        """The one-line cost verdict of a served version ("" when it is not served or has one variant)."""
        served = self.models.get(name, {}).get(version)
        profile = served.model.profile if served is not None else None
        return profile.verdict() if profile is not None else ""

    def _depth(self, name: str, precision: Precision) -> int:
        return sum(
            served.batchers[precision].queue_depth
            for served in self.models.get(name, {}).values()
            if precision in served.batchers
        )

    async def remove_version(self, name: str, version: str, wait_s: float) -> LoadedModel | None:
        """Switch a version out, let the requests admitted to it finish (up to ``wait_s``), stop its batchers.

        Returns the unloaded model (for the caller to release), or None when it was not served.
        """
        versions = self.models.get(name, {})
        served = versions.get(version)
        if served is None:
            return None
        remaining = {key: value for key, value in versions.items() if key != version}
        self.models = {key: value for key, value in self.models.items() if key != name}
        if remaining:
            self.models[name] = remaining
        self._retiring.append(served)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while served.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.01)
        served.retired = True
        for batcher in served.batchers.values():
            await batcher.stop()
        self._retiring.remove(served)
        for precision in served.model.runtimes:
            try:
                self.metrics.model_info.remove(*_model_info_labels(served.model, precision))
            except KeyError:
                pass
        self.cache.discard(lambda key: key.model == name and key.model_version == version)
        return served.model

    def _served_statuses(self) -> list[ModelStatus]:
        default = self.default_model_name()
        return [
            ModelStatus(
                name,
                name == default,
                tuple(VersionStatus(version, VersionState.AVAILABLE) for version in versions),
            )
            for name, versions in sorted(self.models.items())
        ]

    def list_models(self, method: str = "ListModels", protocol: Protocol = Protocol.V1) -> list[ModelStatus]:
        """Every model, its versions and their states, for a front end's listing call; counts the call."""
        self.metrics.count_answered(protocol.value, method)
        return self.model_statuses()

    def model_status(self, method: str, name: str, version: str, protocol: Protocol) -> ModelStatus:
        """One model ("": the default) and the states of its versions (only ``version``'s when given), for a
        front end's status call; raises :class:`NotFound` for a model or version the repository does not
        hold. Counts the call either way."""
        name = name or self.default_model_name()
        status = next((status for status in self.model_statuses() if status.name == name), None)
        if status is not None and version:
            versions = tuple(entry for entry in status.versions if entry.version == version)
            status = dataclasses.replace(status, versions=versions) if versions else None
        if status is None:
            missing = f"version {version} of model {name}" if version else f"any versions of model {name}"
            error = NotFound(f"Could not find {missing}")
            self.metrics.count_refused(protocol.value, method, "auto", error)
            raise error
        self.metrics.count_answered(protocol.value, method, model=name)
        return status

    async def start(self) -> None:
        """Serve the model given at construction (warmed off the loop), then take requests."""
        if self._initial is not None:
            await self.add_version(self._initial, self._initial_policy)
        # TensorFlow and the warm model leave some 370,000 long-lived objects the garbage
        # collector tracks; a full collection walks them all and stalls the event loop for
        # about 140 ms (more under load). Freezing moves them out of its sight (they are
        # still freed normally). Done before the loop lag is measured: it stalls once.
        gc.collect()
        gc.freeze()
        self.monitor.loop_lag.start()
        self.ready = True

    async def stop(self) -> None:
        """Answer whatever is queued, then stop the batchers."""
        self.ready = False
        self.monitor.loop_lag.stop()
        for served in [*self.served_versions(), *self._retiring]:
            for batcher in served.batchers.values():
                await batcher.stop()
        self.decode_pool.close()

    async def predict(
        self, convert: Callable[[], PredictionRequest], wire: WireCall[Response]
    ) -> PricedAnswer[Response]:
        """Answer one call: convert its request, classify every image, encode, price and count.

        ``convert`` builds the request from the front end's message (raising
        :class:`~costserve.server.errors.InvalidInput` for a bad one); ``wire`` says how the
        call is counted and how its response is encoded and sized. Every outcome is counted
        under ``wire.method`` and the model asked for; failures raise :class:`CostserveError`
        subclasses (:class:`NotFound` for a model or version not served). The request is
        charged the event loop's CPU from conversion to encoding (less what other requests
        used while it waited for its batch), its share of the inference batches, and the
        bytes moved.
        """
        cpu_started = time.thread_time()  # the event loop's CPU clock: two reads per request
        started = time.monotonic()
        self.monitor.loop_lag.touch()
        precision = wire.asked_precision
        remaining: float | None = None
        served: ServedVersion | None = None
        try:
            request = convert()
            precision, remaining = request.precision, request.time_remaining_s
            if not self.ready:
                raise Unavailable("the model is loading or the server is shutting down; retry shortly")
            served = self.resolve(request.model_name, request.model_version)
            served.in_flight += 1
            result = await self._predict(served, request)
            response, bytes_out = wire.encode(result)
        except CostserveError as error:
            self.metrics.count_refused(
                wire.protocol.value, wire.method, precision.value, error, served.name if served else ""
            )
            raise
        except asyncio.CancelledError:
            # gRPC cancels the handler both when the caller goes away and when its deadline
            # passes; the caller sees DEADLINE_EXCEEDED for the latter, and so do the counts.
            expired = remaining is not None and time.monotonic() - started >= remaining - DEADLINE_SLACK_S
            code, reason = ("DEADLINE_EXCEEDED", "deadline_exceeded") if expired else ("CANCELLED", "cancelled")
            self.metrics.requests.labels(
                served.name if served else "", wire.protocol.value, wire.method, precision.value, code
            ).inc()
            self.metrics.rejected.labels(reason).inc()
            raise
        except Exception:
            self.metrics.requests.labels(
                served.name if served else "", wire.protocol.value, wire.method, precision.value, "INTERNAL"
            ).inc()
            raise
        finally:
            if served is not None:
                served.in_flight -= 1
        handling_cpu = time.thread_time() - cpu_started - result.waiting_loop_cpu_seconds
        cost = self._charge(served, result, wire.bytes_in + bytes_out, handling_cpu)
        series = served.series[result.precision]
        answered, duration = series.method(wire.protocol.value, wire.method)
        answered.inc()
        duration.observe(result.server_seconds)
        hits = result.cache_hits
        if hits:
            series.images_hit.inc(hits)
        if hits < len(result.predictions):
            series.images_miss.inc(len(result.predictions) - hits)
        return PricedAnswer(result, response, cost)

    def describe(
        self,
        method: str = "GetModelInfo",
        name: str = "",
        version: str = "",
        protocol: Protocol = Protocol.V1,
        check: Callable[[], str] | None = None,
    ) -> LoadedModel:
        """The model version named ("": the default, its latest), for a front end's model-information call.

        ``check``, when given, runs first and returns the version to resolve (a front end's own
        reading of its request, which may refuse it). Counts the call under ``protocol`` and
        ``method``; raises :class:`NotFound` for one not served, and what ``check`` raised, counted.
        """
        try:
            if check is not None:
                version = check()
            served = self.resolve(name, version)
        except CostserveError as error:
            self.metrics.count_refused(protocol.value, method, "auto", error)
            raise
        self.metrics.count_answered(protocol.value, method, model=served.name)
        return served.model

    def _charge(
        self, served: ServedVersion, result: PredictionResult, network_bytes: int, handling_cpu_seconds: float
    ) -> CostBreakdown:
        """Price an answered request; counts the cost in the metrics and the tenant's spend."""
        cost = self.meter.charge(handling_cpu_seconds + result.inference_cpu_seconds, network_bytes)
        series = served.series[result.precision]
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
            per_image = served.cost_per_image
            per_image[result.precision] = ewma(per_image.get(result.precision), cost.usd / computed)
        return cost

    def load(self, budget: BudgetStatus = BudgetStatus.NONE, served: ServedVersion | None = None) -> Load:
        """The load signals the policy reads (:meth:`LoadMonitor.snapshot`) for ``served`` (default: the
        default model's latest version), plus ``budget``."""
        served = served or self.default
        snapshot = self.monitor.snapshot(
            served.batchers, self.meter.utilization, served.cost_per_image, served.profile_cost_per_image
        )
        return snapshot if budget is BudgetStatus.NONE else dataclasses.replace(snapshot, budget=budget)

    def _decide(
        self, served: ServedVersion, request: PredictionRequest, digests: list[bytes] | None
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
        policy = served.policy
        looked_up: dict[Precision, list[ImagePrediction | None]] = {}
        if digests is not None and request.precision is Precision.AUTO:
            for precision in policy.allowed(request):
                answers = looked_up[precision] = self._lookup(served, precision, digests)
                if len(answers) == len(digests) and answers[-1] is not None:
                    return policy.decision(precision, "cache"), answers
        decision = policy.choose(request, self.load(state.status, served))
        return decision, looked_up.get(decision.precision, [])

    def _lookup(
        self, served: ServedVersion, precision: Precision, digests: list[bytes]
    ) -> list[ImagePrediction | None]:
        """Cached answers under ``precision``, in image order, up to and including the first miss (None)."""
        answers: list[ImagePrediction | None] = []
        for digest in digests:
            answers.append(self._cached(served, precision, digest))
            if answers[-1] is None:
                break
        return answers

    def _cached(self, served: ServedVersion, precision: Precision, digest: bytes) -> ImagePrediction | None:
        entry = self.cache.get(CacheKey(served.name, served.version, precision.value, digest))
        if entry is None:
            return None
        probabilities, label, score = entry
        return ImagePrediction(probabilities, precision, True, 0, label, score)

    def _remember(self, served: ServedVersion, precision: Precision, digest: bytes, answer: BatchAnswer) -> None:
        # Entries hold only strings, bytes, numbers and arrays, which the garbage collector
        # stops tracking: a full cache then adds nothing to the collector's passes, which
        # otherwise stall the event loop for tens of milliseconds as the cache grows.
        if served.retired:
            return  # its entries were dropped with it; a later version of the same number must not meet them
        self.cache.put(
            CacheKey(served.name, served.version, precision.value, digest),
            (answer.probabilities, answer.label, answer.score),
        )

    async def _predict(self, served: ServedVersion, request: PredictionRequest) -> PredictionResult:
        started = time.perf_counter()
        count = len(request.images)
        served.limits.check_count(count)
        deadline = None
        if request.time_remaining_s is not None:
            if request.time_remaining_s <= 0:
                raise DeadlineExceeded("the request's deadline had passed when it arrived")
            deadline = asyncio.get_running_loop().time() + request.time_remaining_s

        images = await self._decode(served, request)
        use_cache = self.cache.enabled and not request.skip_cache
        digests = [image.digest for image in images] if use_cache else None
        decision, looked_up = self._decide(served, request, digests)
        precision = decision.precision
        self.metrics.decisions.labels(served.name, precision.value, decision.reason).inc()

        predictions: list[ImagePrediction | None] = [None] * count
        misses: list[int] = []
        if digests is None:
            misses = list(range(count))
        else:
            for index, digest in enumerate(digests):
                cached = looked_up[index] if index < len(looked_up) else self._cached(served, precision, digest)
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
                self._refuse_if_late(served, precision, deadline)
            self.monitor.demand.record(len(misses))
            cpu_mark = time.thread_time()
            answers = await self._compute(served, precision, [images[index] for index in misses], deadline)
            waiting_cpu = time.thread_time() - cpu_mark
            for index, answer in zip(misses, answers):
                inference_cpu += answer.cpu_seconds
                predictions[index] = ImagePrediction(
                    answer.probabilities, precision, False, answer.batch_size, answer.label, answer.score
                )
                if digests is not None:
                    self._remember(served, precision, digests[index], answer)

        answered = [prediction for prediction in predictions if prediction is not None]
        assert len(answered) == count, f"{count - len(answered)} of {count} images left without a prediction"
        return PredictionResult(
            predictions=answered,
            model_version=served.version,
            server_seconds=time.perf_counter() - started,
            model_name=served.name,
            labels=served.labels,
            top_k=request.top_k,
            waiting_loop_cpu_seconds=waiting_cpu,
            inference_cpu_seconds=inference_cpu,
            decision_reason=decision.reason,
            tenant=request.tenant,
            cache_hits=count - len(misses),
        )

    def _refuse_if_late(self, served: ServedVersion, precision: Precision, deadline: float) -> None:
        """Refuse now a request its batch queue is predicted to hold past its deadline.

        Under overload, computing it would spend the capacity that answers others in time
        on an answer nobody waits for; refusing at once costs almost nothing.
        """
        wait_s = served.batchers[precision].predicted_wait_s() + self.monitor.loop_lag.seconds
        left_s = deadline - asyncio.get_running_loop().time()
        if wait_s > left_s:
            raise DeadlineExceeded(
                f"the {precision.value} queue is predicted to hold the request {wait_s:.3f} s, past its deadline "
                f"({max(left_s, 0.0):.3f} s left); it was not computed. Retry with a longer deadline or later"
            )

    async def _decode(self, served: ServedVersion, request: PredictionRequest) -> list[DecodedImage]:
        """Decode the request's images: inline when light, on a decode thread when heavy (see ImageLimits)."""
        limits = served.limits
        heavy = limits.check_pixels(request.images)
        arguments = (request.images, served.input_shape, limits.max_image_pixels, served.resize)
        if not heavy:
            return decode_all(*arguments)
        return await self.decode_pool.run(decode_all, *arguments)

    async def _compute(
        self, served: ServedVersion, precision: Precision, images: list[DecodedImage], deadline: float | None
    ) -> list[BatchAnswer]:
        if served.retired:
            raise Unavailable(
                f"model {served.name!r} version {served.version} was unloaded while the request waited; retry "
                "(requests naming no version go to the newest)"
            )
        futures = served.batchers[precision].submit([image.model_input for image in images], deadline)
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
