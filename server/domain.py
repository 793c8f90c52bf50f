"""Domain types of the request flow, free of protobuf and gRPC.

Each protocol's front end (costserve.v1, the Open Inference Protocol v2, TensorFlow
Serving's API) converts its messages to these and back; the core and everything
below it speak only these. They are slotted and not frozen: several
are built per request, and a frozen dataclass's ``__init__`` costs a few times more.
Treat them as values all the same.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np


class Precision(enum.Enum):
    """Which variant answers. Values are the metric label values."""

    AUTO = "auto"
    FP32 = "fp32"
    INT8 = "int8"

    # Members are singletons: identity hashing is correct and, unlike Enum's, runs in C.
    __hash__ = object.__hash__


#: Each precision by its value ("auto", "fp32", "int8"), as the protocols that name it in text do.
PRECISION_OF_NAME = {precision.value: precision for precision in Precision}


class Protocol(enum.Enum):
    """The API a call came in by. Values are the metric label values (and ``costserve loadtest --protocol``)."""

    #: costserve.v1.Classifier, costserve's own.
    V1 = "v1"
    #: The Open Inference Protocol v2 (inference.GRPCInferenceService).
    V2 = "v2"
    #: TensorFlow Serving's tensorflow.serving.PredictionService and ModelService.
    TFSERVING = "tfserving"

    __hash__ = object.__hash__


class PixelType(enum.Enum):
    """Element type of raw pixels: UINT8 is 0..255, FLOAT32 is 0..1."""

    UINT8 = "uint8"
    FLOAT32 = "float32"


@dataclass(slots=True)
class RawPixels:
    """Row-major pixels as sent by a client; validated by :mod:`costserve.server.inputs`."""

    shape: tuple[int, ...]
    dtype: PixelType
    #: A view of a larger message's buffer when a protocol sent the images as one tensor.
    data: bytes | memoryview


@dataclass(slots=True)
class ImageInput:
    """One image of a request: an encoded file (PNG/JPEG) or raw pixels, exactly one set."""

    encoded: bytes | None = None
    pixels: RawPixels | None = None


@dataclass(slots=True)
class PredictionRequest:
    """A request to classify one or more images."""

    images: Sequence[ImageInput]
    precision: Precision = Precision.AUTO
    skip_cache: bool = False
    #: Seconds left before the caller's deadline, or None when it set none.
    time_remaining_s: float | None = None
    #: Who pays for the request (request metadata ``x-costserve-tenant``); "" when unnamed.
    tenant: str = ""
    #: Lowest held-out accuracy (0..1) a variant must have to answer; 0 sets no floor.
    min_accuracy: float = 0.0
    #: Most the request may cost, in USD; 0 sets no ceiling.
    max_cost_usd: float = 0.0
    #: The model asked for; "" is the server's default model.
    model_name: str = ""
    #: The version asked for; "" is the model's latest served version.
    model_version: str = ""
    #: Answer only the ``top_k`` most probable classes per image (0: every class); the front end trims.
    top_k: int = 0


@dataclass(slots=True)
class ImagePrediction:
    """The answer for one image."""

    probabilities: np.ndarray
    precision: Precision
    cache_hit: bool
    #: Images in the runtime batch that computed it (0 for a cache hit).
    batch_size: int
    #: Index of the most probable class.
    label: int
    #: Probability of :attr:`label`.
    score: float

    @classmethod
    def of(cls, probabilities: np.ndarray, precision: Precision, cache_hit: bool, batch_size: int) -> ImagePrediction:
        """The prediction for ``probabilities``, its label and score read off once."""
        label = int(probabilities.argmax())
        return cls(probabilities, precision, cache_hit, batch_size, label, float(probabilities[label]))


@dataclass(slots=True)
class CostBreakdown:
    """What a request cost, in US dollars, and the resources behind it."""

    usd: float = 0.0
    cpu_usd: float = 0.0
    memory_usd: float = 0.0
    network_usd: float = 0.0
    cpu_seconds: float = 0.0
    memory_gb_seconds: float = 0.0
    network_bytes: int = 0
    utilization: float = 0.0


@dataclass(slots=True)
class PredictionResult:
    """The answer to a :class:`PredictionRequest`: one prediction per image, in order."""

    predictions: list[ImagePrediction]
    model_version: str
    server_seconds: float
    #: The model that answered.
    model_name: str = ""
    #: Its class names, by class index (shared with the model version: not to be changed).
    labels: Sequence[str] = ()
    #: What the request asked of the answer's size (see :attr:`PredictionRequest.top_k`).
    top_k: int = 0
    #: CPU-seconds the event loop spent on other work while this request waited for its batch:
    #: what the core subtracts from the loop CPU it measured around the request.
    waiting_loop_cpu_seconds: float = 0.0
    #: The request's share of the CPU-seconds of the inference batches its images were in.
    inference_cpu_seconds: float = 0.0
    #: Why the policy chose :attr:`precision` (a bounded label value, see :mod:`costserve.server.policy`).
    decision_reason: str = ""
    #: The tenant the request is charged to ("" when unnamed).
    tenant: str = ""
    #: How many of :attr:`predictions` the cache answered.
    cache_hits: int = 0

    @property
    def precision(self) -> Precision:
        """The variant that answered (every image of a request gets the same one)."""
        return self.predictions[0].precision


#: A front end's response message type.
Response = TypeVar("Response")


@dataclass(frozen=True, slots=True)
class WireCall(Generic[Response]):
    """What a front end knows of one call beyond its request: how the core counts and prices it."""

    #: The method the call is counted under (``Predict``, ``PredictStream``, ...).
    method: str
    #: Bytes the request took on the wire.
    bytes_in: int
    #: Builds the response to a result and returns it with the bytes it will take on the wire,
    #: its cost included (the cost is filled in after pricing, which needs the size).
    encode: Callable[[PredictionResult], tuple[Response, int]]
    #: The precision the call asked for, counted under when its request cannot be converted.
    asked_precision: Precision = Precision.AUTO
    #: The API the call came in by.
    protocol: Protocol = Protocol.V1


class VersionState(enum.Enum):
    """Where a model version is in its life in the server. Values are the metric label values."""

    LOADING = "loading"
    AVAILABLE = "available"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass(frozen=True)
class VersionStatus:
    """One version of a model and its state; ``reason`` says why it failed."""

    version: str
    state: VersionState
    reason: str = ""


@dataclass(frozen=True)
class ModelStatus:
    """A model of the repository and its versions, oldest first."""

    name: str
    is_default: bool
    versions: tuple[VersionStatus, ...]


@dataclass(slots=True)
class PricedAnswer(Generic[Response]):
    """A request's result, its encoded response (cost not yet filled in) and what it cost."""

    result: PredictionResult
    response: Response
    cost: CostBreakdown
