"""The inference core alone: every path of a request through it, priced and counted, with no gRPC.

A small numpy runtime stands in for TensorFlow and LiteRT here, so these tests pin down the
core's own behaviour (conversion refusals, cache, policy, deadlines, failures, pricing and
counting); the real runtimes are exercised by the server tests.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from helpers import sample_sum
from prometheus_client import CollectorRegistry

from costserve.server.budgets import Budget, Budgets, TenantLedger
from costserve.server.core import InferenceCore
from costserve.server.domain import (
    ImageInput,
    PixelType,
    Precision,
    PredictionRequest,
    PredictionResult,
    RawPixels,
    WireCall,
)
from costserve.server.errors import (
    BudgetExceeded,
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    NotFound,
    Unavailable,
)
from costserve.server.metrics import ServiceMetrics
from costserve.server.repository.store import LoadedModel, ModelMetadata, VariantInfo
from costserve.server.runtimes import Runtime
from costserve.server.settings import Settings

T = TypeVar("T")
SHAPE = (8, 8, 1)
CLASSES = 10


class NumpyRuntime(Runtime):
    """A linear classifier in numpy: deterministic, fast, and able to hold or fail a batch on demand."""

    runs_on_calling_thread = True

    def __init__(self, precision: Precision) -> None:
        self.precision = precision
        self.input_shape = SHAPE
        self.num_classes = CLASSES
        self.weights = np.random.default_rng(7).normal(size=(int(np.prod(SHAPE)), CLASSES)).astype(np.float32)
        self.batches: list[int] = []
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()
        #: CPU-seconds per image at each batch size, as the warm-up reports it (flat unless a test sets it).
        self.cost_per_image: Callable[[int], float] = lambda size: 1e-5

    def time_batch(self, images: Sequence[np.ndarray]) -> tuple[float, float]:
        """Nothing run: the CPU and wall time the test set for a batch of this size."""
        seconds = self.cost_per_image(len(images)) * len(images)
        return seconds, seconds

    def predict(self, batch: np.ndarray) -> np.ndarray:
        assert self.gate.wait(timeout=30), "test never opened the gate"
        self.batches.append(len(batch))
        if self.fail:
            raise RuntimeError("the runtime failed")
        logits = batch.reshape(len(batch), -1) @ self.weights
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def _model() -> LoadedModel:
    variants = {
        precision.value: VariantInfo(path=precision.value, format="numpy", accuracy=accuracy, size_bytes=1)
        for precision, accuracy in ((Precision.FP32, 0.99), (Precision.INT8, 0.98))
    }
    metadata = ModelMetadata(
        name="numpy",
        version="1",
        input_shape=SHAPE,
        labels=[str(label) for label in range(CLASSES)],
        variants=variants,
        holdout_examples=0,
        training_data="none",
        created_at="2026-11-30T00:00:00Z",
    )
    runtimes: dict[Precision, Runtime] = {
        precision: NumpyRuntime(precision) for precision in (Precision.FP32, Precision.INT8)
    }
    return LoadedModel(metadata=metadata, version_dir=Path("numpy-model/1"), runtimes=runtimes)


def _image(seed: int) -> ImageInput:
    pixels = np.random.default_rng(seed).integers(0, 256, size=SHAPE, dtype=np.uint8)
    return ImageInput(pixels=RawPixels(shape=SHAPE, dtype=PixelType.UINT8, data=pixels.tobytes()))


def _request(*seeds: int, **fields: Any) -> PredictionRequest:
    return PredictionRequest(images=[_image(seed) for seed in seeds], **fields)


def _wire(method: str = "Predict", bytes_in: int = 1000, bytes_out: int = 300) -> WireCall[PredictionResult]:
    """A wire call whose 'response' is the result itself, sized ``bytes_out``."""
    return WireCall(method, bytes_in, lambda result: (result, bytes_out), Precision.FP32)


class CoreUnderTest:
    """A started core over the numpy model, its metrics registry, and a loop to drive it."""

    def __init__(self, budgets: Budgets | None = None, **settings: Any) -> None:
        self.registry = CollectorRegistry()
        self.model = _model()
        self.core = InferenceCore(
            self.model,
            Settings(**{"model_dir": Path("numpy-model"), **settings}),
            ServiceMetrics(self.registry),
            ledger=TenantLedger(budgets or Budgets({})),
        )

    def runtime(self, precision: Precision) -> NumpyRuntime:
        runtime = self.model.runtimes[precision]
        assert isinstance(runtime, NumpyRuntime)
        return runtime

    def metric(self, name: str, **labels: str) -> float:
        return sample_sum(self.registry, name, labels)

    def requests(self, code: str, method: str = "Predict", precision: str = "fp32") -> float:
        return self.metric("costserve_requests_total", method=method, precision=precision, code=code)


def run(scenario: Callable[[CoreUnderTest], Awaitable[T]], **options: Any) -> T:
    """Start a core, run ``scenario`` with it, stop the core."""

    async def main() -> T:
        under_test = CoreUnderTest(**options)
        await under_test.core.start()
        try:
            return await scenario(under_test)
        finally:
            await under_test.core.stop()

    return asyncio.run(asyncio.wait_for(main(), timeout=60))


def test_a_miss_is_computed_priced_and_counted() -> None:
    async def scenario(t: CoreUnderTest) -> None:
        answer = await t.core.predict(lambda: _request(1, 2, precision=Precision.FP32, tenant="acme"), _wire())
        result = answer.result
        assert answer.response is result
        assert [prediction.cache_hit for prediction in result.predictions] == [False, False]
        assert t.runtime(Precision.FP32).batches == [2]
        pixels = np.stack([np.frombuffer(_image(seed).pixels.data, np.uint8).reshape(SHAPE) for seed in (1, 2)])
        expected = t.runtime(Precision.FP32).predict(pixels.astype(np.float32) / 255)
        np.testing.assert_allclose([p.probabilities for p in result.predictions], expected, rtol=1e-5)
        # Priced: the inference share and the loop's handling, and the bytes both ways.
        assert answer.cost.network_bytes == 1300
        assert answer.cost.cpu_seconds >= result.inference_cpu_seconds > 0
        assert answer.cost.usd == pytest.approx(answer.cost.cpu_usd + answer.cost.memory_usd + answer.cost.network_usd)
        # Counted: the call, its images, its cost and the tenant's spend.
        assert t.requests("OK") == 1
        assert t.metric("costserve_images_total", precision="fp32", cache="miss") == 2
        assert t.metric("costserve_network_bytes_total", precision="fp32") == 1300
        charged = sum(
            t.metric("costserve_cost_usd_total", resource=resource, precision="fp32")
            for resource in ("cpu", "memory", "network")
        )
        assert charged == pytest.approx(answer.cost.usd)
        assert t.metric("costserve_tenant_spend_usd_total", tenant="other") == pytest.approx(answer.cost.usd)

    run(scenario)


def test_a_hit_is_answered_from_the_cache_and_charged_no_inference() -> None:
    async def scenario(t: CoreUnderTest) -> None:
        first = await t.core.predict(lambda: _request(3, precision=Precision.FP32), _wire())
        again = await t.core.predict(lambda: _request(3, precision=Precision.FP32), _wire())
        assert t.runtime(Precision.FP32).batches == [1]  # computed once
        (hit,) = again.result.predictions
        assert hit.cache_hit and hit.batch_size == 0
        np.testing.assert_array_equal(hit.probabilities, first.result.predictions[0].probabilities)
        assert again.result.inference_cpu_seconds == 0
        assert t.metric("costserve_images_total", precision="fp32", cache="hit") == 1
        assert t.metric("costserve_cache_hits_total") == 1
        assert t.requests("OK") == 2

    run(scenario)


def test_a_mixed_request_computes_only_its_misses() -> None:
    async def scenario(t: CoreUnderTest) -> None:
        await t.core.predict(lambda: _request(4, precision=Precision.FP32), _wire())
        mixed = await t.core.predict(lambda: _request(5, 4, 6, precision=Precision.FP32), _wire())
        assert [prediction.cache_hit for prediction in mixed.result.predictions] == [False, True, False]
        assert mixed.result.cache_hits == 1
        assert t.runtime(Precision.FP32).batches == [1, 2]
        assert t.metric("costserve_images_total", precision="fp32", cache="miss") == 3

    run(scenario)


def test_auto_is_answered_by_the_policy_and_skip_cache_computes_again() -> None:
    async def scenario(t: CoreUnderTest) -> None:
        auto = await t.core.predict(lambda: _request(7), _wire())
        assert auto.result.precision is Precision.FP32 and auto.result.decision_reason == "accuracy_first"
        cached = await t.core.predict(lambda: _request(7), _wire())
        assert cached.result.decision_reason == "cache"
        skipped = await t.core.predict(lambda: _request(7, skip_cache=True), _wire())
        assert not skipped.result.predictions[0].cache_hit
        assert t.runtime(Precision.FP32).batches == [1, 1]

    run(scenario)


def test_a_request_refused_while_converting_is_counted_under_the_precision_asked() -> None:
    async def scenario(t: CoreUnderTest) -> None:
        def convert() -> PredictionRequest:
            raise InvalidInput("images[0] is empty")

        with pytest.raises(InvalidInput):
            await t.core.predict(convert, _wire(method="PredictStream"))
        assert t.requests("INVALID_ARGUMENT", method="PredictStream") == 1
        assert t.metric("costserve_rejected_total", reason="invalid_input") == 1
        assert t.runtime(Precision.FP32).batches == []

    run(scenario)


def test_too_many_images_and_undecodable_images_are_refused_and_counted() -> None:
    async def scenario(t: CoreUnderTest) -> None:
        with pytest.raises(InvalidInput, match="at most 4"):
            await t.core.predict(lambda: _request(*range(5), precision=Precision.FP32), _wire())
        broken = PredictionRequest(images=[ImageInput(encoded=b"not a png")], precision=Precision.FP32)
        with pytest.raises(InvalidInput):
            await t.core.predict(lambda: broken, _wire())
        assert t.requests("INVALID_ARGUMENT") == 2
        assert t.runtime(Precision.FP32).batches == []

    run(scenario, max_images_per_request=4)


def test_a_tenant_over_budget_is_refused_and_counted() -> None:
    async def scenario(t: CoreUnderTest) -> None:
        await t.core.predict(lambda: _request(8, precision=Precision.FP32, tenant="acme"), _wire())  # spends it all
        with pytest.raises(BudgetExceeded, match="acme"):
            await t.core.predict(lambda: _request(9, precision=Precision.FP32, tenant="acme"), _wire())
        assert t.requests("RESOURCE_EXHAUSTED") == 1
        assert t.metric("costserve_rejected_total", reason="budget") == 1
        assert t.metric("costserve_budget_rejections_total", tenant="acme") == 1

    run(scenario, budgets=Budgets({"acme": Budget("acme", 1e-12, "hour")}))


def test_deadlines_refuse_before_computing_and_a_cancelled_call_near_its_deadline_counts_as_deadline() -> None:
    async def scenario(t: CoreUnderTest) -> None:
        with pytest.raises(DeadlineExceeded, match="had passed"):
            await t.core.predict(lambda: _request(10, precision=Precision.FP32, time_remaining_s=0.0), _wire())
        assert t.requests("DEADLINE_EXCEEDED") == 1
        # A call whose deadline passes while its image waits: gRPC cancels the handler.
        fp32 = t.runtime(Precision.FP32)
        fp32.gate.clear()
        held = asyncio.ensure_future(t.core.predict(lambda: _request(11, precision=Precision.FP32), _wire()))
        await asyncio.sleep(0.05)
        late = asyncio.ensure_future(
            t.core.predict(lambda: _request(12, precision=Precision.FP32, time_remaining_s=0.01), _wire())
        )
        await asyncio.sleep(0.05)  # past its deadline
        late.cancel()
        with pytest.raises(asyncio.CancelledError):
            await late
        fp32.gate.set()
        await held
        assert t.requests("DEADLINE_EXCEEDED") == 2
        assert t.metric("costserve_rejected_total", reason="deadline_exceeded") == 2
        assert fp32.batches == [1]  # the late image was never computed

    run(scenario)


def test_a_failed_batch_fails_its_request_counted_and_the_next_is_served() -> None:
    async def scenario(t: CoreUnderTest) -> None:
        t.runtime(Precision.FP32).fail = True
        with pytest.raises(InferenceFailed):
            await t.core.predict(lambda: _request(13, precision=Precision.FP32), _wire())
        assert t.requests("INTERNAL") == 1
        t.runtime(Precision.FP32).fail = False
        answer = await t.core.predict(lambda: _request(13, precision=Precision.FP32), _wire())
        assert not answer.result.predictions[0].cache_hit  # the failure left nothing in the cache
        assert t.requests("OK") == 1

    run(scenario)


def test_an_encoding_bug_is_counted_internal_and_not_charged() -> None:
    async def scenario(t: CoreUnderTest) -> None:
        def encode(result: PredictionResult) -> tuple[None, int]:
            raise ValueError("a front end bug")

        with pytest.raises(ValueError):
            await t.core.predict(lambda: _request(14, precision=Precision.FP32), WireCall("Predict", 10, encode))
        assert t.requests("INTERNAL") == 1
        assert t.metric("costserve_network_bytes_total", precision="fp32") == 0

    run(scenario)


def test_describe_counts_the_model_information_call() -> None:
    async def scenario(t: CoreUnderTest) -> None:
        assert t.core.describe("GetModelInfo").metadata.name == "numpy"
        assert t.requests("OK", method="GetModelInfo", precision="auto") == 1

    run(scenario)


def test_a_request_admitted_to_a_version_unloaded_before_its_turn_is_refused_retryably() -> None:
    """Past the unload's wait, a request still on the old version gets UNAVAILABLE and caches nothing."""

    async def scenario(t: CoreUnderTest) -> None:
        served = t.core.resolve("", "")  # admitted to version 1 ...
        assert await t.core.remove_version(served.name, served.version, wait_s=0) is t.model  # ... then unloaded
        with pytest.raises(Unavailable, match="unloaded while the request waited"):
            await t.core._predict(served, _request(7, precision=Precision.FP32))
        assert len(t.core.cache) == 0
        with pytest.raises(NotFound, match="no model named"):
            t.core.resolve("", "")

    run(scenario)
