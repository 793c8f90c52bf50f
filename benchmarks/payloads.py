"""The requests the benchmarks send, and calls that send them as bytes."""

from __future__ import annotations

import time

import grpc
import numpy as np

from benchmarks.launch import REPO_ROOT
from costserve import image_message
from costserve.loadtest.protocols import V2Codec, model_infer_request
from costserve.v1 import classifier_pb2 as pb

DIGIT = REPO_ROOT / "examples" / "digits" / "digit_7.png"
PREDICT = "/costserve.v1.Classifier/Predict"
MODEL_INFER = V2Codec.method
#: Channel options with no message size limit on the client's side (the server's limit is what is tested).
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def digit_pixels() -> np.ndarray:
    """The example digit 7 as uint8 (28, 28): the one image every saturation request sends."""
    from PIL import Image

    with Image.open(DIGIT) as opened:
        return np.asarray(opened.convert("L"), dtype=np.uint8)


def request_bytes(precision: int, skip_cache: bool) -> bytes:
    """A serialized one-image PredictRequest."""
    request = pb.PredictRequest(images=[image_message(digit_pixels())], precision=precision, skip_cache=skip_cache)
    return request.SerializeToString()


def v2_request_bytes(precision: str, skip_cache: bool) -> bytes:
    """A serialized one-image ModelInferRequest: the digit as raw UINT8 ``[1, 28, 28, 1]`` in raw_input_contents."""
    pixels = digit_pixels()
    request = model_infer_request([1, *pixels.shape, 1], "UINT8", precision, skip_cache)
    request.raw_input_contents.append(pixels.tobytes())
    return request.SerializeToString()


def digit_png_request(precision: int = pb.PRECISION_FP32) -> bytes:
    """One 28x28 digit as the example PNG, cache bypassed, serialized: the small call of the reliability parts."""
    return pb.PredictRequest(
        images=[pb.Image(encoded=DIGIT.read_bytes())], precision=precision, skip_cache=True
    ).SerializeToString()


def call_raw(target: str, payload: bytes, timeout_s: float = 30, method: str = PREDICT) -> bytes:
    """Send serialized request bytes to ``method`` (default Predict); return the serialized response.

    Raises on any non-OK status.
    """
    with grpc.insecure_channel(target) as channel:
        return channel.unary_unary(method)(payload, timeout=timeout_s)


def raw_predict(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    """Predict taking and returning bytes."""
    return channel.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)


def timed_call(predict: grpc.UnaryUnaryMultiCallable, payload: bytes, timeout_s: float) -> tuple[str, float]:
    """One call: (status name, seconds it took)."""
    started = time.perf_counter()
    try:
        predict(payload, timeout=timeout_s)
        status = "OK"
    except grpc.RpcError as error:
        status = error.code().name if hasattr(error, "code") and error.code() is not None else "NO_STATUS"
    return status, time.perf_counter() - started
