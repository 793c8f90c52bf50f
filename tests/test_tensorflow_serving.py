"""TensorFlow Serving's API through its own client, tensorflow-serving-api, against a real server on port 0.

Answers must equal costserve.v1's for the same images (labels equal, probabilities within
1e-6) for the session's digits model and an imported RGB model, through the same core.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
from conftest import RGB_CLASSES, RGB_SHAPE, RunningServer
from helpers import png
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from costserve.v1 import classifier_pb2 as pb
from costserve.v1 import classifier_pb2_grpc as pb_grpc

DIGIT_SHAPE = (28, 28, 1)


@pytest.fixture
def served(start_server: Callable[..., RunningServer], repository: Path) -> RunningServer:
    return start_server(model_dir=None, model_repository=repository)


@pytest.fixture
def channel(served: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(served.target) as opened:
        yield opened


def _images(shape: tuple[int, ...], count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def _signature(channel: grpc.Channel, model: str) -> Any:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = model
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    return response, signatures.signature_def["serving_default"]


def _predict(
    channel: grpc.Channel, model: str, tensor: Any, precision: str = "fp32", input_key: str = "", **spec: Any
) -> tuple[Any, dict[str, str]]:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for field, value in spec.items():
        if field == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, field, value)
    request.inputs[input_key or next(iter(_signature(channel, model)[1].inputs))].CopyFrom(tensor)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    response, call = stub.Predict.with_call(request, timeout=60, metadata=[("x-costserve-precision", precision)])
    return response, dict(call.trailing_metadata())


def _v1(channel: grpc.Channel, model: str, images: np.ndarray) -> Any:
    request = pb.PredictRequest(model_name=model, precision=pb.PRECISION_FP32, skip_cache=True)
    for image in images:
        request.images.add().pixels.CopyFrom(pb.Pixels(shape=list(image.shape), data=image.tobytes()))
    return pb_grpc.ClassifierStub(channel).Predict(request, timeout=60)


@pytest.mark.parametrize(
    "model, shape, classes, input_key, output_key",
    [("digits", DIGIT_SHAPE, 10, "image", "output_0"), ("shapes", RGB_SHAPE, RGB_CLASSES, None, None)],
)
def test_metadata_and_answers_equal_costserve_v1(
    channel: grpc.Channel,
    model: str,
    shape: tuple[int, int, int],
    classes: int,
    input_key: str | None,
    output_key: str | None,
) -> None:
    metadata, signature = _signature(channel, model)
    assert (metadata.model_spec.name, metadata.model_spec.version.value) == (model, 1)
    assert signature.method_name == "tensorflow/serving/predict"
    ((key, model_input),) = signature.inputs.items()
    ((out_key, model_output),) = signature.outputs.items()
    if input_key is not None:  # the digits SavedModel's own signature names
        assert (key, out_key) == (input_key, output_key)
    assert [dim.size for dim in model_input.tensor_shape.dim] == [-1, *shape]
    assert [dim.size for dim in model_output.tensor_shape.dim] == [-1, classes]

    images = _images(shape, 4, seed=21)
    v1 = _v1(channel, model, images)
    response, trailing = _predict(channel, model, tf.make_tensor_proto(images, dtype=tf.uint8))
    probabilities = tf.make_ndarray(response.outputs[out_key])
    assert probabilities.shape == (4, classes)
    np.testing.assert_allclose(probabilities, [list(p.probabilities) for p in v1.predictions], rtol=0, atol=1e-6)
    assert probabilities.argmax(axis=1).tolist() == [p.label for p in v1.predictions]
    assert (response.model_spec.name, response.model_spec.version.value) == (model, 1)
    assert trailing["x-costserve-precision"] == "fp32" and float(trailing["x-costserve-cost-usd"]) > 0


def test_model_input_floats_strings_and_labels_give_the_same_answer(channel: grpc.Channel) -> None:
    """The RGB model takes [-1, 1] (symmetric scaling): its own floats, PNGs and levels agree."""
    images = _images(RGB_SHAPE, 3, seed=22)
    levels, _ = _predict(channel, "shapes", tf.make_tensor_proto(images, dtype=tf.uint8))
    out_key = next(iter(levels.outputs))
    expected = tf.make_ndarray(levels.outputs[out_key])
    model_input = images.astype(np.float32) / 255 * 2 - 1
    floats, _ = _predict(channel, "shapes", tf.make_tensor_proto(model_input, dtype=tf.float32))
    np.testing.assert_allclose(tf.make_ndarray(floats.outputs[out_key]), expected, rtol=0, atol=1e-5)
    pngs = tf.make_tensor_proto([png(image) for image in images], dtype=tf.string)
    encoded, _ = _predict(channel, "shapes", pngs)
    np.testing.assert_allclose(tf.make_ndarray(encoded.outputs[out_key]), expected, rtol=0, atol=1e-6)
    stable, _ = _predict(channel, "shapes", tf.make_tensor_proto(images, dtype=tf.uint8), version_label="stable")
    np.testing.assert_allclose(tf.make_ndarray(stable.outputs[out_key]), expected, rtol=0, atol=1e-6)


def test_model_status_and_counters(served: RunningServer, channel: grpc.Channel) -> None:
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "digits"
    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status_request, timeout=30)
    assert [(s.version, s.state) for s in status.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    ]
    status_request.model_spec.name = "cats"
    with pytest.raises(grpc.RpcError) as unknown:
        model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status_request, timeout=30)
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
    status_request.model_spec.name = "digits"
    status_request.model_spec.version.value = 9
    with pytest.raises(grpc.RpcError) as missing:
        model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status_request, timeout=30)
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND and "version 9 of model digits" in missing.value.details()
    metadata_request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature"])
    with pytest.raises(grpc.RpcError) as wrong_field:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(metadata_request, timeout=30)
    assert wrong_field.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    _predict(channel, "digits", tf.make_tensor_proto(_images(DIGIT_SHAPE, 1, seed=23), dtype=tf.uint8))
    assert served.metric("costserve_requests_total", {"protocol": "tfserving", "method": "Predict", "code": "OK"}) == 1
    status_counts = {"protocol": "tfserving", "method": "GetModelStatus"}
    assert served.metric("costserve_requests_total", {**status_counts, "code": "OK"}) == 1
    assert served.metric("costserve_requests_total", {**status_counts, "code": "NOT_FOUND"}) == 2
    metadata_counts = {"protocol": "tfserving", "method": "GetModelMetadata", "code": "INVALID_ARGUMENT"}
    assert served.metric("costserve_requests_total", metadata_counts) == 1


@pytest.mark.parametrize(
    "model, key, tensor, spec, status, words",
    [
        ("digits", "pixels", None, {}, "INVALID_ARGUMENT", "input tensor alias not found in signature: pixels"),
        ("cats", "image", None, {}, "NOT_FOUND", "no model named 'cats'"),
        ("digits", "image", None, {"version": 7}, "NOT_FOUND", "no version '7'"),
        ("digits", "image", None, {"version_label": "canary"}, "NOT_FOUND", "no version labelled 'canary'"),
        ("digits", "image", None, {"signature_name": "predict"}, "INVALID_ARGUMENT", 'signature key "predict"'),
        ("digits", "image", np.zeros((1, 28, 28, 1), np.int32), {}, "INVALID_ARGUMENT", "expected DT_FLOAT"),
        ("digits", "image", np.zeros((1, 28, 28), np.uint8)[:, :5], {}, "INVALID_ARGUMENT", "[N, 28, 28, 1]"),
        ("digits", "image", np.full((1, 28, 28, 1), 3.0, np.float32), {}, "INVALID_ARGUMENT", "outside"),
    ],
)
def test_bad_requests_get_the_right_status_and_the_server_keeps_serving(
    served: RunningServer,
    channel: grpc.Channel,
    model: str,
    key: str,
    tensor: np.ndarray | None,
    spec: dict[str, Any],
    status: str,
    words: str,
) -> None:
    good = tf.make_tensor_proto(_images(DIGIT_SHAPE, 1, seed=24), dtype=tf.uint8)
    bad = good if tensor is None else tf.make_tensor_proto(tensor)
    with pytest.raises(grpc.RpcError) as refused:
        _predict(channel, model, bad, input_key=key, **spec)
    assert refused.value.code().name == status
    assert words in refused.value.details(), refused.value.details()
    assert _predict(channel, "digits", good, input_key="image")[0].outputs
    assert served.metric("costserve_requests_total", {"protocol": "tfserving", "code": status}) == 1


def test_messages_of_millions_of_elements_are_refused_from_their_wire_bytes(channel: grpc.Channel) -> None:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.inputs["image"].CopyFrom(tf.make_tensor_proto([b""], dtype=tf.string))
    request.inputs["image"].string_val.extend([b""] * 1_000_000)
    with pytest.raises(grpc.RpcError) as refused:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "more than 64 encoded images" in refused.value.details()
