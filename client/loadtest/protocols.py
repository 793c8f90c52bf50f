"""The protocols a load test can speak: how each writes a request and reads its answer.

costserve serves three APIs on one port, over one core: its own ``costserve.v1``, the Open
Inference Protocol v2 (``inference.GRPCInferenceService/ModelInfer``, as Triton and
tritonclient speak it) and TensorFlow Serving's ``tensorflow.serving.PredictionService/Predict``.
``--protocol`` sends the same inputs through one of them; each :class:`Codec` here turns the
picked inputs into that protocol's request bytes and its answer into a :class:`Reply`, which
the generator records the same way whatever the protocol.

As for costserve.v1, each input is encoded once and a request is a concatenation of bytes:

- **v2**: a prepared message (model, parameters, the ``images`` tensor's name, datatype and
  shape) followed by one ``raw_input_contents`` field holding the inputs' bytes: ``UINT8``
  levels ``[K, H, W, C]``, or ``BYTES`` ``[K]`` of encoded files, each prefixed by its length.
- **tfserving**: the prepared ``model_spec`` followed by one ``inputs`` map entry, the
  signature's input name and a ``TensorProto``: ``DT_UINT8`` ``[K, H, W, C]`` in
  ``tensor_content``, or ``DT_STRING`` ``[K]`` of encoded files.

What an answer tells differs: v1 says per image whether it was a cache hit and which variant
answered; v2 says per request (``cache_hits``, ``precision``, ``cost_usd`` parameters);
TF Serving's Predict answers probabilities only: its cost and the variant come in costserve's
trailing metadata, and hits cannot be read from it (:attr:`Codec.reports_cache_hits`,
:attr:`Codec.limits`); its request asks for a precision in metadata and cannot bypass the cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import grpc
import numpy as np

from costserve.client import MAX_MESSAGE_BYTES, PRECISION_NAMES, PRECISIONS, cost_usd, secure_or_plain_channel
from costserve.protocols import inference_pb2 as v2
from costserve.protocols import inference_pb2_grpc as v2_grpc
from costserve.protocols import tensorflow_pb2 as tf
from costserve.protocols import tensorflow_serving_pb2 as tfs
from costserve.protocols import tensorflow_serving_pb2_grpc as tfs_grpc
from costserve.protocols.wire import LENGTH_PREFIX, field_bytes, split_length_prefixed
from costserve.v1 import classifier_pb2 as pb

if TYPE_CHECKING:  # the settings check each protocol's limits: imported only for types here
    from costserve.loadtest.config import LoadtestConfig

#: ``--protocol`` values, the first the default; also the ``protocol`` label of ``costserve_requests_total``.
PROTOCOLS = ("v1", "v2", "tfserving")
#: costserve's metadata for the variant a TF Serving call asks for, and (trailing) the one that answered.
PRECISION_METADATA_KEY = "x-costserve-precision"
#: The Open Inference Protocol's input every costserve model takes.
V2_INPUT = "images"
#: TF Serving's signature costserve serves.
SIGNATURE = "serving_default"


class Labelled(Protocol):
    """One image's answer as the inputs judge it: its top class index and that class's name."""

    @property
    def label(self) -> int:
        """The most probable class's index."""
        ...

    @property
    def label_name(self) -> str:
        """Its name (``""`` when unknown)."""
        ...


@dataclass(frozen=True, slots=True)
class Answer:
    """One image's answer read from a protocol without costserve.v1's ``Prediction``."""

    label: int
    label_name: str


@dataclass(slots=True)
class Reply:
    """What one answered request says, whatever its protocol."""

    #: One per image sent, in order.
    answers: Sequence[Labelled]
    cost_usd: float
    #: The variant that answered each image ("fp32", "int8"); empty when the protocol does not say.
    precisions: Sequence[str] = ()
    #: Images answered from the cache; None when the protocol does not say.
    cache_hits: int | None = None
    #: Whether each image was a cache hit, when the protocol says it per image (v1).
    hit_flags: Sequence[bool] | None = None

    def warm_hits(self, ids: Sequence[int], new_ids: Sequence[int]) -> int:
        """Cache hits on inputs sent for the first time: the server's cache was warm before the run.

        From a per-request count alone (v2) this is a lower bound: the hits beyond the images
        that repeat an earlier input (exact with one image per request).
        """
        if self.hit_flags is not None:
            return sum(hit and input_id in new_ids for hit, input_id in zip(self.hit_flags, ids))
        if self.cache_hits is None:
            return 0
        return max(0, self.cache_hits - (len(ids) - len(new_ids)))


@dataclass(frozen=True)
class ModelFacts:
    """What requests and answers need to know of the model, asked once before the test starts."""

    #: The model's input (height, width, channels).
    input_shape: tuple[int, int, int] = (28, 28, 1)
    #: Class names by index (empty when the model has none).
    labels: tuple[str, ...] = ()
    #: TF Serving: the ``serving_default`` signature's input and its probabilities output.
    signature_input: str = ""
    signature_output: str = ""


class Pool(Protocol):
    """What a codec needs of the inputs (see :class:`costserve.loadtest.inputs.Inputs`)."""

    size: int

    def field(self, input_id: int) -> bytes:
        """The serialized costserve.v1 ``PredictRequest.images`` entry of input ``input_id``."""
        ...

    def image(self, input_id: int) -> np.ndarray | bytes:
        """Input ``input_id``: uint8 levels (height, width), or an encoded image file."""
        ...


def levels(image: np.ndarray, channels: int) -> bytes:
    """A (height, width) uint8 image as the model's (height, width, channels) levels, row-major."""
    if channels != 1:
        image = np.repeat(image[..., np.newaxis], channels, axis=-1)
    return np.ascontiguousarray(image, dtype=np.uint8).tobytes()


def model_infer_request(
    shape: Sequence[int],
    datatype: str,
    precision: str = "auto",
    skip_cache: bool = False,
    model: str = "",
    version: str = "",
) -> Any:
    """A ModelInferRequest for the ``images`` input of ``datatype`` and ``shape``, without its values.

    The values go in ``raw_input_contents`` (one entry); the parameters are costserve's
    ``precision`` and, when set, ``skip_cache``.
    """
    parameters = {"precision": v2.InferParameter(string_param=precision)}
    if skip_cache:
        parameters["skip_cache"] = v2.InferParameter(bool_param=True)
    return v2.ModelInferRequest(
        model_name=model,
        model_version=version,
        parameters=parameters,
        inputs=[v2.ModelInferRequest.InferInputTensor(name=V2_INPUT, datatype=datatype, shape=list(shape))],
    )


def infer_outputs(response: Any) -> dict[str, np.ndarray | list[bytes]]:
    """A ModelInferResponse's outputs by name: arrays of their values (``BYTES``: a list of the elements).

    Read from ``raw_output_contents`` when the response has them (the request sent raw inputs),
    from each tensor's typed contents otherwise.
    """
    raw = response.raw_output_contents
    outputs: dict[str, np.ndarray | list[bytes]] = {}
    for index, tensor in enumerate(response.outputs):
        shape = [int(dim) for dim in tensor.shape]
        if tensor.datatype == "BYTES":
            outputs[tensor.name] = split_length_prefixed(raw[index]) if raw else list(tensor.contents.bytes_contents)
        elif tensor.datatype == "FP32":
            values = np.frombuffer(raw[index], "<f4") if raw else np.asarray(tensor.contents.fp32_contents, "<f4")
            outputs[tensor.name] = values.reshape(shape)
        elif tensor.datatype == "INT64":
            values = np.frombuffer(raw[index], "<i8") if raw else np.asarray(tensor.contents.int64_contents, "<i8")
            outputs[tensor.name] = values.reshape(shape)
    return outputs


class Codec:
    """How one protocol's requests are written and its answers read. One per load-generator process."""

    #: The ``--protocol`` value.
    name: ClassVar[str]
    #: The API and method, for the report.
    title: ClassVar[str]
    #: The gRPC method's path.
    method: ClassVar[str]
    response_type: ClassVar[Any]
    #: Whether the answers say how many images came from the cache (the variant that answered, when
    #: they say it, is in :attr:`Reply.precisions`).
    reports_cache_hits: ClassVar[bool] = True
    #: Whether the call's cost comes in its trailing metadata rather than in the answer.
    cost_in_trailers: ClassVar[bool] = False
    #: What the report cannot show through this protocol, as a note below its table ("": nothing).
    limits: ClassVar[str] = ""

    def __init__(self, config: LoadtestConfig, pool: Pool, model: ModelFacts) -> None:
        self.config = config
        self.pool = pool
        self.model = model
        self._pieces: dict[int, bytes] = {}
        #: Request metadata sent with every call (what the protocol's messages have no field for): the
        #: token's, and the protocol's own.
        self.metadata: tuple[tuple[str, str], ...] = config.metadata

    def piece(self, input_id: int) -> bytes:
        """Input ``input_id`` encoded for this protocol, once."""
        encoded = self._pieces.get(input_id)
        if encoded is None:
            encoded = self._pieces[input_id] = self.encode(self.pool.image(input_id))
        return encoded

    def encode(self, image: np.ndarray | bytes) -> bytes:
        """One input as the protocol carries it among a request's images."""
        raise NotImplementedError

    def request(self, ids: Sequence[int]) -> bytes:
        """The serialized request carrying inputs ``ids``."""
        raise NotImplementedError

    def reply(self, response: Any, trailing_metadata: Any) -> Reply:
        """What an answer says; ``trailing_metadata`` only when :attr:`cost_in_trailers`."""
        raise NotImplementedError

    @classmethod
    def unsupported(cls, config: LoadtestConfig) -> str | None:
        """Why ``config`` asks what this protocol cannot express, or None."""
        return None


class V1Codec(Codec):
    """costserve.v1 ``Predict``: each input's ``images`` field, then the prepared tail (model, precision, ...)."""

    name = "v1"
    title = "costserve.v1 Predict"
    method = "/costserve.v1.Classifier/Predict"
    response_type = pb.PredictResponse

    def __init__(self, config: LoadtestConfig, pool: Pool, model: ModelFacts | None = None) -> None:
        super().__init__(config, pool, model or ModelFacts())
        self.tail = pb.PredictRequest(
            precision=PRECISIONS[config.precision],
            skip_cache=config.skip_cache,
            model_name=config.model,
            model_version=config.model_version,
        ).SerializeToString()

    def piece(self, input_id: int) -> bytes:
        """The pool's serialized ``images`` entry: protobuf merges concatenated messages."""
        return self.pool.field(input_id)

    def request(self, ids: Sequence[int]) -> bytes:
        """The images' fields, then the tail."""
        return b"".join([self.piece(input_id) for input_id in ids] + [self.tail])

    def reply(self, response: Any, trailing_metadata: Any) -> Reply:
        """Per image: the prediction itself, its variant and whether it was a hit."""
        predictions = response.predictions
        hits = [prediction.cache_hit for prediction in predictions]
        return Reply(
            answers=predictions,
            cost_usd=response.cost.usd,
            precisions=[PRECISION_NAMES.get(p.precision, str(p.precision)) for p in predictions],
            cache_hits=sum(hits),
            hit_flags=hits,
        )


def _encoded_files(pool: Pool) -> bool:
    return pool.size > 0 and isinstance(pool.image(0), bytes)


class V2Codec(Codec):
    """The Open Inference Protocol v2's ``ModelInfer``, with the images in ``raw_input_contents``."""

    name = "v2"
    title = "v2 ModelInfer"
    method = "/inference.GRPCInferenceService/ModelInfer"
    response_type = v2.ModelInferResponse

    def __init__(self, config: LoadtestConfig, pool: Pool, model: ModelFacts) -> None:
        super().__init__(config, pool, model)
        count = config.images_per_request
        self.files = _encoded_files(pool)
        shape = [count] if self.files else [count, *model.input_shape]
        self.head = model_infer_request(
            shape,
            "BYTES" if self.files else "UINT8",
            config.precision,
            config.skip_cache,
            config.model,
            config.model_version,
        ).SerializeToString()

    def encode(self, image: np.ndarray | bytes) -> bytes:
        """Levels (height, width, channels), or a file's bytes after their length."""
        if isinstance(image, bytes):
            return LENGTH_PREFIX.pack(len(image)) + image
        return levels(image, self.model.input_shape[2])

    def request(self, ids: Sequence[int]) -> bytes:
        """The prepared head, then ``raw_input_contents`` with every image's bytes."""
        return self.head + field_bytes(7, b"".join([self.piece(input_id) for input_id in ids]))

    def reply(self, response: Any, trailing_metadata: Any) -> Reply:
        """The ``classes`` and ``labels`` outputs; ``cost_usd``, ``precision`` and ``cache_hits`` parameters."""
        outputs = infer_outputs(response)
        classes = [int(index) for index in np.asarray(outputs.get("classes", ())).reshape(-1)]
        names = outputs.get("labels")
        if not isinstance(names, list) or len(names) != len(classes):
            names = [self._label_name(index).encode() for index in classes]
        parameters = response.parameters
        precision = parameters["precision"].string_param if "precision" in parameters else ""
        return Reply(
            answers=[Answer(index, name.decode()) for index, name in zip(classes, names)],
            cost_usd=parameters["cost_usd"].double_param if "cost_usd" in parameters else 0.0,
            precisions=[precision] * len(classes) if precision else (),
            cache_hits=int(parameters["cache_hits"].int64_param) if "cache_hits" in parameters else None,
        )

    def _label_name(self, index: int) -> str:
        labels = self.model.labels
        return labels[index] if 0 <= index < len(labels) else ""


class TFServingCodec(Codec):
    """TensorFlow Serving's ``Predict`` on the ``serving_default`` signature; the cost from the trailers."""

    name = "tfserving"
    title = "TF Serving Predict"
    method = "/tensorflow.serving.PredictionService/Predict"
    response_type = tfs.PredictResponse
    reports_cache_hits = False
    cost_in_trailers = True
    limits = (
        "TF Serving's Predict answers carry probabilities only: hit % is not known (-) (the server's "
        "costserve_images_total counts hits); accuracy judges the top class of the probabilities; the variant "
        "that answered is the trailing x-costserve-precision and $/pred the trailing x-costserve-cost-usd"
    )

    def __init__(self, config: LoadtestConfig, pool: Pool, model: ModelFacts) -> None:
        super().__init__(config, pool, model)
        if not model.signature_input:
            raise ValueError("--protocol tfserving: the model's signature input is not known (GetModelMetadata)")
        count = config.images_per_request
        self.files = _encoded_files(pool)
        shape = [count] if self.files else [count, *model.input_shape]
        self.tensor_head = tf.TensorProto(
            dtype=tf.DT_STRING if self.files else tf.DT_UINT8,
            tensor_shape=tf.TensorShapeProto(dim=[tf.TensorShapeProto.Dim(size=size) for size in shape]),
        ).SerializeToString()
        self.key = field_bytes(1, model.signature_input.encode())
        self.head = field_bytes(1, model_spec(config.model, config.model_version).SerializeToString())
        if config.precision != "auto":
            self.metadata += ((PRECISION_METADATA_KEY, config.precision),)

    def encode(self, image: np.ndarray | bytes) -> bytes:
        """A file as one ``string_val`` field, or levels (height, width, channels) for ``tensor_content``."""
        if isinstance(image, bytes):
            return field_bytes(8, image)
        return levels(image, self.model.input_shape[2])

    def request(self, ids: Sequence[int]) -> bytes:
        """``model_spec``, then the ``inputs`` map entry: the input's name and its TensorProto."""
        pieces = b"".join([self.piece(input_id) for input_id in ids])
        tensor = self.tensor_head + (pieces if self.files else field_bytes(4, pieces))
        return self.head + field_bytes(2, self.key + field_bytes(2, tensor))

    def reply(self, response: Any, trailing_metadata: Any) -> Reply:
        """The top class of each row of the probabilities output, named by the model's labels."""
        probabilities = tensor_values(response.outputs[self.model.signature_output])
        rows = probabilities.reshape(len(probabilities), -1) if probabilities.ndim > 1 else probabilities[np.newaxis]
        labels = self.model.labels
        answers = [
            Answer(int(index), labels[index] if index < len(labels) else "")
            for index in np.argmax(rows, axis=1).tolist()
        ]
        precision = next((value for key, value in trailing_metadata or () if key == PRECISION_METADATA_KEY), "")
        return Reply(
            answers=answers,
            cost_usd=cost_usd(trailing_metadata) or 0.0,
            precisions=[precision] * len(answers) if precision else (),
        )

    @classmethod
    def unsupported(cls, config: LoadtestConfig) -> str | None:
        """TF Serving's ``Predict`` has no field for bypassing the cache (the precision travels in metadata)."""
        if not config.skip_cache:
            return None
        return "--skip-cache: TF Serving's Predict has no way to bypass the cache (use --protocol v1 or v2 for it)"


def tensor_values(tensor: Any) -> np.ndarray:
    """A float TensorProto's values (``tensor_content`` or ``float_val``), in its shape when it has one."""
    if tensor.tensor_content:
        values = np.frombuffer(tensor.tensor_content, "<f4")
    else:
        values = np.asarray(tensor.float_val, dtype=np.float32)
    dims = [dim.size for dim in tensor.tensor_shape.dim]
    return values.reshape(dims) if dims else values


def model_spec(model: str, version: str) -> Any:
    """TF Serving's ModelSpec: the model, and its version (a number) or version label (any other text)."""
    spec = tfs.ModelSpec(name=model, signature_name=SIGNATURE)
    if version.isdigit():
        spec.version.value = int(version)
    elif version:
        spec.version_label = version
    return spec


CODECS: dict[str, type[Codec]] = {codec.name: codec for codec in (V1Codec, V2Codec, TFServingCodec)}


def protocol_notes(config: LoadtestConfig) -> list[str]:
    """What the report of a run through ``config.protocol`` cannot show, as notes (none for v1 and v2)."""
    limits = CODECS[config.protocol].limits
    return [limits] if limits else []


def model_facts(config: LoadtestConfig, input_shape: Sequence[int], labels: Sequence[str]) -> ModelFacts:
    """What ``config.protocol``'s requests need of the model, asked through that protocol before the test.

    ``input_shape`` and ``labels`` are costserve.v1's ``ModelInfo``'s. v2 asks ``ModelMetadata`` and TF
    Serving ``GetModelMetadata`` (its signature's input and output names), so a server that does not speak
    the protocol stops the test before it starts: ValueError when it lacks the API, ``grpc.RpcError`` for
    other failures (``NOT_FOUND``: the model or version is not served).
    """
    height, width, channels = (int(dim) for dim in input_shape)
    facts = ModelFacts(input_shape=(height, width, channels), labels=tuple(labels))
    if config.protocol == "v1":
        return facts
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    with secure_or_plain_channel(config.target, options, config.tls) as channel:
        try:
            if config.protocol == "v2":
                request = v2.ModelMetadataRequest(name=config.model, version=config.model_version)
                v2_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
                    request, timeout=config.timeout_s, metadata=config.metadata
                )
                return facts
            signature_input, signature_output = signature_names(channel, config)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise ValueError(
                    f"--protocol {config.protocol}: the server at {config.target} does not speak it "
                    f"({CODECS[config.protocol].title} is not implemented there)"
                ) from None
            raise
    return dataclasses.replace(facts, signature_input=signature_input, signature_output=signature_output)


def signature_names(channel: grpc.Channel, config: LoadtestConfig) -> tuple[str, str]:
    """TF Serving's ``serving_default`` input and probabilities output of the model, from GetModelMetadata.

    Raises ``grpc.RpcError`` when the server does not answer it, and ValueError when the signature
    has no single input or no float output.
    """
    request = tfs.GetModelMetadataRequest(
        model_spec=model_spec(config.model, config.model_version), metadata_field=["signature_def"]
    )
    response = tfs_grpc.PredictionServiceStub(channel).GetModelMetadata(
        request, timeout=config.timeout_s, metadata=config.metadata
    )
    signatures = tfs.SignatureDefMap()
    if "signature_def" not in response.metadata or not response.metadata["signature_def"].Unpack(signatures):
        raise ValueError("--protocol tfserving: GetModelMetadata returned no signature_def")
    signature = signatures.signature_def.get(SIGNATURE)
    if signature is None:
        raise ValueError(f"--protocol tfserving: the model has no {SIGNATURE!r} signature")
    inputs = list(signature.inputs)
    floats = [name for name, info in signature.outputs.items() if info.dtype == tf.DT_FLOAT]
    if len(inputs) != 1 or not floats:
        raise ValueError(
            f"--protocol tfserving: the {SIGNATURE!r} signature has inputs {inputs} and float outputs {floats}; "
            "the load test sends one image input and reads one float (probabilities) output"
        )
    return inputs[0], sorted(floats)[0]
