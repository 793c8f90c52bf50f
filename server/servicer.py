"""The costserve.v1 gRPC front end: protobuf <-> domain types, and status codes.

Thin by design: it converts messages and maps errors, nothing else. The core
measures, prices and counts each call (:meth:`InferenceCore.predict`), and the
app's :class:`~costserve.server.rpc_gate.CallGate` admits it. Errors are mapped in
one place, :func:`abort_on_error`: a :class:`CostserveError` aborts with its own
status and message; anything else is a bug and aborts with ``INTERNAL``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import grpc

from costserve.server.auth import call_tenant, metadata_values
from costserve.server.core import InferenceCore
from costserve.server.domain import (
    CostBreakdown,
    ImageInput,
    ImagePrediction,
    PixelType,
    Precision,
    PredictionRequest,
    PredictionResult,
    RawPixels,
    VersionState,
    WireCall,
)
from costserve.server.errors import CostserveError, InvalidInput
from costserve.server.inputs import ImageLimits
from costserve.server.repository.store import LoadedModel
from costserve.server.rpc_gate import abort_with, count_top_level_field, scanning_parser
from costserve.server.tensors import top_classes
from costserve.v1 import classifier_pb2 as pb
from costserve.v1 import classifier_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name

PRECISION_FROM_PROTO = {
    pb.PRECISION_AUTO: Precision.AUTO,
    pb.PRECISION_FP32: Precision.FP32,
    pb.PRECISION_INT8: Precision.INT8,
}
PRECISION_TO_PROTO = {precision: value for value, precision in PRECISION_FROM_PROTO.items()}
PIXEL_TYPE_FROM_PROTO = {pb.DTYPE_UINT8: PixelType.UINT8, pb.DTYPE_FLOAT32: PixelType.FLOAT32}
STATE_TO_PROTO = {
    VersionState.LOADING: pb.VersionStatus.STATE_LOADING,
    VersionState.AVAILABLE: pb.VersionStatus.STATE_AVAILABLE,
    VersionState.UNLOADING: pb.VersionStatus.STATE_UNLOADING,
    VersionState.FAILED: pb.VersionStatus.STATE_FAILED,
}
#: Responses a PredictStream computes ahead of the one it is sending.
STREAM_WINDOW = 64
#: Trailing metadata key holding the call's cost in USD (the sum over a stream's responses).
COST_METADATA_KEY = "x-costserve-cost-usd"
#: Bytes a filled Cost field adds to a response (seven doubles, a varint of a typical
#: byte count, the field's tag and length): the response is sized before its cost is known.
COST_FIELD_BYTES = 2 + pb.Cost(
    usd=1, cpu_usd=1, memory_usd=1, network_usd=1, cpu_seconds=1, memory_gb_seconds=1, utilization=1, network_bytes=1000
).ByteSize()  # fmt: skip

#: PredictRequest.images' field number.
IMAGES_FIELD = pb.PredictRequest.DESCRIPTOR.fields_by_name["images"].number

Response = TypeVar("Response")


def request_parsers(max_images: int) -> Mapping[str, Callable[[bytes], object]]:
    """Deserializers of the prediction methods that refuse more than ``max_images`` images before parsing.

    A 16 MiB message can hold 8 million empty images. Its images are counted from the
    wire bytes, stopping past ``max_images`` (see :func:`scanning_parser`).
    """

    def problem_of(raw: bytes) -> str:
        if count_top_level_field(raw, IMAGES_FIELD, max_images) > max_images:
            return (
                f"the request has more than {max_images} images (or repeats its fields); at most "
                f"{max_images} per request (split it, or use PredictStream)"
            )
        return ""

    parse_request = scanning_parser(pb.PredictRequest, problem_of)
    return {f"{SERVICE_NAME}/Predict": parse_request, f"{SERVICE_NAME}/PredictStream": parse_request}


async def _abort(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    if isinstance(error, CostserveError):
        await abort_with(context, error)
    log.exception("unexpected error", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see the server log")


def abort_on_error(
    handler: Callable[..., Awaitable[Response]],
) -> Callable[..., Awaitable[Response]]:
    """Turn errors escaping a unary handler into ``context.abort(status, message)``."""

    @functools.wraps(handler)
    async def wrapper(self: object, request: object, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await handler(self, request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as error:
            await _abort(context, error)
            raise  # unreachable: abort raises

    return wrapper


def request_from_proto(
    message: pb.PredictRequest, time_remaining_s: float | None, tenant: str = "", limits: ImageLimits | None = None
) -> PredictionRequest:
    """Convert a PredictRequest message; unknown enum values and impossible constraints are InvalidInput.

    A count of images ``limits`` refuses is refused before any image is converted.
    """
    if limits is not None:
        limits.check_count(len(message.images))
    if not 0 <= message.min_accuracy <= 1:
        raise InvalidInput(f"min_accuracy {message.min_accuracy} must lie in [0, 1] (0 sets no floor)")
    if not 0 <= message.max_cost_usd < math.inf:
        raise InvalidInput(f"max_cost_usd {message.max_cost_usd} must be a finite number, 0 (no ceiling) or more")
    if message.top_k < 0:
        raise InvalidInput(f"top_k {message.top_k} must be 0 (every class) or more")
    if message.precision not in PRECISION_FROM_PROTO:
        raise InvalidInput(
            f"precision {message.precision} is not a known value; expected PRECISION_AUTO (0), "
            "PRECISION_FP32 (1) or PRECISION_INT8 (2)"
        )
    images = []
    for index, image in enumerate(message.images):
        kind = image.WhichOneof("data")
        if kind == "pixels":
            pixels = image.pixels
            if len(pixels.shape) > 3:  # before the shape is copied: it may hold millions of entries
                raise InvalidInput(
                    f"images[{index}].pixels.shape has {len(pixels.shape)} dimensions; expected "
                    "[height, width] or [height, width, channels]"
                )
            dtype = PIXEL_TYPE_FROM_PROTO.get(pixels.dtype)
            if dtype is None:
                raise InvalidInput(
                    f"images[{index}].pixels.dtype {pixels.dtype} is not a known value; "
                    "expected DTYPE_UINT8 (0) or DTYPE_FLOAT32 (1)"
                )
            images.append(ImageInput(pixels=RawPixels(shape=tuple(pixels.shape), dtype=dtype, data=pixels.data)))
        elif kind == "encoded":
            images.append(ImageInput(encoded=image.encoded))
        else:
            raise InvalidInput(f"images[{index}] is empty; set `encoded` (PNG/JPEG bytes) or `pixels`")
    return PredictionRequest(
        images=images,
        precision=PRECISION_FROM_PROTO[message.precision],
        skip_cache=message.skip_cache,
        time_remaining_s=time_remaining_s,
        tenant=tenant,
        min_accuracy=message.min_accuracy,
        max_cost_usd=message.max_cost_usd,
        model_name=message.model_name,
        model_version=message.model_version,
        top_k=message.top_k,
    )


def _add_prediction(
    response: pb.PredictResponse, prediction: ImagePrediction, labels: Sequence[str], top_k: int
) -> None:
    probabilities = prediction.probabilities
    classes: list[int] = []
    if top_k > 0:
        order = top_classes(probabilities, top_k)
        classes, values = order.tolist(), probabilities[order].tolist()
    else:
        values = probabilities.tolist()
    response.predictions.add(  # built in place: no message copied
        label=prediction.label,
        score=prediction.score,
        probabilities=values,
        cache_hit=prediction.cache_hit,
        precision=PRECISION_TO_PROTO[prediction.precision],
        batch_size=prediction.batch_size,
        label_name=labels[prediction.label],
        classes=classes,
    )


def fill_cost(message: pb.Cost, cost: CostBreakdown) -> None:
    """Copy a CostBreakdown into a Cost message."""
    message.usd = cost.usd
    message.cpu_usd = cost.cpu_usd
    message.memory_usd = cost.memory_usd
    message.network_usd = cost.network_usd
    message.cpu_seconds = cost.cpu_seconds
    message.memory_gb_seconds = cost.memory_gb_seconds
    message.network_bytes = cost.network_bytes
    message.utilization = cost.utilization


def cost_metadata(usd: float) -> tuple[tuple[str, str], ...]:
    """Trailing metadata carrying a call's total cost."""
    return ((COST_METADATA_KEY, repr(usd)),)


def response_to_proto(result: PredictionResult) -> pb.PredictResponse:
    """Convert a PredictionResult to a PredictResponse message; the servicer fills the cost once priced."""
    response = pb.PredictResponse(
        model_version=result.model_version,
        server_seconds=result.server_seconds,
        decision_reason=result.decision_reason,
        model_name=result.model_name,
    )
    for prediction in result.predictions:
        _add_prediction(response, prediction, result.labels, result.top_k)
    return response


def metadata_value(context: grpc.aio.ServicerContext, wanted: str) -> str | None:
    """The first value of request metadata ``wanted`` (bytes decoded as UTF-8), or None when the call has none."""
    values = metadata_values(context, wanted)
    return values[0] if values else None


class ClassifierServicer(pb_grpc.ClassifierServicer):
    """costserve.v1.Classifier over an :class:`InferenceCore`.

    The app sets :attr:`core` once the model is warm and only then opens its call gate,
    so every call admitted finds it.
    """

    def __init__(self, core: InferenceCore | None = None) -> None:
        self.core = core

    def _ready_core(self) -> InferenceCore:
        assert self.core is not None, "the call gate admits calls only once the core is ready"
        return self.core

    async def _answer(
        self, core: InferenceCore, message: pb.PredictRequest, context: grpc.aio.ServicerContext, method: str
    ) -> pb.PredictResponse:
        """Hand the message to the core with how to convert it and encode its answer; fill in the cost."""

        def encode(result: PredictionResult) -> tuple[pb.PredictResponse, int]:
            response = response_to_proto(result)
            return response, response.ByteSize() + COST_FIELD_BYTES

        answer = await core.predict(
            lambda: request_from_proto(message, context.time_remaining(), call_tenant(), core.limits),
            WireCall(method, message.ByteSize(), encode, PRECISION_FROM_PROTO.get(message.precision, Precision.AUTO)),
        )
        fill_cost(answer.response.cost, answer.cost)
        return answer.response

    @abort_on_error
    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        response = await self._answer(self._ready_core(), request, context, "Predict")
        context.set_trailing_metadata(cost_metadata(response.cost.usd))
        return response

    async def PredictStream(
        self, request_iterator: AsyncIterator[pb.PredictRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PredictResponse]:
        """Answers each request in order; requests are computed up to STREAM_WINDOW ahead."""
        async for response in self._predict_stream(request_iterator, context):
            yield response

    async def _predict_stream(
        self, request_iterator: AsyncIterator[pb.PredictRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PredictResponse]:
        window: asyncio.Queue = asyncio.Queue(maxsize=STREAM_WINDOW)

        async def read_requests() -> None:
            try:
                core = self._ready_core()
                async for message in request_iterator:
                    await window.put(asyncio.ensure_future(self._answer(core, message, context, "PredictStream")))
            except Exception as error:  # noqa: BLE001 - failed in order, after the answers before it; _abort maps it
                failed: asyncio.Future = asyncio.get_running_loop().create_future()
                failed.set_exception(error)
                await window.put(failed)
            await window.put(None)

        reader = asyncio.ensure_future(read_requests())
        total_usd = 0.0
        try:
            while (pending := await window.get()) is not None:
                try:
                    response = await pending
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as error:
                    await _abort(context, error)
                    raise  # unreachable: abort raises
                total_usd += response.cost.usd
                yield response
            context.set_trailing_metadata(cost_metadata(total_usd))
        finally:
            reader.cancel()
            while not window.empty():
                leftover = window.get_nowait()
                if leftover is not None:
                    leftover.cancel()

    @abort_on_error
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        core = self._ready_core()
        model = core.describe("GetModelInfo", request.model_name, request.model_version)
        return model_info_to_proto(model, core.settings.max_images_per_request)

    @abort_on_error
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        core = self._ready_core()
        return pb.ListModelsResponse(
            models=[
                pb.ModelStatus(
                    name=status.name,
                    is_default=status.is_default,
                    versions=[
                        pb.VersionStatus(
                            version=version.version,
                            state=STATE_TO_PROTO[version.state],
                            reason=version.reason,
                            cost_verdict=core.cost_verdict(status.name, version.version),
                        )
                        for version in status.versions
                    ],
                )
                for status in core.list_models("ListModels")
            ]
        )


def model_info_to_proto(model: LoadedModel, max_images_per_request: int) -> pb.ModelInfo:
    """Describe a loaded model version as a ModelInfo message."""
    metadata = model.metadata
    preprocessing = model.preprocessing
    info = pb.ModelInfo(
        name=model.name,
        version=metadata.version,
        input_shape=list(model.input_shape),
        labels=metadata.labels,
        holdout_examples=metadata.holdout_examples,
        training_data=metadata.training_data,
        created_at=metadata.created_at,
        max_images_per_request=max_images_per_request,
        preprocessing=pb.Preprocessing(
            color_mode=preprocessing.color_mode,
            resize=preprocessing.resize,
            scaling=preprocessing.scaling,
            mean=list(preprocessing.mean),
            std=list(preprocessing.std),
            output=preprocessing.output,
        ),
    )
    if metadata.int8_agreement is not None and len(model.runtimes) > 1:
        info.int8_agreement = metadata.int8_agreement
    profile = model.profile
    if profile is not None:
        info.cost_verdict = profile.verdict()
    for precision in model.runtimes:
        variant = model.variant(precision)
        entry = info.variants.add(
            precision=PRECISION_TO_PROTO[precision],
            size_bytes=variant.size_bytes,
            format=variant.format,
            path=variant.path,
            latency_ms_batch_1=variant.latency_ms_batch_1,
            latency_ms_per_image_max_batch=variant.latency_ms_per_image_max_batch,
        )
        if variant.accuracy is not None:
            entry.accuracy = variant.accuracy
        measured = profile.variants.get(precision) if profile is not None else None
        if measured is not None:
            entry.batch_limit = measured.batch_limit
            for size, cost in measured.sizes.items():
                row = entry.cost_profile.add(
                    batch_size=size, cpu_seconds_per_image=cost.cpu_s, seconds_per_image=cost.wall_s
                )
                live = measured.live.get(size)
                if live is not None:
                    row.live_batches = live.batches
                    row.live_cpu_seconds_per_image = live.cpu_s
                    row.live_seconds_per_image = live.wall_s
    return info
