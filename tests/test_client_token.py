"""Bearer tokens: the Python clients, the CLI and the load generator send ``authorization: Bearer <token>``
on every call, and never write the token out.

The server here is a small grpc.aio server on 127.0.0.1 port 0 that records each call's request
metadata and answers minimal valid responses for costserve.v1, the Open Inference Protocol v2,
TF Serving and gRPC health. No model, no TensorFlow: these tests take a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from conftest import EXAMPLES
from grpc_health.v1 import health_pb2, health_pb2_grpc

from costserve import AUTHORIZATION_METADATA_KEY, AsyncClient, Client, cost_usd, token_metadata
from costserve.cli import main
from costserve.loadtest import LoadtestConfig
from costserve.protocols import inference_pb2 as v2
from costserve.protocols import inference_pb2_grpc as v2_grpc
from costserve.protocols import tensorflow_pb2 as tf
from costserve.protocols import tensorflow_serving_pb2 as tfs
from costserve.protocols import tensorflow_serving_pb2_grpc as tfs_grpc
from costserve.v1 import classifier_pb2 as pb
from costserve.v1 import classifier_pb2_grpc as pb_grpc

TOKEN = "csk_test_0123456789abcdefSECRET"
OTHER_TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ0ZXN0In0.c2lnbmF0dXJl"
#: A model name the recording servicers refuse, with a message of their own.
REFUSED_MODEL = "refused"
DIGITS = str(EXAMPLES[0].parent)


@dataclass
class Recorder:
    """Each call's method and request metadata, in arrival order."""

    calls: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)

    def record(self, method: str, context: grpc.aio.ServicerContext) -> None:
        metadata = [(key, str(value)) for key, value in context.invocation_metadata() or ()]
        self.calls.append((method, metadata))

    def authorizations(self) -> dict[str, set[str | None]]:
        """Per method, every ``authorization`` value its calls carried (None: a call without one)."""
        seen: dict[str, set[str | None]] = {}
        for method, metadata in self.calls:
            values = [value for key, value in metadata if key == AUTHORIZATION_METADATA_KEY]
            assert len(values) <= 1, f"{method}: {len(values)} authorization entries"
            seen.setdefault(method, set()).add(values[0] if values else None)
        return seen

    def values(self, method: str, key: str) -> list[str | None]:
        """``key``'s value in each call of ``method`` (None: a call without it)."""
        return [
            next((value for name, value in metadata if name == key), None)
            for called, metadata in self.calls
            if called == method
        ]

    def tenants(self, method: str) -> list[str | None]:
        return self.values(method, "x-costserve-tenant")


def _prediction_response(count: int) -> pb.PredictResponse:
    predictions = [pb.Prediction(label=7, label_name="7", score=0.9, precision=pb.PRECISION_FP32)] * count
    return pb.PredictResponse(predictions=predictions, model_name="digits", model_version="1", cost=pb.Cost(usd=1e-6))


class Classifier(pb_grpc.ClassifierServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        self.recorder.record("Predict", context)
        if request.model_name == REFUSED_MODEL:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no valid credentials")
        return _prediction_response(len(request.images))

    async def PredictStream(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("PredictStream", context)
        async for request in requests:
            yield _prediction_response(len(request.images))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        self.recorder.record("GetModelInfo", context)
        return pb.ModelInfo(
            name="digits",
            version="1",
            input_shape=[8, 8, 1],
            labels=[str(digit) for digit in range(10)],
            max_images_per_request=64,
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        self.recorder.record("ListModels", context)
        return pb.ListModelsResponse(models=[pb.ModelStatus(name="digits", is_default=True)])


class Health(health_pb2_grpc.HealthServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self.recorder.record("Check", context)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class OpenInference(v2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("ModelMetadata", context)
        return v2.ModelMetadataResponse(name="digits", versions=["1"], platform="costserve")

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("ModelInfer", context)
        return v2.ModelInferResponse(model_name="digits", model_version="1")


class TFServing(tfs_grpc.PredictionServiceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def GetModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("GetModelMetadata", context)
        signature = tf.SignatureDef()
        signature.inputs["images"].dtype = tf.DT_STRING
        signature.outputs["probabilities"].dtype = tf.DT_FLOAT
        signatures = tfs.SignatureDefMap()
        signatures.signature_def["serving_default"].CopyFrom(signature)
        response = tfs.GetModelMetadataResponse()
        response.metadata["signature_def"].Pack(signatures)
        return response

    async def Predict(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.recorder.record("TFPredict", context)
        count = request.inputs["images"].tensor_shape.dim[0].size
        shape = tf.TensorShapeProto(dim=[tf.TensorShapeProto.Dim(size=count), tf.TensorShapeProto.Dim(size=2)])
        response = tfs.PredictResponse()
        response.outputs["probabilities"].CopyFrom(
            tf.TensorProto(dtype=tf.DT_FLOAT, tensor_shape=shape, float_val=[0.1, 0.9] * count)
        )
        return response


@dataclass
class RecordingServer:
    target: str
    recorder: Recorder


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    """The recording server on 127.0.0.1 port 0, its event loop in a background thread."""
    recorder = Recorder()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="recording-server", daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        grpc_server = grpc.aio.server()  # inside the running loop it belongs to
        pb_grpc.add_ClassifierServicer_to_server(Classifier(recorder), grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(Health(recorder), grpc_server)
        v2_grpc.add_GRPCInferenceServiceServicer_to_server(OpenInference(recorder), grpc_server)
        tfs_grpc.add_PredictionServiceServicer_to_server(TFServing(recorder), grpc_server)
        port = grpc_server.add_insecure_port("127.0.0.1:0")
        await grpc_server.start()
        return grpc_server, port

    grpc_server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield RecordingServer(f"127.0.0.1:{port}", recorder)
    finally:
        asyncio.run_coroutine_threadsafe(grpc_server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _expected(token: str | None) -> set[str | None]:
    return {f"Bearer {token}" if token else None}


# --------------------------------------------------------------------------- the Python clients

CLIENT_METHODS = {"Check", "ListModels", "GetModelInfo", "Predict", "PredictStream"}


@pytest.mark.parametrize("token", [TOKEN, None])
def test_the_client_sends_the_token_on_every_call(server: RecordingServer, token: str | None) -> None:
    with Client(server.target, timeout=5, tenant="acme", token=token) as client:
        assert client.health() == "SERVING"
        assert client.list_models().models[0].name == "digits"
        assert client.model_info("digits").version == "1"
        assert client.predict(EXAMPLES[:2]).predictions[0].label == 7
        _, call = client.predict_with_call(EXAMPLES[:1], tenant="globex")
        assert cost_usd(call.trailing_metadata()) is None
        client.predict(EXAMPLES[:1], tenant="")
        assert len(list(client.predict_stream([EXAMPLES[:1], EXAMPLES[1:3]]))) == 2
    assert server.recorder.authorizations() == {method: _expected(token) for method in CLIENT_METHODS}
    # The tenant travels beside the token, per call as before.
    assert server.recorder.tenants("Predict") == ["acme", "globex", None]
    assert server.recorder.tenants("PredictStream") == ["acme"]
    assert server.recorder.tenants("GetModelInfo") == [None]


@pytest.mark.parametrize("token", [TOKEN, None])
def test_the_async_client_sends_the_token_on_every_call(server: RecordingServer, token: str | None) -> None:
    async def calls() -> None:
        async with AsyncClient(server.target, timeout=5, tenant="acme", token=token) as client:
            assert await client.health() == "SERVING"
            assert (await client.list_models()).models[0].name == "digits"
            assert (await client.model_info()).name == "digits"
            replies = await asyncio.gather(client.predict(EXAMPLES[:1]), client.predict(EXAMPLES[:1], tenant="b"))
            assert [len(reply.predictions) for reply in replies] == [1, 1]
            response, call = await client.predict_with_call(EXAMPLES[:2])
            assert len(response.predictions) == 2 and cost_usd(await call.trailing_metadata()) is None

            async def batches() -> Any:
                for image in EXAMPLES[:3]:
                    yield [image]

            assert len([reply async for reply in client.predict_stream(batches())]) == 3

    asyncio.run(calls())
    assert server.recorder.authorizations() == {method: _expected(token) for method in CLIENT_METHODS}
    assert sorted(server.recorder.tenants("Predict"), key=str) == ["acme", "acme", "b"]


def test_a_token_that_cannot_be_metadata_is_refused_without_quoting_it() -> None:
    assert token_metadata(None) == token_metadata("") == ()
    assert token_metadata(TOKEN) == (("authorization", f"Bearer {TOKEN}"),)
    for bad in (f"{TOKEN}\n", f"Bearer {TOKEN}", f"{TOKEN}é"):
        with pytest.raises(ValueError) as refused:
            Client("127.0.0.1:1", token=bad)
        assert TOKEN not in str(refused.value)


# --------------------------------------------------------------------------- the CLI


def test_the_cli_sends_the_flag_or_the_variable_and_never_prints_it(
    server: RecordingServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("COSTSERVE_TOKEN", raising=False)
    commands = [["health"], ["models"], ["info"], ["predict", str(EXAMPLES[0]), "--top-k", "1"]]
    for command in commands:
        assert main(["--target", server.target, "--token", TOKEN, *command]) == 0, command
    assert server.recorder.authorizations() == {
        method: _expected(TOKEN) for method in ("Check", "ListModels", "GetModelInfo", "Predict")
    }

    server.recorder.calls.clear()
    monkeypatch.setenv("COSTSERVE_TOKEN", OTHER_TOKEN)
    for command in commands:
        assert main(["--target", server.target, *command]) == 0, command
    assert main(["--target", server.target, "--token", TOKEN, "health"]) == 0  # the flag wins
    seen = server.recorder.authorizations()
    assert seen.pop("Check") == {f"Bearer {OTHER_TOKEN}", f"Bearer {TOKEN}"}
    assert seen == {method: _expected(OTHER_TOKEN) for method in ("ListModels", "GetModelInfo", "Predict")}

    # A refusal is reported with the server's message, not the token.
    assert main(["--target", server.target, "predict", str(EXAMPLES[0]), "--model", REFUSED_MODEL]) == 1
    assert main(["--token", "two words", "health"]) == 2
    output = capsys.readouterr()
    assert "UNAUTHENTICATED" in output.err and "--token" in output.err
    assert TOKEN not in output.out + output.err and OTHER_TOKEN not in output.out + output.err


def test_without_a_token_the_cli_sends_no_authorization(
    server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COSTSERVE_TOKEN", raising=False)
    assert main(["--target", server.target, "health"]) == 0
    monkeypatch.setenv("COSTSERVE_TOKEN", "")  # set but empty: no token
    assert main(["--target", server.target, "predict", str(EXAMPLES[0])]) == 0
    assert server.recorder.authorizations() == {"Check": {None}, "Predict": {None}}


# --------------------------------------------------------------------------- the load generator

#: Per protocol: the methods a load test calls, and the extra arguments it needs.
LOADTEST_CASES = {
    "v1": ({"GetModelInfo", "Predict"}, ["--protocol", "v1"]),
    "v1-stream": ({"GetModelInfo", "PredictStream"}, ["--protocol", "v1", "--stream"]),
    "v2": ({"GetModelInfo", "ModelMetadata", "ModelInfer"}, ["--protocol", "v2"]),
    # Its codec has metadata of its own (the precision asked), which the token joins.
    "tfserving": (
        {"GetModelInfo", "GetModelMetadata", "TFPredict"},
        ["--protocol", "tfserving", "--precision", "int8"],
    ),
}


@pytest.mark.parametrize("case", list(LOADTEST_CASES))
@pytest.mark.parametrize("given", ["global flag", "loadtest flag", "environment"])
def test_the_load_generator_sends_the_token_and_keeps_it_out_of_the_report(
    server: RecordingServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    case: str,
    given: str,
) -> None:
    methods, protocol = LOADTEST_CASES[case]
    monkeypatch.delenv("COSTSERVE_TOKEN", raising=False)
    before: list[str] = []
    after: list[str] = []
    if given == "global flag":
        before = ["--token", TOKEN]
    elif given == "loadtest flag":
        after = ["--token", TOKEN]
    else:
        monkeypatch.setenv("COSTSERVE_TOKEN", TOKEN)
    report = tmp_path / "report.json"
    loadtest = ["loadtest", "--requests", "6", "--warmup", "0", "--concurrency", "2", "--inputs", DIGITS]
    argv = ["--target", server.target, *before, *loadtest, *protocol, *after, "--json", str(report)]
    assert main(argv) == 0

    assert server.recorder.authorizations() == {method: _expected(TOKEN) for method in methods}
    if case == "tfserving":
        assert set(server.recorder.values("TFPredict", "x-costserve-precision")) == {"int8"}
    document = json.loads(report.read_text())
    (step,) = document["steps"]
    assert step["requests"] == 6 and step["errors"] == {}
    assert document["settings"]["token"] == "<redacted>"
    output = capsys.readouterr()
    assert TOKEN not in report.read_text() + output.out + output.err


def test_a_load_test_without_a_token_sends_none_and_reports_none(
    server: RecordingServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("COSTSERVE_TOKEN", raising=False)
    report = tmp_path / "report.json"
    loadtest = ["loadtest", "--requests", "3", "--warmup", "0", "--inputs", DIGITS, "--protocol", "tfserving"]
    assert main(["--target", server.target, *loadtest, "--json", str(report)]) == 0
    assert server.recorder.authorizations() == {
        method: {None} for method in ("GetModelInfo", "GetModelMetadata", "TFPredict")
    }
    assert json.loads(report.read_text())["settings"]["token"] is None


def test_the_load_test_settings_hide_the_token() -> None:
    config = LoadtestConfig(token=TOKEN, protocol="tfserving", precision="int8")
    assert TOKEN not in repr(config)
    assert config.metadata == (("authorization", f"Bearer {TOKEN}"),)
    with pytest.raises(ValueError, match="--token") as refused:
        LoadtestConfig(token=f"{TOKEN}\r\n").validate()
    assert TOKEN not in str(refused.value)
