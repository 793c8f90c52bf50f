"""The Open Inference Protocol v2 front end (``inference.GRPCInferenceService``), over the same core.

What Triton, KServe, MLServer and ``tritonclient`` speak. Like costserve.v1's
servicer, it only converts messages and maps errors; the core batches, caches,
prices and counts every call (under ``protocol="v2"``).

The mapping:

- A model takes one input, ``images``: ``UINT8`` levels (0..255) or ``FP32`` pixels in
  [0, 1], shaped ``[N, H, W, C]``, ``[N, H, W]`` (one-channel models) or ``[H, W, C]``,
  sent as ``raw_input_contents`` (what tritonclient sends) or typed ``contents``; or
  ``BYTES`` ``[N]`` of encoded PNG/JPEG files.
- It answers three outputs: ``probabilities`` (``FP32 [N, classes]``), ``labels``
  (``BYTES [N]``, the top class's name) and ``classes`` (``INT64 [N]``, its index); as
  raw output contents when the request sent raw inputs. With the ``top_k`` parameter,
  ``probabilities`` and ``classes`` are ``[N, k]``: each image's k most probable
  classes, most probable first. A requested output with the
  ``classification`` parameter (tritonclient's ``class_count``) is instead ``BYTES
  [N, k]`` of ``"score:index:label"``, the k most probable classes: Triton's
  classification extension.
- Request ``parameters`` carry costserve's options (:data:`PARAMETERS`); response
  ``parameters`` carry ``cost_usd``, the ``precision`` that answered, ``cache_hits``
  and the ``decision_reason``.
"""

from __future__ import annotations

import difflib
import functools
import logging
import struct
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from costserve import __version__
from costserve.protocols import inference_pb2 as v2
from costserve.protocols import inference_pb2_grpc as v2_grpc
from costserve.protocols.wire import field_bytes, join_length_prefixed
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
    VersionState,
    WireCall,
)
from costserve.server.errors import InvalidInput, NotFound
from costserve.server.rpc_gate import count_top_level_field, field_payloads, scanning_parser, top_level_field_counts
from costserve.server.servicer import abort_on_error
from costserve.server.tensors import (
    encoded_images,
    images_from_tensor,
    split_length_prefixed,
    top_classes,
)

log = logging.getLogger(__name__)

SERVICE_NAME = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
#: The one input every model takes, and how errors name it.
INPUT_NAME = "images"
WHERE = f"input {INPUT_NAME!r}"
PROBABILITIES, LABELS, CLASSES = "probabilities", "labels", "classes"
OUTPUTS = (PROBABILITIES, LABELS, CLASSES)
#: A requested output's parameter asking for the top k classes as "score:index:label" (Triton's).
CLASSIFICATION = "classification"
#: Input datatypes of raw pixels.
PIXEL_DATATYPES = {"UINT8": PixelType.UINT8, "FP32": PixelType.FLOAT32}
#: Request parameters costserve reads, with the InferParameter fields each may be given in.
PARAMETERS: dict[str, tuple[str, ...]] = {
    "precision": ("string_param",),
    "skip_cache": ("bool_param",),
    # A number also as a string: tritonclient's infer(parameters=...) sends no doubles.
    "min_accuracy": ("double_param", "int64_param", "string_param"),
    "max_cost_usd": ("double_param", "int64_param", "string_param"),
    "top_k": ("int64_param", "uint64_param"),
}
#: The parameters that hold a number.
NUMBERS = ("min_accuracy", "max_cost_usd")
#: The protocol extensions ServerMetadata lists.
EXTENSIONS = ("classification", "model_repository", "parameters")
#: RepositoryIndex's state of each version state (Triton's names).
STATE_NAMES = {
    VersionState.LOADING: "LOADING",
    VersionState.AVAILABLE: "READY",
    VersionState.UNLOADING: "UNLOADING",
    VersionState.FAILED: "UNAVAILABLE",
}
#: Field numbers of ModelInferResponse's id and raw_output_contents.
ID_FIELD, RAW_OUTPUT_FIELD = 3, 6
DOUBLE, INT64 = struct.Struct("<d"), struct.Struct("<q")
_COST_TEMPLATE = v2.ModelInferResponse(parameters={"cost_usd": v2.InferParameter(double_param=1.0)}).SerializeToString()
assert _COST_TEMPLATE.endswith(DOUBLE.pack(1.0)), "the cost_usd entry ends with its double"
#: The wire bytes of the ``cost_usd`` response parameter up to its value (8 bytes, little-endian).
COST_PREFIX = _COST_TEMPLATE[: -DOUBLE.size]
#: Bytes the ``cost_usd`` response parameter adds: the response is sized before its cost is known.
COST_PARAMETER_BYTES = len(_COST_TEMPLATE)


#: Most inputs, requested outputs and raw_input_contents entries a ModelInferRequest may carry; one
#: input is all a model takes, so a message past these is refused before it is parsed.
MAX_TENSORS = 8
#: Most top-level fields (each parameter is one) a ModelInferRequest may carry.
MAX_FIELDS = 64
#: Field numbers: ModelInferRequest's inputs, outputs and raw_input_contents; an input's contents,
#: and the contents' bytes_contents.
INPUTS_FIELD, OUTPUTS_FIELD, RAW_FIELD = 5, 6, 7
CONTENTS_FIELD, BYTES_CONTENTS_FIELD = 5, 8


def request_parsers(max_images: int) -> dict[str, Callable[[bytes], object]]:
    """ModelInfer's deserializer, which refuses from the wire bytes, before parsing, a message of more
    tensors than a request can use or of more encoded images than ``max_images``.

    Millions of empty tensors or BYTES elements fit in 16 MiB, and parsing them alone
    holds the event loop for a quarter of a second.
    """

    def too_large(raw: bytes) -> str:
        counts = top_level_field_counts(raw, MAX_FIELDS)
        if counts is None:
            return f"the request has more than {MAX_FIELDS} fields (inputs, outputs, parameters); it needs a few"
        for field, what in ((INPUTS_FIELD, "inputs"), (OUTPUTS_FIELD, "outputs"), (RAW_FIELD, "raw_input_contents")):
            if counts[field] > MAX_TENSORS:
                return f"the request has more than {MAX_TENSORS} {what}; the model takes one input, {INPUT_NAME!r}"
        for tensor in field_payloads(raw, INPUTS_FIELD, MAX_TENSORS):
            for contents in field_payloads(tensor, CONTENTS_FIELD, 1):
                if count_top_level_field(contents, BYTES_CONTENTS_FIELD, max_images) > max_images:
                    return f"an input holds more than {max_images} encoded images; at most {max_images} per request"
        return ""

    return {f"{SERVICE_NAME}/ModelInfer": scanning_parser(v2.ModelInferRequest, too_large)}


def _parameter_value(name: str, given: Any) -> bool | int | float | str:
    """A request parameter's value; InvalidInput when it is given in a type it does not take."""
    kind = given.WhichOneof("parameter_choice")
    if kind not in PARAMETERS[name]:
        given_as = "empty" if kind is None else f"a {kind}"
        raise InvalidInput(f"parameter {name!r} is {given_as}; expected {' or '.join(PARAMETERS[name])}")
    value: bool | int | float | str = getattr(given, kind)
    if isinstance(value, str) and name in NUMBERS:
        try:
            return float(value)
        except ValueError:
            raise InvalidInput(f"parameter {name!r} is {value!r}; expected a number") from None
    return value


def _options(parameters: Any) -> dict[str, bool | int | float | str]:
    """costserve's options among a request's parameters, read in one pass over them.

    A name that looks like a misspelt option is refused; others (a client's own) pass.
    """
    options: dict[str, bool | int | float | str] = {}
    for name in parameters:  # not .items(): the map's items view is walked in Python
        if name in PARAMETERS:
            options[name] = _parameter_value(name, parameters[name])
            continue
        close = difflib.get_close_matches(name, PARAMETERS, n=1, cutoff=0.8)
        if close:
            raise InvalidInput(f"unknown parameter {name!r}; did you mean {close[0]!r}?")
    return options


def asked_precision(request: Any) -> Precision:
    """The precision a request asks for, AUTO when it names none or none known (counted so when refused)."""
    if "precision" in request.parameters:
        return PRECISION_OF_NAME.get(request.parameters["precision"].string_param, Precision.AUTO)
    return Precision.AUTO


def _images(core: InferenceCore, request: Any) -> list[ImageInput]:
    """The images of a ModelInferRequest's one input."""
    inputs = request.inputs
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        names = ", ".join(repr(tensor.name) for tensor in inputs[:4]) or "none"
        if len(inputs) > 4:
            names = f"{len(inputs)} inputs: {names}, ..."
        raise InvalidInput(f"the model takes one input, {INPUT_NAME!r}; the request has {names}")
    tensor = inputs[0]
    where = WHERE
    raws = request.raw_input_contents
    raw = None
    if raws:
        if len(raws) != 1:
            raise InvalidInput(f"raw_input_contents has {len(raws)} entries; expected one per input (1)")
        if tensor.HasField("contents"):
            raise InvalidInput(f"{where} has both contents and raw_input_contents; send one of them")
        raw = raws[0]
    served = core.resolve(request.model_name, request.model_version)
    limits = served.limits
    datatype = tensor.datatype
    if datatype == "BYTES":
        if raw is not None:
            elements = split_length_prefixed(raw, where, limits.max_images)
        else:
            elements = tensor.contents.bytes_contents  # counted before any element is read
        return encoded_images(elements, tensor.shape, limits, where)
    pixel_type = PIXEL_DATATYPES.get(datatype)
    if pixel_type is None:
        raise InvalidInput(f"{where} has datatype {datatype or 'unset'}; expected UINT8, FP32 or BYTES")
    if raw is None:
        raw = _typed_contents(tensor.contents, pixel_type, where)
    return images_from_tensor(raw, pixel_type, tensor.shape, served.input_shape, limits, where)


def _typed_contents(contents: Any, pixel_type: PixelType, where: str) -> bytes:
    """The bytes of pixels sent in typed contents: UINT8 in uint_contents, FP32 in fp32_contents."""
    if pixel_type is PixelType.UINT8:
        values = np.asarray(contents.uint_contents, dtype=np.uint32)
        if values.size and int(values.max()) > 255:
            raise InvalidInput(f"{where}: uint_contents holds {int(values.max())}; UINT8 values lie in 0..255")
        return values.astype(np.uint8).tobytes()
    return np.asarray(contents.fp32_contents, dtype="<f4").tobytes()


def request_from_proto(
    core: InferenceCore, request: Any, time_remaining_s: float | None, tenant: str = ""
) -> PredictionRequest:
    """Convert a ModelInferRequest; bad inputs, outputs and parameters are InvalidInput, naming the field."""
    parameters = request.parameters
    options = _options(parameters) if parameters else {}
    precision = Precision.AUTO
    if "precision" in options:
        name = str(options["precision"]).lower()
        if name not in PRECISION_OF_NAME:
            raise InvalidInput(f"parameter 'precision' is {options['precision']!r}; expected auto, fp32 or int8")
        precision = PRECISION_OF_NAME[name]
    min_accuracy = float(options.get("min_accuracy", 0.0))
    if not 0 <= min_accuracy <= 1:
        raise InvalidInput(f"parameter 'min_accuracy' is {min_accuracy}; expected a value in [0, 1] (0: no floor)")
    max_cost_usd = float(options.get("max_cost_usd", 0.0))
    if not 0 <= max_cost_usd < float("inf"):
        raise InvalidInput(f"parameter 'max_cost_usd' is {max_cost_usd}; expected a finite number, 0 or more")
    top_k = int(options.get("top_k", 0))
    if top_k < 0:
        raise InvalidInput(f"parameter 'top_k' is {top_k}; expected 0 (every class) or more")
    for output in request.outputs:
        if output.name not in OUTPUTS:
            raise InvalidInput(f"unknown output {output.name!r}; the model's outputs are {', '.join(OUTPUTS)}")
    return PredictionRequest(
        images=_images(core, request),
        precision=precision,
        skip_cache=bool(options.get("skip_cache", False)),
        time_remaining_s=time_remaining_s,
        tenant=tenant,
        min_accuracy=min_accuracy,
        max_cost_usd=max_cost_usd,
        model_name=request.model_name,
        model_version=request.model_version,
        top_k=top_k,
    )


def _classification_count(output: Any) -> int:
    """k of a requested output's ``classification`` parameter, 0 when it has none."""
    if CLASSIFICATION not in output.parameters:
        return 0
    given = output.parameters[CLASSIFICATION]
    k = given.int64_param if given.WhichOneof("parameter_choice") == "int64_param" else given.uint64_param
    if k < 0:
        raise InvalidInput(f"output {output.name!r}: parameter 'classification' is {k}; expected 1 or more")
    return int(k)


def _classifications(result: PredictionResult, k: int) -> list[bytes]:
    """``"score:index:label"`` of the ``k`` most probable classes of each image, row-major."""
    entries = []
    for prediction in result.predictions:
        probabilities = prediction.probabilities
        for index in top_classes(probabilities, k).tolist():
            entries.append(f"{probabilities[index]:f}:{index}:{result.labels[index]}".encode())
    return entries


def _set_bytes(response: Any, tensor: Any, elements: list[bytes], raw: bool) -> None:
    """A BYTES output's elements: length-prefixed in raw_output_contents, or in the tensor's contents."""
    if raw:
        response.raw_output_contents.append(join_length_prefixed(elements))
    else:
        tensor.contents.bytes_contents.extend(elements)


def response_to_proto(request: Any, result: PredictionResult) -> Any:
    """The ModelInferResponse of a result: the outputs the request asked for (all by default), raw when its
    inputs were; the parameters but ``cost_usd``, which is filled once the call is priced."""
    response = v2.ModelInferResponse(model_name=result.model_name, model_version=result.model_version, id=request.id)
    parameters = response.parameters
    parameters["precision"].string_param = result.precision.value
    parameters["cache_hits"].int64_param = result.cache_hits
    parameters["decision_reason"].string_param = result.decision_reason
    raw = bool(request.raw_input_contents)
    predictions = result.predictions
    count = len(predictions)
    probabilities = np.stack([prediction.probabilities for prediction in predictions]).astype("<f4", copy=False)
    # top_k: each image's k most probable classes, most probable first, and their indices.
    top = np.stack([top_classes(row, result.top_k) for row in probabilities]) if result.top_k else None
    for name, k in [(output.name, _classification_count(output)) for output in request.outputs] or [
        (name, 0) for name in OUTPUTS
    ]:
        tensor = response.outputs.add(name=name)
        if k:
            classes = min(k, len(result.labels))
            tensor.datatype, tensor.shape[:] = "BYTES", [count, classes]
            _set_bytes(response, tensor, _classifications(result, classes), raw)
        elif name == PROBABILITIES:
            values = probabilities if top is None else np.take_along_axis(probabilities, top, axis=1)
            tensor.datatype, tensor.shape[:] = "FP32", list(values.shape)
            if raw:
                response.raw_output_contents.append(values.tobytes())
            else:
                tensor.contents.fp32_contents.extend(values.ravel().tolist())
        elif name == LABELS:
            tensor.datatype, tensor.shape[:] = "BYTES", [count]
            _set_bytes(response, tensor, [result.labels[prediction.label].encode() for prediction in predictions], raw)
        else:
            indices = np.asarray([prediction.label for prediction in predictions], dtype="<i8") if top is None else top
            tensor.datatype, tensor.shape[:] = "INT64", list(indices.shape)
            if raw:
                response.raw_output_contents.append(indices.astype("<i8", copy=False).tobytes())
            else:
                tensor.contents.int64_contents.extend(indices.ravel().tolist())
    return response


@functools.lru_cache(maxsize=1024)
def _answer_head(model_name: str, model_version: str, precision: str, cache_hits: int, reason: str) -> bytes:
    """The wire bytes of an answer's model, version and parameters (all but ``cost_usd``), made once."""
    response = v2.ModelInferResponse(model_name=model_name, model_version=model_version)
    response.parameters["precision"].string_param = precision
    response.parameters["cache_hits"].int64_param = cache_hits
    response.parameters["decision_reason"].string_param = reason
    return response.SerializeToString()


@functools.lru_cache(maxsize=256)
def _default_outputs(count: int, classes: int) -> bytes:
    """The wire bytes of the three outputs' names, datatypes and shapes for ``count`` images, made once."""
    response = v2.ModelInferResponse()
    response.outputs.add(name=PROBABILITIES, datatype="FP32", shape=[count, classes])
    response.outputs.add(name=LABELS, datatype="BYTES", shape=[count])
    response.outputs.add(name=CLASSES, datatype="INT64", shape=[count])
    return response.SerializeToString()


def answer_bytes(request: Any, result: PredictionResult) -> bytes:
    """The ModelInferResponse of a result as wire bytes, all but its ``cost_usd`` (see :func:`cost_bytes`).

    The common answer (raw inputs, every output, no top_k) is assembled from pieces
    serialized once per model, variant and batch shape plus the raw outputs: building it
    as a message costs several times the bytes. Any other answer is built as a message.
    """
    if request.outputs or result.top_k or not request.raw_input_contents:
        return bytes(response_to_proto(request, result).SerializeToString())
    predictions = result.predictions
    labels = result.labels
    if len(predictions) == 1:
        (prediction,) = predictions
        probabilities = prediction.probabilities.astype("<f4", copy=False).tobytes()
        indices = INT64.pack(prediction.label)
    else:
        probabilities = np.stack([p.probabilities for p in predictions]).astype("<f4", copy=False).tobytes()
        indices = np.asarray([p.label for p in predictions], dtype="<i8").tobytes()
    names = join_length_prefixed([labels[p.label].encode() for p in predictions])
    return b"".join(
        (
            _answer_head(
                result.model_name,
                result.model_version,
                result.precision.value,
                result.cache_hits,
                result.decision_reason,
            ),
            field_bytes(ID_FIELD, request.id.encode()) if request.id else b"",
            _default_outputs(len(predictions), len(predictions[0].probabilities)),
            field_bytes(RAW_OUTPUT_FIELD, probabilities),
            field_bytes(RAW_OUTPUT_FIELD, names),
            field_bytes(RAW_OUTPUT_FIELD, indices),
        )
    )


def cost_bytes(usd: float) -> bytes:
    """The ``cost_usd`` response parameter as wire bytes, appended to an answer's (a map entry is a field)."""
    return COST_PREFIX + DOUBLE.pack(usd)


def tensor_metadata(model_input_shape: tuple[int, int, int], classes: int) -> tuple[list[Any], list[Any]]:
    """ModelMetadata's inputs and outputs of a model of ``model_input_shape`` and ``classes`` classes."""
    tensor = v2.ModelMetadataResponse.TensorMetadata
    inputs = [tensor(name=INPUT_NAME, datatype="UINT8", shape=[-1, *model_input_shape])]
    outputs = [
        tensor(name=PROBABILITIES, datatype="FP32", shape=[-1, classes]),
        tensor(name=LABELS, datatype="BYTES", shape=[-1]),
        tensor(name=CLASSES, datatype="INT64", shape=[-1]),
    ]
    return inputs, outputs


def add_to_server(servicer: OpenInferenceServicer, server: Any) -> None:
    """Register ``servicer`` as the generated ``add_GRPCInferenceServiceServicer_to_server`` does, but with
    ModelInfer's answers passed through as the wire bytes :meth:`OpenInferenceServicer.ModelInfer` makes."""
    v2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    model_infer = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInfer,
        request_deserializer=v2.ModelInferRequest.FromString,
        response_serializer=bytes,
    )
    server.add_registered_method_handlers(SERVICE_NAME, {"ModelInfer": model_infer})


class OpenInferenceServicer(v2_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over an :class:`InferenceCore`.

    ``ready`` says whether the server takes predictions (false while the model loads and
    once the drain began): ServerReady and ModelReady answer from it, never waiting.
    """

    def __init__(self, ready: Callable[[], bool], core: InferenceCore | None = None) -> None:
        self.core = core
        self._ready = ready

    def _ready_core(self) -> InferenceCore:
        assert self.core is not None, "the call gate admits calls only once the core is ready"
        return self.core

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return v2.ServerReadyResponse(ready=self._ready())

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return v2.ServerMetadataResponse(name="costserve", version=__version__, extensions=EXTENSIONS)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self.core is None or not self._ready():
            return v2.ModelReadyResponse(ready=False)
        try:
            self.core.resolve(request.name, request.version)
        except NotFound:
            return v2.ModelReadyResponse(ready=False)
        return v2.ModelReadyResponse(ready=True)

    @abort_on_error
    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        core = self._ready_core()
        model = core.describe("ModelMetadata", request.name, request.version, Protocol.V2)
        inputs, outputs = tensor_metadata(model.input_shape, len(model.metadata.labels))
        return v2.ModelMetadataResponse(
            name=model.name,
            versions=list(core.models.get(model.name, {})),
            platform="costserve",
            inputs=inputs,
            outputs=outputs,
        )

    @abort_on_error
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        core = self._ready_core()

        def encode(result: PredictionResult) -> tuple[bytes, int]:
            answer = answer_bytes(request, result)
            return answer, len(answer) + COST_PARAMETER_BYTES

        answer = await core.predict(
            lambda: request_from_proto(core, request, context.time_remaining(), call_tenant()),
            WireCall("ModelInfer", request.ByteSize(), encode, asked_precision(request), Protocol.V2),
        )
        return answer.response + cost_bytes(answer.cost.usd)

    @abort_on_error
    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        core = self._ready_core()
        index = v2.RepositoryIndexResponse()
        for model in core.list_models("RepositoryIndex", Protocol.V2):
            for status in model.versions:
                if request.ready and status.state is not VersionState.AVAILABLE:
                    continue
                index.models.add(
                    name=model.name, version=status.version, state=STATE_NAMES[status.state], reason=status.reason
                )
        return index
