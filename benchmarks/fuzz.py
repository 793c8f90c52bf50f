"""Property-based fuzzing of every RPC a costserve server exposes, through real gRPC.

Hypothesis strategies build requests for every field of every RPC:

- ``costserve.v1.Classifier/Predict`` and ``PredictStream``: images as ``encoded`` bytes
  (random bytes; valid, truncated, corrupted and huge-dimension PNG and JPEG files made
  with Pillow; empty) and as ``pixels`` (shapes that are right, wrong, huge, negative or
  long; known and unknown dtype values; data of the right and wrong length, floats
  including NaN and infinities); precisions known and unknown; ``skip_cache``;
  ``min_accuracy`` and ``max_cost_usd`` including NaN, infinities and negatives; no
  images, many images; and the same requests mutated at the wire level (truncated,
  bytes flipped, unknown fields appended);
- ``GetModelInfo``: the empty request, and requests carrying unknown fields;
- the Open Inference Protocol v2's ``ModelInfer``: inputs of every name, datatype and
  shape (right, wrong, negative, huge), raw contents of the right and wrong length and
  typed contents, requested outputs and parameters of every name and type, also
  mutated at the wire level; ``ModelMetadata`` and ``ModelReady`` for any model name;
- TensorFlow Serving's ``Predict``: model specs (names, versions, labels, signatures),
  inputs of any name, dtype and shape, values in ``tensor_content`` and the typed fields,
  output filters; ``GetModelMetadata`` and ``GetModelStatus`` for any model;
- ``grpc.health.v1.Health/Check`` and ``Watch``: random service names;
- raw garbage bytes sent to every method, reflection included, with identity
  serializers, so the server receives bytes no protobuf parser accepts;
- a few deliberate extremes: messages over the server's 16 MiB limit, a message of
  ~4 million empty images (and its v2 and TF Serving twins: millions of empty encoded
  images in one tensor), a 6000x6000 PNG.

:func:`run_fuzz` sends them, each with a deadline, and tallies the status codes per
RPC. The rule: no ``INTERNAL`` and no ``UNKNOWN``, ever, every call ends with a
status, and the server still answers a valid ``Predict`` afterwards.

::

    from benchmarks.fuzz import run_fuzz

    report = run_fuzz("127.0.0.1:50051", cases=500, seed=1)
    print(report.statuses, report.passed)
"""

from __future__ import annotations

import io
import math
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from PIL import Image

from benchmarks.payloads import DIGIT, PREDICT, UNLIMITED, digit_png_request
from costserve.protocols import inference_pb2 as v2
from costserve.protocols import tensorflow_pb2 as tf_pb
from costserve.protocols import tensorflow_serving_pb2 as tfs
from costserve.v1 import classifier_pb2 as pb

#: The server's default --max-message-bytes; a few deliberate cases go over it.
SERVER_MESSAGE_LIMIT = 16 * 1024 * 1024
#: Statuses that mean the server failed on its own input handling: never allowed.
FORBIDDEN = ("INTERNAL", "UNKNOWN")
#: Deadline of each fuzz call, in seconds: long enough for any request the limits allow.
CALL_DEADLINE_S = 10.0
#: Health/Watch never ends by itself: its calls end at this deadline (DEADLINE_EXCEEDED is its normal end).
WATCH_DEADLINE_S = 0.2
#: Deadline of the deliberate extreme cases, in seconds.
EXTREME_DEADLINE_S = 60.0
#: How many failing cases the report keeps, with their description and the server's message.
KEPT_FAILURES = 20
#: The default model's input side: valid raw pixels are (28, 28[, c]).
INPUT_SIDE = 28

METHODS: dict[str, tuple[str, str]] = {
    # rpc name -> (method path, arity: unary_unary | stream_stream | unary_stream)
    "Predict": (PREDICT, "unary_unary"),
    "PredictStream": ("/costserve.v1.Classifier/PredictStream", "stream_stream"),
    "GetModelInfo": ("/costserve.v1.Classifier/GetModelInfo", "unary_unary"),
    "Health.Check": ("/grpc.health.v1.Health/Check", "unary_unary"),
    "Health.Watch": ("/grpc.health.v1.Health/Watch", "unary_stream"),
    "Reflection": ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "stream_stream"),
    "v2.ModelInfer": ("/inference.GRPCInferenceService/ModelInfer", "unary_unary"),
    "v2.ModelMetadata": ("/inference.GRPCInferenceService/ModelMetadata", "unary_unary"),
    "v2.ModelReady": ("/inference.GRPCInferenceService/ModelReady", "unary_unary"),
    "tfs.Predict": ("/tensorflow.serving.PredictionService/Predict", "unary_unary"),
    "tfs.GetModelMetadata": ("/tensorflow.serving.PredictionService/GetModelMetadata", "unary_unary"),
    "tfs.GetModelStatus": ("/tensorflow.serving.ModelService/GetModelStatus", "unary_unary"),
}
#: Share of the cases each kind of case gets (structured requests per RPC, and garbage per method).
CASE_SHARES: dict[str, float] = {
    "Predict": 0.20,
    "PredictStream": 0.08,
    "Predict wire-mutated": 0.06,
    "GetModelInfo": 0.03,
    "Health.Check": 0.03,
    "Health.Watch": 0.02,
    "v2.ModelInfer": 0.14,
    "v2.ModelInfer wire-mutated": 0.04,
    "v2.ModelMetadata": 0.02,
    "tfs.Predict": 0.10,
    "tfs.GetModelMetadata": 0.02,
    "garbage": 0.26,
}


@dataclass(frozen=True)
class FuzzCase:
    """One call: the RPC, the serialized messages it sends, and what they are (for the report)."""

    rpc: str
    messages: tuple[bytes, ...]
    description: str
    deadline_s: float = CALL_DEADLINE_S

    @property
    def over_limit(self) -> bool:
        """True when a message exceeds the server's message limit (gRPC refuses it before any handler runs)."""
        return any(len(message) > SERVER_MESSAGE_LIMIT for message in self.messages)

    def __repr__(self) -> str:  # hypothesis prints cases; the bytes may be megabytes
        sizes = ",".join(str(len(message)) for message in self.messages[:4])
        return f"FuzzCase({self.rpc}, {self.description}, bytes=[{sizes}{',...' if len(self.messages) > 4 else ''}])"


@dataclass
class FuzzReport:
    """What :func:`run_fuzz` sent and what came back."""

    target: str
    seed: int
    #: Status names per RPC, for every fuzz case (the final check is separate).
    statuses: dict[str, Counter] = field(default_factory=dict)
    #: Of those, the cases with a message over the server's message limit, per RPC.
    over_limit: dict[str, Counter] = field(default_factory=dict)
    #: Cases per kind of case (structured Predict, garbage, extremes, ...).
    kinds: Counter = field(default_factory=Counter)
    #: Cases that got a forbidden status or none: (rpc, status, description, server message).
    failures: list[tuple[str, str, str, str]] = field(default_factory=list)
    #: Every forbidden or missing status, also those past KEPT_FAILURES.
    failure_count: int = 0
    #: Status of the valid Predict sent after the fuzzing.
    final_predict: str = "not sent"
    #: Slowest case: (seconds, rpc, description, status).
    slowest: tuple[float, str, str, str] = (0.0, "", "", "")
    seconds: float = 0.0

    @property
    def cases(self) -> int:
        """Fuzz cases sent (every one a gRPC call)."""
        return sum(sum(counts.values()) for counts in self.statuses.values())

    def count(self, status: str) -> int:
        """Cases, over every RPC, that ended with ``status``."""
        return sum(counts.get(status, 0) for counts in self.statuses.values())

    @property
    def forbidden(self) -> int:
        """Cases that ended INTERNAL or UNKNOWN."""
        return sum(self.count(status) for status in FORBIDDEN)

    @property
    def without_status(self) -> int:
        """Cases that ended without a gRPC status (the client failed otherwise)."""
        return self.count("NO_STATUS")

    @property
    def passed(self) -> bool:
        """No INTERNAL or UNKNOWN, every case got a status, and a valid Predict was answered afterwards."""
        return self.forbidden == 0 and self.without_status == 0 and self.final_predict == "OK"

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for JSON."""
        return {
            "target": self.target,
            "seed": self.seed,
            "cases": self.cases,
            "statuses": {rpc: dict(sorted(counts.items())) for rpc, counts in self.statuses.items()},
            "over_limit": {rpc: dict(sorted(counts.items())) for rpc, counts in self.over_limit.items() if counts},
            "kinds": dict(sorted(self.kinds.items())),
            "forbidden": self.forbidden,
            "without_status": self.without_status,
            "failure_count": self.failure_count,
            "failures": [list(failure) for failure in self.failures],
            "final_predict": self.final_predict,
            "slowest": list(self.slowest),
            "seconds": self.seconds,
            "passed": self.passed,
        }


# --------------------------------------------------------------------------- encoded images


def encode_image(image: Image.Image, image_format: str) -> bytes:
    """``image`` as PNG or JPEG bytes."""
    buffer = io.BytesIO()
    if image_format == "JPEG" and image.mode not in ("L", "RGB", "CMYK"):
        image = image.convert("RGB")
    try:
        image.save(buffer, format=image_format)
    except OSError:  # a mode the format cannot store (e.g. "F" or "CMYK" as PNG)
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format=image_format)
    return buffer.getvalue()


def with_png_size(png: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` (CRC fixed), its pixel data unchanged."""
    header = png[12:16] + struct.pack(">II", width, height) + png[24:29]
    return png[:8] + png[8:12] + header + struct.pack(">I", zlib.crc32(header)) + png[33:]


def with_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF0/SOF2) declares ``width`` x ``height``, its scan data unchanged."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = jpeg.find(marker)
        if at >= 0:
            return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]
    return jpeg


def large_png(width: int, height: int, noise_bytes: int = 0, seed: int = 0) -> bytes:
    """A grayscale PNG of ``width`` x ``height``: black, but for about ``noise_bytes`` random pixels at the top.

    Noise does not compress, so ``noise_bytes`` sets the file's size; the rest costs the
    decoder its full width x height all the same.
    """
    pixels = np.zeros((height, width), dtype=np.uint8)
    noise_rows = min(height, math.ceil(noise_bytes / max(width, 1)))
    if noise_rows:
        pixels[:noise_rows] = np.random.default_rng(seed).integers(0, 256, (noise_rows, width), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@st.composite
def pillow_images(draw: st.DrawFn) -> Image.Image:
    """A small image in any common mode, of random size and content."""
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "LA", "P", "1", "I", "I;16", "F", "CMYK"]))
    width = draw(st.integers(1, 64))
    height = draw(st.integers(1, 64))
    levels = np.frombuffer(draw(st.binary(min_size=1, max_size=64)), dtype=np.uint8)
    # Tile the drawn levels over the image: random content without drawing every pixel.
    gray = Image.fromarray(np.resize(levels, (height, width)))
    try:
        return gray.convert(mode)
    except ValueError:  # Pillow converts "L" to most modes, not all
        return gray


@st.composite
def encoded_bytes(draw: st.DrawFn) -> tuple[bytes, str]:
    """``Image.encoded`` contents and what they are."""
    kind = draw(
        st.sampled_from(["valid", "truncated", "corrupted", "huge header", "random", "empty", "magic + garbage"])
    )
    if kind == "empty":
        return b"", "encoded: empty"
    if kind == "random":
        return draw(st.binary(max_size=512)), "encoded: random bytes"
    if kind == "magic + garbage":
        magic = draw(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"RIFF"]))
        return magic + draw(st.binary(max_size=256)), f"encoded: {magic[:4]!r} + garbage"
    image_format = draw(st.sampled_from(["PNG", "JPEG"]))
    data = encode_image(draw(pillow_images()), image_format)
    if kind == "valid":
        return data, f"encoded: valid {image_format}"
    if kind == "truncated":
        cut = draw(st.integers(0, max(len(data) - 1, 0)))
        return data[:cut], f"encoded: {image_format} truncated at {cut} of {len(data)}"
    if kind == "corrupted":
        at = draw(st.integers(0, len(data) - 1))
        flip = draw(st.integers(1, 255))
        return data[:at] + bytes([data[at] ^ flip]) + data[at + 1 :], f"encoded: {image_format} byte {at} flipped"
    limit = 0xFFFF if image_format == "JPEG" else 0x7FFFFFFF
    sides = st.one_of(st.integers(0, limit), st.sampled_from([0, 1, 6000, 40_000, limit]))
    width, height = draw(sides), draw(sides)
    resized = with_png_size(data, width, height) if image_format == "PNG" else with_jpeg_size(data, width, height)
    return resized, f"encoded: {image_format} declaring {width}x{height}"


# --------------------------------------------------------------------------- raw pixels

INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
SHAPES = st.one_of(
    st.sampled_from([[INPUT_SIDE, INPUT_SIDE], [INPUT_SIDE, INPUT_SIDE, 1], [INPUT_SIDE, INPUT_SIDE, 3],
                     [INPUT_SIDE, INPUT_SIDE, 4], [INPUT_SIDE, INPUT_SIDE, 2], [INPUT_SIDE, INPUT_SIDE, 1, 1]]),
    st.lists(st.integers(-3, 64), max_size=5),
    st.lists(INT64, max_size=6),
    st.lists(st.sampled_from([0, -1, 2**31, 2**62, 2**63 - 1, -(2**63)]), min_size=1, max_size=4),
    st.lists(st.integers(0, 3), min_size=50, max_size=400),
)  # fmt: skip
SPECIAL_FLOATS = st.sampled_from([0.0, 0.5, 1.0, -0.0, -1.0, 1.5, math.nan, math.inf, -math.inf, 1e-45, 3.4e38])


@st.composite
def pixels_messages(draw: st.DrawFn) -> tuple[pb.Pixels, str]:
    """An ``Image.pixels`` message and what it is."""
    shape = draw(SHAPES)
    dtype = draw(st.one_of(st.sampled_from([pb.DTYPE_UINT8, pb.DTYPE_FLOAT32]), INT32))
    itemsize = 4 if dtype == pb.DTYPE_FLOAT32 else 1
    elements = math.prod(shape) if all(side >= 0 for side in shape) else -1
    data_kind = draw(st.sampled_from(["matching", "matching", "off by some", "random"]))
    if data_kind != "random" and 0 <= elements <= INPUT_SIDE * INPUT_SIDE * 4:
        size = elements * itemsize
        if data_kind == "off by some":
            size = max(0, size + draw(st.sampled_from([-4, -1, 1, 3, 4, 1000])))
        if dtype == pb.DTYPE_FLOAT32:
            palette = np.array(draw(st.lists(SPECIAL_FLOATS | st.floats(width=32), min_size=1, max_size=8)), "<f4")
            data = np.resize(palette, math.ceil(size / 4)).tobytes()[:size]
        else:
            data = np.resize(np.frombuffer(draw(st.binary(min_size=1, max_size=32)), np.uint8), size).tobytes()
    else:
        data_kind = "random"
        data = draw(st.binary(max_size=256))
    shown = shape if len(shape) <= 6 else f"{len(shape)} sides"
    return pb.Pixels(shape=shape, dtype=dtype, data=data), f"pixels: shape {shown}, dtype {dtype}, data {data_kind}"


@st.composite
def valid_pixels(draw: st.DrawFn) -> tuple[pb.Pixels, str]:
    """Raw pixels the default model accepts: 28x28 with 1, 3 or 4 channels, uint8 or floats in [0, 1]."""
    shape = draw(st.sampled_from([[INPUT_SIDE, INPUT_SIDE], [INPUT_SIDE, INPUT_SIDE, 1], [INPUT_SIDE, INPUT_SIDE, 3],
                                  [INPUT_SIDE, INPUT_SIDE, 4]]))  # fmt: skip
    elements = math.prod(shape)
    if draw(st.booleans()):
        levels = np.frombuffer(draw(st.binary(min_size=1, max_size=64)), np.uint8)
        return pb.Pixels(
            shape=shape, dtype=pb.DTYPE_UINT8, data=np.resize(levels, elements).tobytes()
        ), f"valid uint8 {shape}"
    palette = np.array(draw(st.lists(st.floats(0, 1, width=32), min_size=1, max_size=16)), "<f4")
    return pb.Pixels(
        shape=shape, dtype=pb.DTYPE_FLOAT32, data=np.resize(palette, elements).tobytes()
    ), f"valid float32 {shape}"


@st.composite
def image_messages(draw: st.DrawFn, sane: bool = False) -> tuple[pb.Image, str]:
    """An ``Image`` with ``encoded``, ``pixels`` or neither set; ``sane``: one the server should accept."""
    if sane:
        if draw(st.booleans()):
            image_format = draw(st.sampled_from(["PNG", "JPEG"]))
            return pb.Image(encoded=encode_image(draw(pillow_images()), image_format)), f"valid {image_format}"
        pixels, description = draw(valid_pixels())
        return pb.Image(pixels=pixels), description
    kind = draw(st.sampled_from(["encoded", "pixels", "pixels", "unset"]))
    if kind == "encoded":
        data, description = draw(encoded_bytes())
        return pb.Image(encoded=data), description
    if kind == "pixels":
        pixels, description = draw(pixels_messages())
        return pb.Image(pixels=pixels), description
    return pb.Image(), "image with no data"


# --------------------------------------------------------------------------- requests

PRECISIONS = st.one_of(st.sampled_from([pb.PRECISION_AUTO, pb.PRECISION_FP32, pb.PRECISION_INT8]), INT32)
ACCURACY_FLOORS = st.one_of(st.just(0.0), st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True))
COST_CEILINGS = st.one_of(st.just(0.0), st.floats(0, 1e-3), st.floats(allow_nan=True, allow_infinity=True))


@st.composite
def predict_requests(draw: st.DrawFn) -> tuple[pb.PredictRequest, str]:
    """A PredictRequest with every field drawn, and what it is.

    Half are sane (valid images, known precision, no constraint beyond a sensible
    accuracy floor), so that the fuzzing also reaches decoding, batching, the cache
    and pricing; the other half draw every field from everything it can hold.
    """
    sane = draw(st.booleans())
    count_kind = "some" if sane else draw(st.sampled_from(["some", "some", "some", "none", "too many"]))
    images: list[pb.Image] = []
    descriptions: list[str] = []
    if count_kind == "some":
        for image, description in draw(st.lists(image_messages(sane), min_size=1, max_size=4)):
            images.append(image)
            descriptions.append(description)
    elif count_kind == "too many":
        image, description = draw(image_messages())
        count = draw(st.integers(65, 80))
        images = [image] * count
        descriptions = [f"{count} x {description}"]
    if sane:
        precision = draw(st.sampled_from([pb.PRECISION_AUTO, pb.PRECISION_FP32, pb.PRECISION_INT8]))
        min_accuracy, max_cost_usd = draw(st.sampled_from([0.0, 0.5])), 0.0
    else:
        precision, min_accuracy, max_cost_usd = draw(PRECISIONS), draw(ACCURACY_FLOORS), draw(COST_CEILINGS)
    request = pb.PredictRequest(
        images=images,
        precision=precision,
        skip_cache=draw(st.booleans()),
        min_accuracy=min_accuracy,
        max_cost_usd=max_cost_usd,
    )
    summary = "; ".join(descriptions[:3]) or "no images"
    return request, (
        f"{'sane' if sane else 'any'}: {summary}; precision {request.precision}, skip_cache {request.skip_cache}, "
        f"min_accuracy {request.min_accuracy!r}, max_cost_usd {request.max_cost_usd!r}"
    )


@st.composite
def unknown_fields(draw: st.DrawFn) -> bytes:
    """Well-formed protobuf fields with numbers a message does not define (parsers keep and skip them)."""
    parts = []
    for number, wire_type in draw(
        st.lists(st.tuples(st.integers(6, 2**29 - 1), st.sampled_from([0, 1, 2, 5])), max_size=4)
    ):
        key = encode_varint((number << 3) | wire_type)
        if wire_type == 0:
            parts.append(key + encode_varint(draw(st.integers(0, 2**64 - 1))))
        elif wire_type == 1:
            parts.append(key + draw(st.binary(min_size=8, max_size=8)))
        elif wire_type == 5:
            parts.append(key + draw(st.binary(min_size=4, max_size=4)))
        else:
            payload = draw(st.binary(max_size=64))
            parts.append(key + encode_varint(len(payload)) + payload)
    return b"".join(parts)


def encode_varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative integer."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@st.composite
def mutated_wire(draw: st.DrawFn, messages: st.SearchStrategy[tuple[Any, str]]) -> tuple[bytes, str]:
    """A message serialized, then truncated, flipped, spliced with random bytes or given unknown fields."""
    message, description = draw(messages)
    data = message.SerializeToString()
    how = draw(st.sampled_from(["truncated", "byte flipped", "bytes inserted", "unknown fields", "repeated"]))
    if how == "truncated" and data:
        cut = draw(st.integers(0, len(data) - 1))
        data = data[:cut]
    elif how == "byte flipped" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    elif how == "bytes inserted":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
    elif how == "unknown fields":
        data = data + draw(unknown_fields())
    else:
        # Concatenated messages merge: repeated fields add up, scalars take the last value.
        data = data * draw(st.integers(2, 4))
    return data, f"wire {how}: {description}"


# --------------------------------------------------------------------------- the standard protocols

#: Model names: the served one, unknown ones, and odd strings.
MODEL_NAMES = st.one_of(
    st.sampled_from(["", "digits", "cats", "digits ", "DIGITS"]),
    st.binary(max_size=32).map(lambda raw: raw.decode("latin-1")),
)
VERSIONS = st.sampled_from(["", "1", "2", "0", "-1", "latest", "99999999999999999999"])
#: Tensor shapes: the model's, its variants, and wrong, empty, negative and huge ones.
TENSOR_SHAPES = st.one_of(
    st.sampled_from([[1, 28, 28, 1], [2, 28, 28, 1], [28, 28, 1], [3, 28, 28], [1, 28, 28, 3], [1], [2], [1, 1]]),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=6),
    st.lists(st.integers(0, 70), min_size=1, max_size=5),
)
#: GetModelMetadata's metadata_field: the one there is (most often), none, and others.
METADATA_FIELDS = st.sampled_from([["signature_def"], ["signature_def"], [], ["x"], ["signature_def", ""]])
V2_DATATYPES = st.sampled_from(["UINT8", "FP32", "BYTES", "INT32", "FP16", "", "uint8", "STRING"])


@st.composite
def infer_parameters(draw: st.DrawFn) -> dict[str, Any]:
    """Request parameters: costserve's options in right and wrong types, misspelt ones and a client's own."""
    names = st.sampled_from(
        ["precision", "skip_cache", "min_accuracy", "max_cost_usd", "top_k", "precison", "priority", "timeout", "x"]
    )
    values = st.one_of(
        st.builds(lambda v: v2.InferParameter(string_param=v), st.sampled_from(["auto", "fp32", "int8", "fp16", ""])),
        st.builds(lambda v: v2.InferParameter(bool_param=v), st.booleans()),
        st.builds(lambda v: v2.InferParameter(int64_param=v), st.integers(-(2**63), 2**63 - 1)),
        st.builds(lambda v: v2.InferParameter(double_param=v), st.floats(allow_nan=True, allow_infinity=True)),
        st.builds(lambda v: v2.InferParameter(uint64_param=v), st.integers(0, 2**64 - 1)),
        st.just(v2.InferParameter()),
    )
    return draw(st.dictionaries(names, values, max_size=4))


@st.composite
def model_infer_requests(draw: st.DrawFn) -> tuple[Any, str]:
    """A ModelInferRequest with every field drawn; half of them sane (raw UINT8 digits), so that the fuzzing
    also reaches decoding, batching and pricing."""
    sane = draw(st.booleans())
    request = v2.ModelInferRequest(model_name="digits" if sane else draw(MODEL_NAMES))
    if sane:
        count = draw(st.integers(1, 4))
        request.inputs.add(name="images", datatype="UINT8", shape=[count, 28, 28, 1])
        request.raw_input_contents.append(draw(st.binary(min_size=784 * count, max_size=784 * count)))
        if draw(st.booleans()):
            request.parameters["precision"].string_param = draw(st.sampled_from(["auto", "fp32", "int8"]))
        return request, f"sane: {count} raw UINT8 digits"
    request.model_version = draw(VERSIONS)
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["images", "image", ""])), datatype=draw(V2_DATATYPES), shape=draw(TENSOR_SHAPES)
        )
        contents = draw(st.sampled_from(["raw", "raw", "uint", "fp32", "bytes", "none"]))
        if contents == "raw":
            request.raw_input_contents.append(draw(st.binary(max_size=784 * 3)))
        elif contents == "uint":
            tensor.contents.uint_contents.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=2400)))
        elif contents == "fp32":
            tensor.contents.fp32_contents.extend(draw(st.lists(SPECIAL_FLOATS, max_size=2400)))
        elif contents == "bytes":
            tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=64), max_size=4)))
    for name in draw(st.lists(st.sampled_from(["probabilities", "labels", "classes", "logits", ""]), max_size=4)):
        output = request.outputs.add(name=name)
        if draw(st.booleans()):
            output.parameters["classification"].int64_param = draw(st.integers(-5, 2**40))
    for name, value in draw(infer_parameters()).items():
        request.parameters[name].CopyFrom(value)
    shapes = [list(tensor.shape)[:5] for tensor in request.inputs]
    return request, (
        f"any: model {request.model_name[:20]!r}, inputs {[(t.name, t.datatype) for t in request.inputs]} {shapes}, "
        f"{len(request.raw_input_contents)} raw, parameters {sorted(request.parameters)}"
    )


@st.composite
def tf_predict_requests(draw: st.DrawFn) -> tuple[Any, str]:
    """A TF Serving PredictRequest with every field drawn; half of them sane (DT_UINT8 digits)."""
    sane = draw(st.booleans())
    request = tfs.PredictRequest()
    request.model_spec.name = "digits" if sane else draw(MODEL_NAMES)
    if sane:
        count = draw(st.integers(1, 4))
        tensor = request.inputs["image"]
        tensor.dtype = tf_pb.DT_UINT8
        for size in (count, 28, 28, 1):
            tensor.tensor_shape.dim.add(size=size)
        tensor.tensor_content = draw(st.binary(min_size=784 * count, max_size=784 * count))
        return request, f"sane: {count} DT_UINT8 digits"
    version = draw(st.sampled_from(["none", "number", "label"]))
    if version == "number":
        request.model_spec.version.value = draw(st.integers(-(2**63), 2**63 - 1))
    elif version == "label":
        request.model_spec.version_label = draw(st.sampled_from(["stable", "canary", "", "beta"]))
    request.model_spec.signature_name = draw(st.sampled_from(["", "serving_default", "predict"]))
    for key in draw(st.lists(st.sampled_from(["image", "images", ""]), max_size=3)):
        tensor = request.inputs[key]
        tensor.dtype = draw(st.one_of(st.sampled_from([1, 4, 7, 3, 9, 0]), st.integers(-5, 200)))
        for size in draw(TENSOR_SHAPES):
            tensor.tensor_shape.dim.add(size=size)
        contents = draw(st.sampled_from(["content", "content", "float", "int", "string", "none"]))
        if contents == "content":
            tensor.tensor_content = draw(st.binary(max_size=784 * 4 * 2))
        elif contents == "float":
            tensor.float_val.extend(draw(st.lists(SPECIAL_FLOATS, max_size=1600)))
        elif contents == "int":
            tensor.int_val.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=1600)))
        elif contents == "string":
            tensor.string_val.extend(draw(st.lists(st.binary(max_size=64), max_size=4)))
    request.output_filter.extend(draw(st.lists(st.sampled_from(["output_0", "probabilities", ""]), max_size=2)))
    return request, (
        f"any: model {request.model_spec.name[:20]!r}, inputs "
        f"{[(key, request.inputs[key].dtype) for key in request.inputs]}, filter {list(request.output_filter)}"
    )


def health_requests() -> st.SearchStrategy[tuple[health_pb2.HealthCheckRequest, str]]:
    """HealthCheckRequests for known and random service names."""
    names = st.one_of(
        st.sampled_from(["", "costserve.v1.Classifier", "grpc.health.v1.Health", "nope", "costserve.v1.Classifier "]),
        # Latin-1 decoding turns any bytes into a string without hypothesis' unicode tables.
        st.binary(max_size=64).map(lambda raw: raw.decode("latin-1")),
        st.integers(1, 5000).map(lambda length: "s" * length),
    )
    return names.map(
        lambda name: (health_pb2.HealthCheckRequest(service=name), f"service {name[:40]!r} ({len(name)} chars)")
    )


# --------------------------------------------------------------------------- cases per RPC


def predict_cases() -> st.SearchStrategy[FuzzCase]:
    """Structured Predict calls."""
    return predict_requests().map(lambda pair: FuzzCase("Predict", (pair[0].SerializeToString(),), pair[1]))


def predict_wire_cases() -> st.SearchStrategy[FuzzCase]:
    """Predict calls whose message was damaged after serialization."""
    return mutated_wire(predict_requests()).map(lambda pair: FuzzCase("Predict", (pair[0],), pair[1]))


@st.composite
def predict_stream_cases(draw: st.DrawFn) -> FuzzCase:
    """PredictStream calls of 0 to 5 requests, some of them damaged on the wire."""
    messages: list[bytes] = []
    descriptions: list[str] = []
    for damaged in draw(st.lists(st.booleans(), max_size=5)):
        if damaged:
            data, description = draw(mutated_wire(predict_requests()))
        else:
            request, description = draw(predict_requests())
            data = request.SerializeToString()
        messages.append(data)
        descriptions.append(description)
    return FuzzCase("PredictStream", tuple(messages), f"{len(messages)} requests: " + " | ".join(descriptions[:2]))


def model_info_cases() -> st.SearchStrategy[FuzzCase]:
    """GetModelInfo calls: the empty request, or one carrying unknown fields."""
    return unknown_fields().map(
        lambda extra: FuzzCase("GetModelInfo", (extra,), f"{len(extra)} bytes of unknown fields")
    )


def health_check_cases() -> st.SearchStrategy[FuzzCase]:
    """Health/Check calls for random service names."""
    return health_requests().map(lambda pair: FuzzCase("Health.Check", (pair[0].SerializeToString(),), pair[1]))


def health_watch_cases() -> st.SearchStrategy[FuzzCase]:
    """Health/Watch calls for random service names; each ends at its short deadline."""
    return health_requests().map(
        lambda pair: FuzzCase("Health.Watch", (pair[0].SerializeToString(),), pair[1], WATCH_DEADLINE_S)
    )


def model_infer_cases() -> st.SearchStrategy[FuzzCase]:
    """Structured v2 ModelInfer calls."""
    return model_infer_requests().map(lambda pair: FuzzCase("v2.ModelInfer", (pair[0].SerializeToString(),), pair[1]))


def model_infer_wire_cases() -> st.SearchStrategy[FuzzCase]:
    """v2 ModelInfer calls whose message was damaged after serialization."""
    return mutated_wire(model_infer_requests()).map(lambda pair: FuzzCase("v2.ModelInfer", (pair[0],), pair[1]))


@st.composite
def v2_metadata_cases(draw: st.DrawFn) -> FuzzCase:
    """v2 ModelMetadata and ModelReady calls for any model name and version."""
    rpc = draw(st.sampled_from(["v2.ModelMetadata", "v2.ModelReady"]))
    name, version = draw(MODEL_NAMES), draw(VERSIONS)
    message = v2.ModelMetadataRequest(name=name, version=version).SerializeToString()  # ModelReady's fields too
    return FuzzCase(rpc, (message,), f"model {name[:20]!r} version {version!r}")


def tf_predict_cases() -> st.SearchStrategy[FuzzCase]:
    """Structured TF Serving Predict calls."""
    return tf_predict_requests().map(lambda pair: FuzzCase("tfs.Predict", (pair[0].SerializeToString(),), pair[1]))


@st.composite
def tf_metadata_cases(draw: st.DrawFn) -> FuzzCase:
    """TF Serving GetModelMetadata and GetModelStatus calls for any model spec and metadata field."""
    request, _ = draw(tf_predict_requests())
    if draw(st.booleans()):
        message = tfs.GetModelMetadataRequest(
            model_spec=request.model_spec,
            metadata_field=draw(METADATA_FIELDS),
        )
        return FuzzCase("tfs.GetModelMetadata", (message.SerializeToString(),), f"spec {request.model_spec.name!r}")
    message = tfs.GetModelStatusRequest(model_spec=request.model_spec)
    return FuzzCase("tfs.GetModelStatus", (message.SerializeToString(),), f"spec {request.model_spec.name!r}")


@st.composite
def garbage_cases(draw: st.DrawFn) -> FuzzCase:
    """Random bytes to any method, most of which no protobuf parser accepts."""
    rpc = draw(st.sampled_from(sorted(METHODS)))
    kind = draw(st.sampled_from(["random", "random", "invalid varint", "bad length", "bad utf-8 string"]))
    if kind == "random":
        data = draw(st.binary(min_size=1, max_size=1024))
    elif kind == "invalid varint":
        data = b"\x08" + b"\xff" * draw(st.integers(10, 20))
    elif kind == "bad length":
        # Field 1, length-delimited, claiming more bytes than follow.
        data = b"\x0a" + encode_varint(draw(st.integers(2, 2**31))) + draw(st.binary(max_size=8))
    else:
        # Field 1 as a string of bytes that are not UTF-8 (health's `service` is a string).
        data = b"\x0a\x04\xff\xfe\xfd\xfc"
    count = draw(st.integers(1, 3)) if METHODS[rpc][1] == "stream_stream" else 1
    deadline = WATCH_DEADLINE_S if rpc == "Health.Watch" else CALL_DEADLINE_S
    return FuzzCase(rpc, (data,) * count, f"garbage ({kind}, {len(data)} bytes)", deadline)


def extreme_cases() -> list[FuzzCase]:
    """The deliberate extremes, sent once each: over the message limit, 4 million empty images, a huge PNG."""
    over = b"\x0a\x00" * (SERVER_MESSAGE_LIMIT // 2 + 1024)  # 16 MiB + 2 KiB of empty images
    digit = DIGIT.read_bytes()
    many_images = pb.PredictRequest(images=[pb.Image(encoded=digit)] * (SERVER_MESSAGE_LIMIT // len(digit) + 8))
    cases = [
        FuzzCase("Predict", (over,), "over the message limit: 16 MiB + 2 KiB of empty images", EXTREME_DEADLINE_S),
        FuzzCase("Predict", (many_images.SerializeToString(),),
                 f"over the message limit: {len(many_images.images)} PNG digits", EXTREME_DEADLINE_S),
        FuzzCase("PredictStream", (over,), "over the message limit in a stream", EXTREME_DEADLINE_S),
        FuzzCase("GetModelInfo", (over,), "over the message limit", EXTREME_DEADLINE_S),
        FuzzCase("Health.Check", (over,), "over the message limit", EXTREME_DEADLINE_S),
        FuzzCase("Predict", (b"\x0a\x00" * 4_000_000,), "4,000,000 empty images (8 MB)", EXTREME_DEADLINE_S),
        FuzzCase("PredictStream", (b"\x0a\x00" * 4_000_000,) * 2, "2 messages of 4,000,000 empty images",
                 EXTREME_DEADLINE_S),
        FuzzCase("Predict", (pb.PredictRequest(images=[pb.Image(encoded=large_png(6000, 6000))]).SerializeToString(),),
                 "one 6000x6000 PNG", EXTREME_DEADLINE_S),
        FuzzCase("Predict", (pb.PredictRequest(images=[pb.Image(encoded=with_png_size(large_png(8, 8), 65535, 65535))]
                                               ).SerializeToString(),),
                 "a PNG declaring 65535x65535", EXTREME_DEADLINE_S),
        FuzzCase("v2.ModelInfer", (empty_encoded_images_v2(4_000_000),),
                 "4,000,000 empty encoded images in one BYTES input (8 MB)", EXTREME_DEADLINE_S),
        FuzzCase("tfs.Predict", (empty_encoded_images_tfs(4_000_000),),
                 "4,000,000 empty encoded images in one DT_STRING input (8 MB)", EXTREME_DEADLINE_S),
    ]  # fmt: skip
    return cases


def empty_encoded_images_v2(count: int) -> bytes:
    """A ModelInferRequest whose one BYTES input holds ``count`` empty elements."""
    request = v2.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="images", datatype="BYTES", shape=[count])
    tensor.contents.bytes_contents.extend([b""] * count)
    return bytes(request.SerializeToString())


def empty_encoded_images_tfs(count: int) -> bytes:
    """A TF Serving PredictRequest whose input holds ``count`` empty strings."""
    request = tfs.PredictRequest()
    request.model_spec.name = "digits"
    tensor = request.inputs["image"]
    tensor.dtype = tf_pb.DT_STRING
    tensor.tensor_shape.dim.add(size=count)
    tensor.string_val.extend([b""] * count)
    return bytes(request.SerializeToString())


CASE_STRATEGIES: dict[str, Callable[[], st.SearchStrategy[FuzzCase]]] = {
    "Predict": predict_cases,
    "PredictStream": predict_stream_cases,
    "Predict wire-mutated": predict_wire_cases,
    "GetModelInfo": model_info_cases,
    "Health.Check": health_check_cases,
    "Health.Watch": health_watch_cases,
    "v2.ModelInfer": model_infer_cases,
    "v2.ModelInfer wire-mutated": model_infer_wire_cases,
    "v2.ModelMetadata": v2_metadata_cases,
    "tfs.Predict": tf_predict_cases,
    "tfs.GetModelMetadata": tf_metadata_cases,
    "garbage": garbage_cases,
}


# --------------------------------------------------------------------------- sending


def call(channel: grpc.Channel, case: FuzzCase) -> tuple[str, str]:
    """Send one case with identity serializers; (status name, server message). NO_STATUS if the call broke otherwise."""
    path, arity = METHODS[case.rpc]
    try:
        if arity == "unary_unary":
            channel.unary_unary(path, request_serializer=None, response_deserializer=None)(
                case.messages[0], timeout=case.deadline_s
            )
        elif arity == "unary_stream":
            for _ in channel.unary_stream(path, request_serializer=None, response_deserializer=None)(
                case.messages[0], timeout=case.deadline_s
            ):
                pass
        else:
            for _ in channel.stream_stream(path, request_serializer=None, response_deserializer=None)(
                iter(case.messages), timeout=case.deadline_s
            ):
                pass
    except grpc.RpcError as error:
        code = error.code() if hasattr(error, "code") else None
        return (code.name if code is not None else "NO_STATUS"), (
            error.details() if hasattr(error, "details") else ""
        ) or ""
    except Exception as error:  # noqa: BLE001 - a call that ends without a status is itself a finding
        return "NO_STATUS", f"{type(error).__name__}: {error}"
    return "OK", ""


def case_counts(cases: int) -> dict[str, int]:
    """How many of ``cases`` each kind of case gets (every kind at least one)."""
    counts = {kind: max(1, int(cases * share)) for kind, share in CASE_SHARES.items()}
    counts["garbage"] += max(0, cases - sum(counts.values()))
    return counts


def run_fuzz(target: str, cases: int, seed: int, extremes: bool = True) -> FuzzReport:
    """Send ``cases`` hypothesis-drawn calls (plus the deliberate extremes) to ``target`` and tally statuses per RPC.

    Reproducible for a given ``seed``. Never raises on what the server answers: the
    report says what came back; :attr:`FuzzReport.passed` applies the rule.
    """
    report = FuzzReport(
        target=target,
        seed=seed,
        statuses={rpc: Counter() for rpc in METHODS},
        over_limit={rpc: Counter() for rpc in METHODS},
    )
    started = time.monotonic()
    with grpc.insecure_channel(target, options=UNLIMITED) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)

        def send(kind: str, case: FuzzCase) -> None:
            begun = time.monotonic()
            status, message = call(channel, case)
            took = time.monotonic() - begun
            report.statuses[case.rpc][status] += 1
            if case.over_limit:
                report.over_limit[case.rpc][status] += 1
            report.kinds[kind] += 1
            if took > report.slowest[0]:
                report.slowest = (took, case.rpc, case.description, status)
            if status in FORBIDDEN or status == "NO_STATUS":
                report.failure_count += 1
                if len(report.failures) < KEPT_FAILURES:
                    report.failures.append((case.rpc, status, case.description[:200], message[:300]))

        for kind, count in case_counts(cases).items():
            run_examples(CASE_STRATEGIES[kind](), count, seed, lambda case, kind=kind: send(kind, case))
        if extremes:
            for case in extreme_cases():
                send("extreme", case)
        final = FuzzCase("Predict", (digit_png_request(),), "valid digit 7, fp32")
        report.final_predict = call(channel, final)[0]
    report.seconds = time.monotonic() - started
    return report


def run_examples(
    strategy: st.SearchStrategy[FuzzCase], count: int, seed: int, body: Callable[[FuzzCase], None]
) -> None:
    """Run ``body`` on ``count`` examples of ``strategy``, drawn by hypothesis from ``seed``.

    Generation only: ``body`` never fails, so there is nothing to shrink or replay;
    the report keeps the failing cases.
    """

    @hypothesis_seed(seed)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=(Phase.generate,),
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        report_multiple_bugs=False,
    )
    @given(case=strategy)
    def probe(case: FuzzCase) -> None:
        body(case)

    probe()
