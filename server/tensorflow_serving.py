"""TensorFlow Serving's gRPC API (``tensorflow.serving.PredictionService`` and ``ModelService``), over the same core.

What ``tensorflow-serving-api``'s stubs speak. Like costserve.v1's servicer, it only
converts messages and maps errors; the core batches, caches, prices and counts every
call (under ``protocol="tfserving"``).

The mapping:

- ``model_spec``: ``name`` (empty: the default model), ``version`` or
  ``version_label`` (``stable``: the latest version served; ``canary``: the one
  before it), ``signature_name`` ``serving_default`` (or empty).
- ``Predict`` takes one input, named as the model's SavedModel signature names it
  (``GetModelMetadata`` says), a ``TensorProto`` of ``[N, H, W, C]`` (or ``[N, H, W]``,
  ``[H, W, C]``): ``DT_FLOAT`` in the model's own input range (what a TensorFlow Serving
  client of the same SavedModel sends; costserve applies the model's preprocessing, so
  it maps them back to pixels), ``DT_UINT8`` levels 0..255, or ``DT_STRING`` ``[N]`` of
  PNG/JPEG files; values in ``tensor_content`` or the typed field. It answers the
  signature's output (``DT_FLOAT [N, classes]``, probabilities).
- The protocol has no field for costserve's options or answers, so metadata carries them:
  the request's ``x-costserve-precision`` (auto, fp32 or int8) chooses the variant, and the
  trailing metadata holds the cost in USD (``x-costserve-cost-usd``, as for costserve.v1)
  and the variant that answered (``x-costserve-precision``).
- Errors follow TensorFlow Serving's wording where a client may match on it: an unknown
  input is ``INVALID_ARGUMENT`` "input tensor alias not found in signature"; an
  unknown model or version is ``NOT_FOUND``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from costserve.protocols import tensorflow_pb2 as tf_pb
from costserve.protocols import tensorflow_serving_pb2 as tfs
from costserve.protocols import tensorflow_serving_pb2_grpc as tfs_grpc
from costserve.server.auth import call_tenant
from costserve.server.core import InferenceCore
from costserve.server.domain import (
    PRECISION_OF_NAME,
    ImageInput,
    PixelType,
    Precision,
    PredictionRequest,
    PredictionResult,
    Protocol,
    RawPixels,
    VersionState,
    WireCall,
)
from costserve.server.errors import InvalidInput, NotFound
from costserve.server.repository.store import LoadedModel
from costserve.server.rpc_gate import count_top_level_field, field_payloads, scanning_parser, top_level_field_counts
from costserve.server.servicer import abort_on_error, cost_metadata, metadata_value
from costserve.server.tensors import encoded_images, images_from_tensor

log = logging.getLogger(__name__)

PREDICTION_SERVICE = tfs.DESCRIPTOR.services_by_name["PredictionService"].full_name
MODEL_SERVICE = tfs.DESCRIPTOR.services_by_name["ModelService"].full_name
SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
#: The metadata field GetModelMetadata answers.
SIGNATURE_DEF_FIELD = "signature_def"
#: Version labels: the latest version served, and the one before it.
STABLE, CANARY = "stable", "canary"
#: Model inputs from pixels within this much of the model's input range are taken as at its ends
#: (float rounding of a client's own preprocessing).
RANGE_SLACK = 1e-4
#: ModelVersionStatus.State of each version state.
STATES = {
    VersionState.LOADING: tfs.ModelVersionStatus.LOADING,
    VersionState.AVAILABLE: tfs.ModelVersionStatus.AVAILABLE,
    VersionState.UNLOADING: tfs.ModelVersionStatus.UNLOADING,
    VersionState.FAILED: tfs.ModelVersionStatus.END,
}
#: Request metadata choosing the variant, and trailing metadata naming the one that answered.
PRECISION_METADATA_KEY = "x-costserve-precision"
#: gRPC's UNKNOWN, the status code of a version that failed to load.
UNKNOWN_CODE = grpc.StatusCode.UNKNOWN.value[0]


#: Most inputs and output_filter entries a PredictRequest may carry; a model takes one input.
MAX_TENSORS = 8
#: Most top-level fields a PredictRequest may carry.
MAX_FIELDS = 64
#: Field numbers: PredictRequest's inputs (map entries) and output_filter; a map entry's value;
#: a TensorProto's string_val.
INPUTS_FIELD, OUTPUT_FILTER_FIELD, ENTRY_VALUE_FIELD, STRING_VAL_FIELD = 2, 3, 2, 8


def request_parsers(max_images: int) -> dict[str, Callable[[bytes], object]]:
    """Predict's deserializer, which refuses from the wire bytes, before parsing, a message of more
    tensors than a request can use or of more encoded images than ``max_images``
    (see :func:`costserve.server.open_inference.request_parsers`)."""

    def too_large(raw: bytes) -> str:
        counts = top_level_field_counts(raw, MAX_FIELDS)
        if counts is None:
            return f"the request has more than {MAX_FIELDS} fields (inputs, output_filter entries); it needs a few"
        for field, what in ((INPUTS_FIELD, "inputs"), (OUTPUT_FILTER_FIELD, "output_filter entries")):
            if counts[field] > MAX_TENSORS:
                return f"the request has more than {MAX_TENSORS} {what}; the signature has one input and one output"
        for entry in field_payloads(raw, INPUTS_FIELD, MAX_TENSORS):
            for tensor in field_payloads(entry, ENTRY_VALUE_FIELD, 1):
                if count_top_level_field(tensor, STRING_VAL_FIELD, max_images) > max_images:
                    return f"an input holds more than {max_images} encoded images; at most {max_images} per request"
        return ""

    return {f"{PREDICTION_SERVICE}/Predict": scanning_parser(tfs.PredictRequest, too_large)}


def _version_of(core: InferenceCore, spec: Any) -> str:
    """The version a ModelSpec names ("" for the latest); an unknown label is NotFound."""
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return str(spec.version.value)
    if choice != "version_label" or spec.version_label == STABLE:
        return ""
    name = spec.name or core.default_model_name()
    served = list(core.models.get(name, {}))
    if spec.version_label == CANARY and len(served) > 1:
        return served[-2]
    raise NotFound(
        f"model {name!r} has no version labelled {spec.version_label!r}; labels: {STABLE} (the latest version), "
        f"{CANARY} (the one before it, when two are served)"
    )


def _check_signature(spec: Any) -> None:
    if spec.signature_name not in ("", SIGNATURE):
        raise InvalidInput(f'Serving signature key "{spec.signature_name}" not found; the signature is "{SIGNATURE}"')


def _dims(tensor: Any) -> list[int]:
    return [dim.size for dim in tensor.tensor_shape.dim]


def _images(model: LoadedModel, tensor: Any, limits: Any, where: str) -> list[ImageInput]:
    """The images of a Predict request's one input tensor."""
    dims = _dims(tensor)
    if tensor.dtype == tf_pb.DT_STRING:
        return encoded_images(tensor.string_val, dims, limits, where)  # counted before any element is read
    if tensor.dtype == tf_pb.DT_UINT8:
        data = tensor.tensor_content
        if not data:
            values = np.asarray(tensor.int_val, dtype=np.int64)
            if values.size and (values.min() < 0 or values.max() > 255):
                raise InvalidInput(f"{where}: int_val holds values outside 0..255 (DT_UINT8)")
            data = values.astype(np.uint8).tobytes()
        return images_from_tensor(data, PixelType.UINT8, dims, model.input_shape, limits, where)
    if tensor.dtype == tf_pb.DT_FLOAT:
        raw = tensor.tensor_content or np.asarray(tensor.float_val, dtype="<f4").tobytes()
        images = images_from_tensor(raw, PixelType.FLOAT32, dims, model.input_shape, limits, where)
        return [_to_pixels(image, model, where) for image in images]
    name = tf_pb.DataType.Name(tensor.dtype) if tensor.dtype in tf_pb.DataType.values() else str(tensor.dtype)
    raise InvalidInput(f"{where} has dtype {name}; expected DT_FLOAT, DT_UINT8 or DT_STRING")


def _to_pixels(image: ImageInput, model: LoadedModel, where: str) -> ImageInput:
    """A model input in the model's own range, as the canonical [0, 1] pixels costserve preprocesses."""
    raw = image.pixels
    assert raw is not None
    preprocessing = model.preprocessing
    model_input: np.ndarray = np.frombuffer(raw.data, dtype="<f4").reshape(raw.shape)
    if model_input.ndim == 2:
        model_input = model_input[:, :, None]
    channels = int(model_input.shape[-1])
    if channels != preprocessing.channels:
        raise InvalidInput(f"{where} has {channels} channels; the model's input takes {preprocessing.channels}")
    pixels = preprocessing.unscale(model_input)
    if not np.isfinite(pixels).all() or pixels.min() < -RANGE_SLACK or pixels.max() > 1 + RANGE_SLACK:
        low, high = preprocessing.input_range()
        raise InvalidInput(
            f"{where} holds values outside the model's input range [{low:g}, {high:g}] "
            f"({preprocessing.scaling} scaling); send DT_UINT8 levels 0..255 to leave the scaling to the server"
        )
    pixels = pixels.clip(0.0, 1.0)
    return ImageInput(pixels=RawPixels(shape=pixels.shape, dtype=PixelType.FLOAT32, data=pixels.tobytes()))


def precision_of(context: grpc.aio.ServicerContext) -> Precision:
    """The variant the call's ``x-costserve-precision`` metadata asks for (AUTO when it names none)."""
    name = metadata_value(context, PRECISION_METADATA_KEY)
    if name is None:
        return Precision.AUTO
    precision = PRECISION_OF_NAME.get(name.strip().lower())
    if precision is None:
        raise InvalidInput(f"metadata {PRECISION_METADATA_KEY} is {name!r}; expected auto, fp32 or int8")
    return precision


def request_from_proto(
    core: InferenceCore,
    request: Any,
    time_remaining_s: float | None,
    tenant: str = "",
    precision: Precision = Precision.AUTO,
) -> tuple[PredictionRequest, str]:
    """Convert a PredictRequest, and name the signature's output; a bad input or output is InvalidInput in
    TensorFlow Serving's words."""
    spec = request.model_spec
    _check_signature(spec)
    version = _version_of(core, spec)
    served = core.resolve(spec.name, version)
    input_key, output_key = served.model.signature_keys
    if set(request.inputs) != {input_key}:
        unknown = sorted(set(request.inputs) - {input_key})
        problem = f"input tensor alias not found in signature: {', '.join(unknown)}" if unknown else "no input given"
        raise InvalidInput(f"{problem}. Inputs expected to be in the set {{{input_key}}}.")
    for name in request.output_filter:
        if name != output_key:
            raise InvalidInput(
                f"output tensor alias not found in signature: {name}. "
                f"Outputs expected to be in the set {{{output_key}}}."
            )
    images = _images(served.model, request.inputs[input_key], served.limits, f"input {input_key!r}")
    converted = PredictionRequest(
        images=images,
        precision=precision,
        time_remaining_s=time_remaining_s,
        tenant=tenant,
        model_name=spec.name,
        model_version=version,
    )
    return converted, output_key


def response_to_proto(result: PredictionResult, output_key: str) -> Any:
    """The PredictResponse of a result: the signature's output, probabilities ``[N, classes]``."""
    probabilities = np.stack([prediction.probabilities for prediction in result.predictions]).astype("<f4", copy=False)
    response = tfs.PredictResponse()
    response.model_spec.name = result.model_name
    response.model_spec.version.value = int(result.model_version)
    response.model_spec.signature_name = SIGNATURE
    output = response.outputs[output_key]
    output.dtype = tf_pb.DT_FLOAT
    output.tensor_shape.dim.add(size=probabilities.shape[0])
    output.tensor_shape.dim.add(size=probabilities.shape[1])
    output.tensor_content = probabilities.tobytes()
    return response


def signature_def(model: LoadedModel) -> Any:
    """The model's ``serving_default`` signature, as its SavedModel declares it."""
    input_key, output_key = model.signature_keys
    signature = tf_pb.SignatureDef(method_name=PREDICT_METHOD)
    model_input = signature.inputs[input_key]
    model_input.name, model_input.dtype = f"{SIGNATURE}_{input_key}:0", tf_pb.DT_FLOAT
    for size in (-1, *model.input_shape):
        model_input.tensor_shape.dim.add(size=size)
    output = signature.outputs[output_key]
    output.name, output.dtype = f"{output_key}:0", tf_pb.DT_FLOAT
    for size in (-1, len(model.metadata.labels)):
        output.tensor_shape.dim.add(size=size)
    return signature


class PredictionServicer(tfs_grpc.PredictionServiceServicer):
    """tensorflow.serving.PredictionService over an :class:`InferenceCore`."""

    def __init__(self, core: InferenceCore | None = None) -> None:
        self.core = core

    def _ready_core(self) -> InferenceCore:
        assert self.core is not None, "the call gate admits calls only once the core is ready"
        return self.core

    @abort_on_error
    async def Predict(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        core = self._ready_core()
        output_key = ""

        def convert() -> PredictionRequest:
            nonlocal output_key
            converted, output_key = request_from_proto(
                core, request, context.time_remaining(), call_tenant(), precision_of(context)
            )
            return converted

        def encode(result: PredictionResult) -> tuple[Any, int]:
            response = response_to_proto(result, output_key)
            return response, response.ByteSize()

        answer = await core.predict(
            convert, WireCall("Predict", request.ByteSize(), encode, Precision.AUTO, Protocol.TFSERVING)
        )
        context.set_trailing_metadata(
            (*cost_metadata(answer.cost.usd), (PRECISION_METADATA_KEY, answer.result.precision.value))
        )
        return answer.response

    @abort_on_error
    async def GetModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        core = self._ready_core()
        spec = request.model_spec

        def version() -> str:
            if list(request.metadata_field) != [SIGNATURE_DEF_FIELD]:
                raise InvalidInput(
                    f"metadata_field is {list(request.metadata_field)}; the one field there is {SIGNATURE_DEF_FIELD!r}"
                )
            _check_signature(spec)
            return _version_of(core, spec)

        model = core.describe("GetModelMetadata", spec.name, protocol=Protocol.TFSERVING, check=version)
        response = tfs.GetModelMetadataResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = int(model.version)
        response.model_spec.signature_name = SIGNATURE
        signatures = tfs.SignatureDefMap()
        signatures.signature_def[SIGNATURE].CopyFrom(signature_def(model))
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signatures)
        return response


class ModelServicer(tfs_grpc.ModelServiceServicer):
    """tensorflow.serving.ModelService's GetModelStatus over an :class:`InferenceCore`."""

    def __init__(self, core: InferenceCore | None = None) -> None:
        self.core = core

    @abort_on_error
    async def GetModelStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        assert self.core is not None, "the call gate admits calls only once the core is ready"
        spec = request.model_spec
        version = str(spec.version.value) if spec.WhichOneof("version_choice") == "version" else ""
        versions = self.core.model_status("GetModelStatus", spec.name, version, Protocol.TFSERVING).versions
        response = tfs.GetModelStatusResponse()
        for status in versions:
            entry = response.model_version_status.add(version=int(status.version), state=STATES[status.state])
            if status.state is VersionState.FAILED:
                entry.status.error_code, entry.status.error_message = UNKNOWN_CODE, status.reason
        return response
