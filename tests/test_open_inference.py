"""The Open Inference Protocol v2 through its own client, tritonclient, against a real server on port 0.

The same server serves costserve.v1; answers through both must agree (labels equal,
probabilities within 1e-6) for the session's digits model and an imported RGB model,
and share one cache, one price and one set of counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from conftest import RGB_CLASSES, RGB_SHAPE, RunningServer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import png
from tritonclient.utils import InferenceServerException

from costserve.protocols import inference_pb2 as v2
from costserve.protocols import inference_pb2_grpc as v2_grpc
from costserve.v1 import classifier_pb2 as pb
from costserve.v1 import classifier_pb2_grpc as pb_grpc

DIGIT_SHAPE = (28, 28, 1)


def _digits(count: int, seed: int = 0) -> np.ndarray:
    """``count`` distinct 28x28x1 uint8 images (seeded noise: never met by another test's cache)."""
    return np.random.default_rng(seed).integers(0, 256, (count, *DIGIT_SHAPE), dtype=np.uint8)


@pytest.fixture
def served(start_server: Callable[..., RunningServer], repository: Path) -> RunningServer:
    """A server of the shared repository: digits and the imported RGB ``shapes``."""
    return start_server(model_dir=None, model_repository=repository)


@pytest.fixture
def triton_client(served: RunningServer) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=served.target)
    yield client
    client.close()


def _v1_answers(server: RunningServer, model: str, images: np.ndarray) -> pb.PredictResponse:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        request = pb.PredictRequest(model_name=model, precision=pb.PRECISION_FP32, skip_cache=True)
        for image in images:
            request.images.add().pixels.CopyFrom(
                pb.Pixels(shape=list(image.shape), dtype=pb.DTYPE_UINT8, data=image.tobytes())
            )
        return stub.Predict(request, timeout=60)


def _infer(
    client: triton.InferenceServerClient,
    model: str,
    images: np.ndarray,
    datatype: str = "UINT8",
    outputs: list[triton.InferRequestedOutput] | None = None,
    **parameters: Any,
) -> Any:
    tensor = triton.InferInput("images", list(images.shape), datatype)
    tensor.set_data_from_numpy(images)
    return client.infer(model, [tensor], outputs=outputs, parameters=parameters or None, client_timeout=60)


@pytest.mark.parametrize("model, shape, classes", [("digits", DIGIT_SHAPE, 10), ("shapes", RGB_SHAPE, RGB_CLASSES)])
def test_answers_equal_costserve_v1_for_the_same_images(
    served: RunningServer, triton_client: triton.InferenceServerClient, model: str, shape: tuple, classes: int
) -> None:
    images = np.random.default_rng(11).integers(0, 256, (5, *shape), dtype=np.uint8)
    v1 = _v1_answers(served, model, images)
    result = _infer(triton_client, model, images, precision="fp32", skip_cache=True)

    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (5, classes) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, [list(p.probabilities) for p in v1.predictions], rtol=0, atol=1e-6)
    assert result.as_numpy("classes").tolist() == [p.label for p in v1.predictions]
    assert [name.decode() for name in result.as_numpy("labels")] == [p.label_name for p in v1.predictions]
    response = result.get_response()
    assert (response.model_name, response.model_version) == (model, "1")
    parameters = response.parameters
    assert parameters["precision"].string_param == "fp32"
    assert parameters["cache_hits"].int64_param == 0
    assert parameters["decision_reason"].string_param == "requested"
    assert parameters["cost_usd"].double_param > 0


def test_server_and_model_metadata_describe_the_real_tensors(
    served: RunningServer, triton_client: triton.InferenceServerClient
) -> None:
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready("digits") and triton_client.is_model_ready("shapes", "1")
    assert not triton_client.is_model_ready("cats") and not triton_client.is_model_ready("digits", "9")
    server_metadata = triton_client.get_server_metadata()
    assert server_metadata.name == "costserve" and "classification" in server_metadata.extensions

    metadata = triton_client.get_model_metadata("shapes")
    assert (metadata.name, list(metadata.versions), metadata.platform) == ("shapes", ["1"], "costserve")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("images", "UINT8", [-1, *RGB_SHAPE])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("probabilities", "FP32", [-1, RGB_CLASSES]),
        ("labels", "BYTES", [-1]),
        ("classes", "INT64", [-1]),
    ]
    index = triton_client.get_model_repository_index()
    assert sorted((m.name, m.version, m.state) for m in index.models) == [
        ("digits", "1", "READY"),
        ("shapes", "1", "READY"),
    ]
    with pytest.raises(InferenceServerException) as unknown:
        triton_client.get_model_metadata("cats")
    assert unknown.value.status() == "StatusCode.NOT_FOUND" and "'cats'" in unknown.value.message()


def test_every_input_form_gives_the_same_answer(
    served: RunningServer, triton_client: triton.InferenceServerClient
) -> None:
    """[N,H,W,C], [N,H,W], [H,W,C], FP32 in [0, 1], BYTES of PNGs, and typed contents: one answer."""
    images = _digits(3, seed=12)
    expected = _infer(triton_client, "digits", images, precision="fp32").as_numpy("probabilities")

    def same(result: Any, rows: slice = slice(None)) -> None:
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected[rows], rtol=0, atol=1e-6)

    same(_infer(triton_client, "digits", images[..., 0], precision="fp32"))
    same(_infer(triton_client, "digits", images[0], precision="fp32"), slice(0, 1))
    same(_infer(triton_client, "digits", images.astype(np.float32) / 255, "FP32", precision="fp32"))
    encoded = np.array([png(image) for image in images], dtype=np.object_)
    same(_infer(triton_client, "digits", encoded, "BYTES", precision="fp32"))

    typed = v2.ModelInferRequest(model_name="digits")
    typed.parameters["precision"].string_param = "fp32"
    tensor = typed.inputs.add(name="images", datatype="UINT8", shape=list(images.shape))
    tensor.contents.uint_contents.extend(images.ravel().tolist())
    with grpc.insecure_channel(served.target) as channel:
        response = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(typed, timeout=60)
    assert not response.raw_output_contents  # typed in, typed out
    outputs = {output.name: output for output in response.outputs}
    np.testing.assert_allclose(
        np.reshape(outputs["probabilities"].contents.fp32_contents, (3, 10)), expected, rtol=0, atol=1e-6
    )
    assert list(outputs["classes"].contents.int64_contents) == expected.argmax(axis=1).tolist()


def test_top_k_and_the_classification_extension(
    served: RunningServer, triton_client: triton.InferenceServerClient
) -> None:
    images = _digits(2, seed=13)
    full = _infer(triton_client, "digits", images, precision="fp32").as_numpy("probabilities")
    order = np.argsort(-full, axis=1, kind="stable")[:, :3]

    top = _infer(triton_client, "digits", images, precision="fp32", top_k=3)
    assert top.as_numpy("classes").tolist() == order.tolist()
    np.testing.assert_allclose(top.as_numpy("probabilities"), np.take_along_axis(full, order, axis=1), atol=1e-6)

    requested = [triton.InferRequestedOutput("probabilities", class_count=2), triton.InferRequestedOutput("labels")]
    classified = _infer(triton_client, "digits", images, outputs=requested, precision="fp32")
    assert classified.as_numpy("classes") is None  # only what was asked for
    entries = classified.as_numpy("probabilities")
    assert entries.shape == (2, 2)
    for row, image_entries in enumerate(entries):
        for rank, entry in enumerate(image_entries):
            score, index, label = entry.decode().split(":")
            assert int(index) == order[row, rank] and label == str(order[row, rank])
            assert float(score) == pytest.approx(full[row, order[row, rank]], abs=1e-6)


def test_one_cache_one_price_and_counters_by_protocol(
    served: RunningServer, triton_client: triton.InferenceServerClient
) -> None:
    """An image costserve.v1 answered is a cache hit through v2; calls are counted under their protocol."""
    image = _digits(1, seed=14)
    with grpc.insecure_channel(served.target) as channel:
        request = pb.PredictRequest(images=[pb.Image(pixels=pb.Pixels(shape=[28, 28, 1], data=image.tobytes()))])
        v1 = pb_grpc.ClassifierStub(channel).Predict(request, timeout=60)
    assert not v1.predictions[0].cache_hit
    hit = _infer(triton_client, "digits", image).get_response()
    assert hit.parameters["cache_hits"].int64_param == 1
    assert hit.parameters["decision_reason"].string_param == "cache"
    assert served.metric("costserve_requests_total", {"protocol": "v2", "method": "ModelInfer", "code": "OK"}) == 1
    assert served.metric("costserve_requests_total", {"protocol": "v1", "method": "Predict", "code": "OK"}) == 1
    assert served.metric("costserve_images_total", {"model": "digits", "cache": "hit"}) == 1


@pytest.mark.parametrize(
    "change, status, words",
    [
        (lambda r: setattr(r.inputs[0], "datatype", "INT32"), "INVALID_ARGUMENT", "expected UINT8, FP32 or BYTES"),
        (lambda r: r.inputs[0].shape.__setitem__(0, 3), "INVALID_ARGUMENT", "needs 2352"),
        (lambda r: r.inputs[0].shape.__setitem__(slice(None), [784]), "INVALID_ARGUMENT", "[N, 28, 28, 1]"),
        (lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 10), "INVALID_ARGUMENT", "holds 10 bytes"),
        (lambda r: setattr(r.inputs[0], "name", "image"), "INVALID_ARGUMENT", "one input, 'images'"),
        (lambda r: r.inputs.pop(), "INVALID_ARGUMENT", "the request has none"),
        (lambda r: setattr(r, "model_name", "cats"), "NOT_FOUND", "no model named 'cats'"),
        (lambda r: setattr(r, "model_version", "7"), "NOT_FOUND", "no version '7'"),
        (lambda r: r.outputs.add(name="logits"), "INVALID_ARGUMENT", "unknown output 'logits'"),
        (lambda r: r.parameters["top_k"].CopyFrom(v2.InferParameter(string_param="3")), "INVALID_ARGUMENT", "int64"),
        (lambda r: r.parameters["precison"].CopyFrom(v2.InferParameter()), "INVALID_ARGUMENT", "'precision'?"),
        (
            lambda r: r.parameters["precision"].CopyFrom(v2.InferParameter(string_param="fp16")),
            "INVALID_ARGUMENT",
            "expected auto, fp32 or int8",
        ),
        (
            lambda r: r.parameters["min_accuracy"].CopyFrom(v2.InferParameter(string_param="high")),
            "INVALID_ARGUMENT",
            "expected a number",
        ),
        (
            lambda r: (r.inputs[0].shape.__setitem__(0, 65), r.raw_input_contents.__setitem__(0, b"\0" * 65 * 784)),
            "INVALID_ARGUMENT",
            "at most 64",
        ),
    ],
)
def test_bad_requests_get_the_right_status_and_the_server_keeps_serving(
    served: RunningServer, change: Callable[[Any], Any], status: str, words: str
) -> None:
    request = v2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 28, 28, 1])
    request.raw_input_contents.append(_digits(1, seed=15).tobytes())
    good = v2.ModelInferRequest()
    good.CopyFrom(request)
    change(request)
    with grpc.insecure_channel(served.target) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, timeout=30)
        assert refused.value.code().name == status
        assert words in refused.value.details(), refused.value.details()
        assert stub.ModelInfer(good, timeout=30).outputs[0].name == "probabilities"
    assert served.metric("costserve_requests_total", {"protocol": "v2", "code": status}) == 1


def test_health_and_reflection_cover_the_protocols(served: RunningServer) -> None:
    with grpc.insecure_channel(served.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = health.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        (listing,) = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        services = {service.name for service in listing.list_services_response.service}
        standard = {
            "inference.GRPCInferenceService",
            "tensorflow.serving.PredictionService",
            "tensorflow.serving.ModelService",
        }
        assert {"costserve.v1.Classifier", *standard} <= services
        for service in standard:
            check = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.SERVING, service
        (described,) = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")]),
            timeout=10,
        )
        assert described.file_descriptor_response.file_descriptor_proto


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda r: r.inputs[0].contents.bytes_contents.extend([b""] * 1_000_000), "more than 64 encoded images"),
        (lambda r: r.inputs.extend([v2.ModelInferRequest.InferInputTensor()] * 3000), "more than 64 fields"),
        (lambda r: r.outputs.extend([v2.ModelInferRequest.InferRequestedOutputTensor()] * 3000), "more than 64 fields"),
        (lambda r: r.raw_input_contents.extend([b"\0" * 4] * 100), "holds more than 64 elements"),
        (
            lambda r: r.inputs.extend([v2.ModelInferRequest.InferInputTensor(name="x" * 300)] * 20),
            "more than 8 inputs",
        ),
    ],
)
def test_messages_of_millions_of_elements_are_refused_from_their_wire_bytes(
    served: RunningServer, build: Callable[[Any], Any], words: str
) -> None:
    """Counted before the message is parsed (or, for raw BYTES, as its elements are read): never converted."""
    request = v2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="images", datatype="BYTES", shape=[1])
    build(request)
    if len(request.raw_input_contents) > 1:  # one raw tensor of 100 empty elements
        request.raw_input_contents[:] = [b"\0\0\0\0" * 100]
        request.inputs[0].shape[:] = [100]
    with grpc.insecure_channel(served.target) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, timeout=30)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert words in refused.value.details(), refused.value.details()


@pytest.mark.parametrize("count, request_id", [(1, ""), (3, "call-7")])
def test_the_assembled_answer_is_the_message_built_answer(count: int, request_id: str) -> None:
    """The common answer's wire bytes, assembled from cached pieces, parse to the message built field by field."""
    from costserve.server.domain import ImagePrediction, Precision, PredictionResult
    from costserve.server.open_inference import answer_bytes, cost_bytes, response_to_proto

    rows = np.random.default_rng(16).random((count, 10)).astype(np.float32)
    predictions = [ImagePrediction.of(row, Precision.INT8, index == 0, 4) for index, row in enumerate(rows)]
    result = PredictionResult(
        predictions, "3", 0.001, "digits", [f"class {i}" for i in range(10)], decision_reason="cache", cache_hits=1
    )
    request = v2.ModelInferRequest(model_name="digits", id=request_id)
    request.inputs.add(name="images", datatype="UINT8", shape=[count, 28, 28, 1])
    request.raw_input_contents.append(_digits(count, seed=17).tobytes())

    assembled = v2.ModelInferResponse.FromString(answer_bytes(request, result) + cost_bytes(2.5e-7))
    built = response_to_proto(request, result)
    built.parameters["cost_usd"].double_param = 2.5e-7
    assert assembled == built
    assert assembled.id == request_id and assembled.parameters["cost_usd"].double_param == 2.5e-7
