"""The costserve client library: a gRPC channel with a timeout on every call."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence, Union

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from costserve.v1 import classifier_pb2 as pb
from costserve.v1 import classifier_pb2_grpc as pb_grpc

#: An image: a path to a PNG/JPEG file, its bytes, or an array of pixels
#: (uint8 0..255 or float32 0..1, shape (h, w) or (h, w, c)).
ImageLike = Union[str, Path, bytes, np.ndarray]

PRECISIONS = {"auto": pb.PRECISION_AUTO, "fp32": pb.PRECISION_FP32, "int8": pb.PRECISION_INT8}
PRECISION_NAMES = {value: name for name, value in PRECISIONS.items()}
#: Default per-call timeout, in seconds.
DEFAULT_TIMEOUT_S = 10.0
#: Largest message the client sends or accepts, in bytes (the server's default limit).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def image_message(image: ImageLike) -> pb.Image:
    """Build a costserve.v1 Image from a path, encoded bytes, or a pixel array."""
    if isinstance(image, (str, Path)):
        return pb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, (bytes, bytearray, memoryview)):
        return pb.Image(encoded=bytes(image))
    array = np.asarray(image)
    if array.dtype == np.uint8:
        dtype = pb.DTYPE_UINT8
    elif np.issubdtype(array.dtype, np.floating):
        array, dtype = array.astype("<f4"), pb.DTYPE_FLOAT32
    else:
        raise TypeError(f"pixel arrays must be uint8 (0..255) or float (0..1), not {array.dtype}")
    return pb.Image(pixels=pb.Pixels(shape=list(array.shape), dtype=dtype, data=np.ascontiguousarray(array).tobytes()))


def precision_value(precision: str | int) -> int:
    """``"auto"``/``"fp32"``/``"int8"`` (or the enum value) as the costserve.v1 Precision value."""
    if isinstance(precision, str):
        try:
            return PRECISIONS[precision.lower()]
        except KeyError:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}") from None
    return int(precision)


class Client:
    """A costserve client over one gRPC channel; use it as a context manager.

    Every call takes ``timeout`` (seconds, default the client's); errors raise
    ``grpc.RpcError`` with the server's status code and message.

    Example::

        with Client("127.0.0.1:50051", timeout=5) as client:
            print(client.health())                      # "SERVING"
            info = client.model_info()
            reply = client.predict([pixels], precision="fp32")
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        timeout: float = DEFAULT_TIMEOUT_S,
        options: Sequence[tuple[str, object]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                *options,
            ],
        )
        self._stub = pb_grpc.ClassifierStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def predict(
        self,
        images: Sequence[ImageLike],
        precision: str | int = "auto",
        skip_cache: bool = False,
        timeout: float | None = None,
    ) -> pb.PredictResponse:
        """Classify ``images`` in one request; one prediction per image, in order."""
        request = self.request(images, precision=precision, skip_cache=skip_cache)
        return self._stub.Predict(request, timeout=timeout or self.timeout)

    def predict_stream(
        self,
        batches: Iterable[Sequence[ImageLike]],
        precision: str | int = "auto",
        skip_cache: bool = False,
        timeout: float | None = None,
    ) -> Iterator[pb.PredictResponse]:
        """Send each element of ``batches`` as one request on a PredictStream; yield the answers in order.

        ``timeout`` bounds the whole stream.
        """
        requests = (self.request(images, precision=precision, skip_cache=skip_cache) for images in batches)
        return self._stub.PredictStream(requests, timeout=timeout or self.timeout)

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        """The served model: version, input shape, labels, and each variant's accuracy and size."""
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout or self.timeout)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The gRPC health status name: ``SERVING``, ``NOT_SERVING``, ...; raises on no answer."""
        reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout or self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    @staticmethod
    def request(images: Sequence[ImageLike], precision: str | int = "auto", skip_cache: bool = False) -> pb.PredictRequest:
        """Build the PredictRequest for ``images`` (prepared once, it can be sent many times)."""
        return pb.PredictRequest(
            images=[image_message(image) for image in images],
            precision=precision_value(precision),
            skip_cache=skip_cache,
        )
