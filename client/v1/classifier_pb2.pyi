from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_AUTO: _ClassVar[Precision]
    PRECISION_FP32: _ClassVar[Precision]
    PRECISION_INT8: _ClassVar[Precision]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
PRECISION_AUTO: Precision
PRECISION_FP32: Precision
PRECISION_INT8: Precision
DTYPE_UINT8: DType
DTYPE_FLOAT32: DType

class Pixels(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "pixels")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    pixels: Pixels
    def __init__(self, encoded: _Optional[bytes] = ..., pixels: _Optional[_Union[Pixels, _Mapping]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("images", "precision", "skip_cache", "min_accuracy", "max_cost_usd", "model_name", "model_version", "top_k")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    SKIP_CACHE_FIELD_NUMBER: _ClassVar[int]
    MIN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_USD_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    precision: Precision
    skip_cache: bool
    min_accuracy: float
    max_cost_usd: float
    model_name: str
    model_version: str
    top_k: int
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., precision: _Optional[_Union[Precision, str]] = ..., skip_cache: _Optional[bool] = ..., min_accuracy: _Optional[float] = ..., max_cost_usd: _Optional[float] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., top_k: _Optional[int] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "score", "probabilities", "cache_hit", "precision", "batch_size", "label_name", "classes")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAME_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    label: int
    score: float
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    cache_hit: bool
    precision: Precision
    batch_size: int
    label_name: str
    classes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, label: _Optional[int] = ..., score: _Optional[float] = ..., probabilities: _Optional[_Iterable[float]] = ..., cache_hit: _Optional[bool] = ..., precision: _Optional[_Union[Precision, str]] = ..., batch_size: _Optional[int] = ..., label_name: _Optional[str] = ..., classes: _Optional[_Iterable[int]] = ...) -> None: ...

class Cost(_message.Message):
    __slots__ = ("usd", "cpu_usd", "memory_usd", "network_usd", "cpu_seconds", "memory_gb_seconds", "network_bytes", "utilization")
    USD_FIELD_NUMBER: _ClassVar[int]
    CPU_USD_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USD_FIELD_NUMBER: _ClassVar[int]
    NETWORK_USD_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_GB_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_BYTES_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    usd: float
    cpu_usd: float
    memory_usd: float
    network_usd: float
    cpu_seconds: float
    memory_gb_seconds: float
    network_bytes: int
    utilization: float
    def __init__(self, usd: _Optional[float] = ..., cpu_usd: _Optional[float] = ..., memory_usd: _Optional[float] = ..., network_usd: _Optional[float] = ..., cpu_seconds: _Optional[float] = ..., memory_gb_seconds: _Optional[float] = ..., network_bytes: _Optional[int] = ..., utilization: _Optional[float] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "model_version", "cost", "server_seconds", "decision_reason", "model_name")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    SERVER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECISION_REASON_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    model_version: str
    cost: Cost
    server_seconds: float
    decision_reason: str
    model_name: str
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model_version: _Optional[str] = ..., cost: _Optional[_Union[Cost, _Mapping]] = ..., server_seconds: _Optional[float] = ..., decision_reason: _Optional[str] = ..., model_name: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model_name", "model_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class Variant(_message.Message):
    __slots__ = ("precision", "accuracy", "size_bytes", "format", "path", "latency_ms_batch_1", "latency_ms_per_image_max_batch", "cost_profile", "batch_limit")
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_BATCH_1_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_PER_IMAGE_MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    COST_PROFILE_FIELD_NUMBER: _ClassVar[int]
    BATCH_LIMIT_FIELD_NUMBER: _ClassVar[int]
    precision: Precision
    accuracy: float
    size_bytes: int
    format: str
    path: str
    latency_ms_batch_1: float
    latency_ms_per_image_max_batch: float
    cost_profile: _containers.RepeatedCompositeFieldContainer[BatchCost]
    batch_limit: int
    def __init__(self, precision: _Optional[_Union[Precision, str]] = ..., accuracy: _Optional[float] = ..., size_bytes: _Optional[int] = ..., format: _Optional[str] = ..., path: _Optional[str] = ..., latency_ms_batch_1: _Optional[float] = ..., latency_ms_per_image_max_batch: _Optional[float] = ..., cost_profile: _Optional[_Iterable[_Union[BatchCost, _Mapping]]] = ..., batch_limit: _Optional[int] = ...) -> None: ...

class BatchCost(_message.Message):
    __slots__ = ("batch_size", "cpu_seconds_per_image", "seconds_per_image", "live_batches", "live_cpu_seconds_per_image", "live_seconds_per_image")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    LIVE_BATCHES_FIELD_NUMBER: _ClassVar[int]
    LIVE_CPU_SECONDS_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    LIVE_SECONDS_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    cpu_seconds_per_image: float
    seconds_per_image: float
    live_batches: int
    live_cpu_seconds_per_image: float
    live_seconds_per_image: float
    def __init__(self, batch_size: _Optional[int] = ..., cpu_seconds_per_image: _Optional[float] = ..., seconds_per_image: _Optional[float] = ..., live_batches: _Optional[int] = ..., live_cpu_seconds_per_image: _Optional[float] = ..., live_seconds_per_image: _Optional[float] = ...) -> None: ...

class Preprocessing(_message.Message):
    __slots__ = ("color_mode", "resize", "scaling", "mean", "std", "output")
    COLOR_MODE_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    color_mode: str
    resize: str
    scaling: str
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    output: str
    def __init__(self, color_mode: _Optional[str] = ..., resize: _Optional[str] = ..., scaling: _Optional[str] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., output: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "input_shape", "labels", "variants", "holdout_examples", "training_data", "created_at", "max_images_per_request", "preprocessing", "int8_agreement", "cost_verdict")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAINING_DATA_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    INT8_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    COST_VERDICT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    labels: _containers.RepeatedScalarFieldContainer[str]
    variants: _containers.RepeatedCompositeFieldContainer[Variant]
    holdout_examples: int
    training_data: str
    created_at: str
    max_images_per_request: int
    preprocessing: Preprocessing
    int8_agreement: float
    cost_verdict: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., labels: _Optional[_Iterable[str]] = ..., variants: _Optional[_Iterable[_Union[Variant, _Mapping]]] = ..., holdout_examples: _Optional[int] = ..., training_data: _Optional[str] = ..., created_at: _Optional[str] = ..., max_images_per_request: _Optional[int] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ..., int8_agreement: _Optional[float] = ..., cost_verdict: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VersionStatus(_message.Message):
    __slots__ = ("version", "state", "reason", "cost_verdict")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[VersionStatus.State]
        STATE_LOADING: _ClassVar[VersionStatus.State]
        STATE_AVAILABLE: _ClassVar[VersionStatus.State]
        STATE_UNLOADING: _ClassVar[VersionStatus.State]
        STATE_FAILED: _ClassVar[VersionStatus.State]
    STATE_UNSPECIFIED: VersionStatus.State
    STATE_LOADING: VersionStatus.State
    STATE_AVAILABLE: VersionStatus.State
    STATE_UNLOADING: VersionStatus.State
    STATE_FAILED: VersionStatus.State
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COST_VERDICT_FIELD_NUMBER: _ClassVar[int]
    version: str
    state: VersionStatus.State
    reason: str
    cost_verdict: str
    def __init__(self, version: _Optional[str] = ..., state: _Optional[_Union[VersionStatus.State, str]] = ..., reason: _Optional[str] = ..., cost_verdict: _Optional[str] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "is_default", "versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    is_default: bool
    versions: _containers.RepeatedCompositeFieldContainer[VersionStatus]
    def __init__(self, name: _Optional[str] = ..., is_default: _Optional[bool] = ..., versions: _Optional[_Iterable[_Union[VersionStatus, _Mapping]]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...
