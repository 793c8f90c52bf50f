"""The Python clients, sync and asyncio, against a real server: every option reaches the server."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from conftest import EXAMPLES, RunningServer
from helpers import INT8_CHEAPER, state_costs

from costserve import AsyncClient, Client, cost_usd, predict_request
from costserve.server.repository.store import LoadedModel
from costserve.v1 import classifier_pb2 as pb

T = TypeVar("T")


def _run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(asyncio.wait_for(scenario(), timeout=120))


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(28, 28), dtype=np.uint8)


def _spend(server: RunningServer, tenant: str) -> float:
    return server.metric("costserve_tenant_spend_usd_total", {"tenant": tenant})


@pytest.fixture
def budgeted(start_budgeted_server: Callable[..., RunningServer]) -> RunningServer:
    """A server where tenants acme and globex have budgets, so their spend is counted under their names."""
    return start_budgeted_server("[tenants.acme]\nusd_per_hour = 100.0\n[tenants.globex]\nusd_per_hour = 100.0\n")


@pytest.fixture
def floored(start_server: Callable[..., RunningServer], loaded_model: LoadedModel) -> RunningServer:
    """A cost-first server whose variants claim 0.98 (fp32) and 0.96 (int8) held-out accuracy, on a host where
    int8 is the cheaper."""
    metadata = loaded_model.metadata
    variants = {
        "fp32": dataclasses.replace(metadata.variants["fp32"], accuracy=0.98),
        "int8": dataclasses.replace(metadata.variants["int8"], accuracy=0.96),
    }
    model = dataclasses.replace(loaded_model, metadata=dataclasses.replace(metadata, variants=variants))
    server = start_server(model=model, policy="cost_first")
    state_costs(server, INT8_CHEAPER)
    return server


def test_predict_request_carries_every_option() -> None:
    request = predict_request([_pixels(1)], precision="int8", skip_cache=True, min_accuracy=0.9, max_cost_usd=1e-6)
    assert request.precision == pb.PRECISION_INT8 and request.skip_cache
    assert request.min_accuracy == 0.9 and request.max_cost_usd == 1e-6
    assert list(request.images[0].pixels.shape) == [28, 28]
    with pytest.raises(ValueError, match="not one of auto, fp32, int8"):
        predict_request([_pixels(1)], precision="fp16")


def test_options_are_keyword_only(client: Client) -> None:
    with pytest.raises(TypeError):
        client.predict(EXAMPLES[:1], "int8")  # type: ignore[misc]


def test_tenant_travels_as_metadata_per_client_and_per_call(budgeted: RunningServer) -> None:
    with Client(budgeted.target, timeout=30, tenant="acme") as client:
        acme = client.predict(EXAMPLES[:1], skip_cache=True)
        globex = client.predict(EXAMPLES[:1], skip_cache=True, tenant="globex")
        unknown = client.predict(EXAMPLES[:1], skip_cache=True, tenant="zed")
    assert _spend(budgeted, "acme") == pytest.approx(acme.cost.usd)
    assert _spend(budgeted, "globex") == pytest.approx(globex.cost.usd)
    assert _spend(budgeted, "other") == pytest.approx(unknown.cost.usd)


def test_min_accuracy_is_honoured_or_refused(floored: RunningServer) -> None:
    with Client(floored.target, timeout=30) as client:
        assert client.predict([_pixels(1)]).decision_reason == "cost_first"
        reply = client.predict([_pixels(2)], min_accuracy=0.97)
        assert reply.decision_reason == "accuracy_floor" and reply.predictions[0].precision == pb.PRECISION_FP32
        with pytest.raises(grpc.RpcError) as error:
            client.predict([_pixels(3)], precision="int8", min_accuracy=0.97)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "below the request's min_accuracy 0.9700" in error.value.details()


def test_max_cost_usd_refuses_a_request_predicted_above_it(client: Client) -> None:
    for seed in range(10, 15):  # recent costs: what the server predicts the next one from
        client.predict([_pixels(seed)], precision="fp32", skip_cache=True)
    with pytest.raises(grpc.RpcError) as error:
        client.predict([_pixels(20)], precision="fp32", max_cost_usd=1e-15)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "above its max_cost_usd" in error.value.details()
    assert client.predict([_pixels(21)], precision="fp32", max_cost_usd=1.0).cost.usd < 1.0


def test_the_call_cost_is_in_trailing_metadata(budgeted: RunningServer) -> None:
    with Client(budgeted.target, timeout=30) as client:
        response, call = client.predict_with_call(EXAMPLES[:2], precision="int8", tenant="acme")
        assert call.code() == grpc.StatusCode.OK
        assert cost_usd(call.trailing_metadata()) == response.cost.usd > 0
        stream = client.predict_stream([[path] for path in EXAMPLES[:4]], tenant="globex", skip_cache=True)
        responses = list(stream)
        assert [r.predictions[0].label for r in responses] == [0, 1, 2, 3]
        total = cost_usd(stream.trailing_metadata())
    assert total == pytest.approx(sum(r.cost.usd for r in responses))
    assert _spend(budgeted, "globex") == pytest.approx(total)
    assert cost_usd(()) is None


def test_timeout_is_per_call(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as error:
        client.predict(EXAMPLES[:1], skip_cache=True, timeout=1e-6)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_async_client_has_the_same_surface(budgeted: RunningServer) -> None:
    async def batches() -> AsyncIterator[list[Path]]:
        for path in EXAMPLES[5:8]:
            yield [path]

    async def scenario() -> dict[str, Any]:
        async with AsyncClient(budgeted.target, timeout=30, tenant="acme") as client:
            seen: dict[str, Any] = {"health": await client.health(), "info": await client.model_info()}
            seen["answers"] = await asyncio.gather(*(client.predict([path], skip_cache=True) for path in EXAMPLES[:3]))
            response, call = await client.predict_with_call([EXAMPLES[3]], precision="int8", tenant="globex")
            seen["with_call"] = (response, cost_usd(await call.trailing_metadata()))
            stream = client.predict_stream(batches(), precision="fp32", tenant="globex", skip_cache=True)
            seen["stream"] = [reply async for reply in stream]
            seen["stream_cost"] = cost_usd(await stream.trailing_metadata())
            seen["plain_stream"] = [reply async for reply in client.predict_stream([[EXAMPLES[9]]])]
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await client.predict([_pixels(1)], min_accuracy=1.5)
            seen["invalid"] = error.value.code()
            return seen

    seen = _run(scenario)
    assert seen["health"] == "SERVING" and seen["info"].name == "digits"
    assert [answer.predictions[0].label for answer in seen["answers"]] == [0, 1, 2]
    response, call_cost = seen["with_call"]
    assert response.predictions[0].precision == pb.PRECISION_INT8 and call_cost == response.cost.usd
    assert [reply.predictions[0].label for reply in seen["stream"]] == [5, 6, 7]
    assert {reply.predictions[0].precision for reply in seen["stream"]} == {pb.PRECISION_FP32}
    assert seen["stream_cost"] == pytest.approx(sum(reply.cost.usd for reply in seen["stream"]))
    assert seen["plain_stream"][0].predictions[0].label == 9
    assert seen["invalid"] == grpc.StatusCode.INVALID_ARGUMENT
    acme = [*seen["answers"], *seen["plain_stream"]]  # the client's tenant unless a call names another
    assert _spend(budgeted, "acme") == pytest.approx(sum(answer.cost.usd for answer in acme))
    assert _spend(budgeted, "globex") == pytest.approx(call_cost + seen["stream_cost"])


def test_async_client_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="inside a coroutine"):
        AsyncClient("127.0.0.1:1")
