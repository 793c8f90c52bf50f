"""Runtimes: one interface, ``predict(batch) -> probabilities``, two implementations.

A runtime takes the server's canonical pixels (float32 in [0, 1], or uint8 levels)
and applies the model version's :class:`~costserve.server.preprocessing.Preprocessing`
to the whole batch on its inference thread: scaling, channel order, and softmax for
a model that outputs logits.

* :class:`LiteRTRuntime` runs a ``.tflite`` on LiteRT (``ai_edge_litert``): the int8
  model (full-integer quantized) and the float one (``model_fp32.tflite``), which serves
  fp32 by default. It keeps one interpreter per allowed batch size, so no tensor is
  reallocated while serving; batches are zero-padded up to the next allowed size.
* :class:`SavedModelRuntime` (fp32) runs the SavedModel's ``serving_default``
  signature through one session callable (never ``Model.predict``, which costs
  ~100 ms a call): for versions without a float ``.tflite``, and with
  ``--fp32-runtime tensorflow``. It is the only part of serving that imports TensorFlow.

A runtime is not thread-safe: the batcher calls each from its own single inference
thread.
"""

from __future__ import annotations

import abc
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from costserve.server.domain import Precision
from costserve.server.preprocessing import LEVEL_FLOATS, Preprocessing

if TYPE_CHECKING:  # for annotations only: LiteRTRuntime imports LiteRT where it is used
    from ai_edge_litert.interpreter import Interpreter


def levels_to_floats(levels: np.ndarray) -> np.ndarray:
    """The model's float32 input in [0, 1] for uint8 levels 0..255: one table lookup."""
    return np.take(LEVEL_FLOATS, levels)


def allowed_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two up to ``max_batch_size``, plus ``max_batch_size`` itself."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def run_runtime(runtime: Runtime, images: Sequence[np.ndarray]) -> np.ndarray:
    """Classify images given as uint8 levels or float32 pixels in [0, 1], as one batch."""
    if all(image.dtype == np.uint8 for image in images):
        return runtime.predict_levels(np.stack(images))
    return runtime.predict(
        np.stack([levels_to_floats(image) if image.dtype == np.uint8 else image for image in images])
    )


class Runtime(abc.ABC):
    """A loaded model variant that maps a batch of images to class probabilities."""

    precision: Precision
    #: What runs the model: "litert" or "tensorflow" (the values of ``--fp32-runtime``).
    engine: str = ""
    #: (height, width, channels), read from the model file.
    input_shape: tuple[int, int, int]
    num_classes: int
    #: True when a call does all its work on the calling thread (one thread per call), so
    #: that thread's CPU clock measures it exactly; otherwise other threads share the work.
    runs_on_calling_thread: bool = False
    #: How canonical pixels become this model's input, and its outputs probabilities.
    preprocessing: Preprocessing = Preprocessing()
    #: The names of the model's input and output: its SavedModel signature's, where it has one.
    signature_keys: tuple[str, str] = ("images", "probabilities")

    @abc.abstractmethod
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Classify ``batch``: float32 ``(n, *input_shape)`` in [0, 1] -> float32 ``(n, num_classes)`` probabilities."""

    def predict_levels(self, levels: np.ndarray) -> np.ndarray:
        """Classify a batch of uint8 levels 0..255: the same answer as ``predict(levels / 255)``."""
        return self.predict(levels_to_floats(levels))

    def close(self) -> None:  # noqa: B027 - optional: a runtime with nothing to release inherits the no-op
        """Release what the runtime holds beyond Python objects (a no-op unless it holds some)."""

    def time_batch(self, images: Sequence[np.ndarray]) -> tuple[float, float]:
        """Run one batch of images as the batcher does; the CPU-seconds and wall seconds it took.

        CPU is the calling thread's when the runtime works on it alone, else the process's.
        """
        cpu_clock = time.thread_time if self.runs_on_calling_thread else time.process_time
        wall_started, cpu_started = time.perf_counter(), cpu_clock()
        run_runtime(self, images)
        return cpu_clock() - cpu_started, time.perf_counter() - wall_started

    def _check_batch(self, batch: np.ndarray) -> None:
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise ValueError(f"batch shape {batch.shape} does not match (n, {', '.join(map(str, self.input_shape))})")


class PreprocessedRuntime(Runtime):
    """A runtime of a model file: applies the version's preprocessing around the model itself (``_run_model``)."""

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self._check_batch(batch)
        return self.preprocessing.probabilities(self._run_model(self._encode(self.preprocessing.scale(batch))))

    def predict_levels(self, levels: np.ndarray) -> np.ndarray:
        """The same answer as ``predict(levels / 255)``, the whole batch's input made by one table lookup.

        The inference thread gives up the GIL inside every large numpy operation and may
        wait milliseconds to get it back from a busy event loop, so fewer operations per
        batch keep the runtime busy.
        """
        self._check_batch(levels)
        model_input = self.preprocessing.scale_levels(levels, self._level_table())
        return self.preprocessing.probabilities(self._run_model(model_input))

    def _encode(self, model_input: np.ndarray) -> np.ndarray:
        """The model's input in its own type (the identity, unless the model is quantized)."""
        return model_input

    @abc.abstractmethod
    def _run_model(self, model_input: np.ndarray) -> np.ndarray:
        """The model's raw outputs for a batch already in its input type."""

    def _level_table(self) -> np.ndarray:
        """The model input of each level per channel, ``(256, channels)``, in the model's input type."""
        table = getattr(self, "_table", None)
        if table is None:
            table = self._table = self._encode(self.preprocessing.level_table(self.input_shape[2]))
        return table


def configure_tensorflow_threads(threads: int) -> None:
    """Limit TensorFlow's intra-op threads (0 = its default); call before the first TF op.

    The pool is process-wide: the fp32 runtime's session uses it too, and with one
    thread its ops run on the calling thread. Raises RuntimeError when TensorFlow already
    started with another size.
    """
    if threads <= 0:
        return
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)


_tensorflow_configured = False
_tensorflow_lock = threading.Lock()


def _configure_tensorflow_once(threads: int) -> None:
    """Size TensorFlow's pool for the first SavedModel runtime of the process, before its first TF op.

    Here rather than at start-up, so that a process serving only LiteRT never imports TensorFlow.
    """
    global _tensorflow_configured
    with _tensorflow_lock:
        if _tensorflow_configured:
            return
        _tensorflow_configured = True
        try:
            configure_tensorflow_threads(threads)
        except RuntimeError:  # TensorFlow already started in this process (training, an import): it keeps its pool
            pass


class SavedModelRuntime(PreprocessedRuntime):
    """fp32: the ``serving_default`` signature of a TensorFlow SavedModel, run by a graph session.

    The signature's graph runs through one ``Session.make_callable`` with every op on
    the calling thread. Called as an eager concrete function instead, each call
    spends ~100 us more in Python, holding the GIL the event loop needs, and hands its
    ops to TensorFlow's own threads, whose CPU cannot be told apart from the rest of
    the process's when the request is charged.
    """

    precision = Precision.FP32
    engine = "tensorflow"

    def __init__(self, saved_model_dir: Path, threads: int = 1, preprocessing: Preprocessing | None = None) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        _configure_tensorflow_once(threads)
        import tensorflow as tf

        graph = tf.Graph()
        config = tf.compat.v1.ConfigProto(
            inter_op_parallelism_threads=-1,  # negative: every op runs on the calling thread
            intra_op_parallelism_threads=max(threads, 0),
        )
        self._session = tf.compat.v1.Session(graph=graph, config=config)
        logger = tf.get_logger()
        level = logger.level
        logger.setLevel("ERROR")  # the v1 loader's deprecation notice: this use is deliberate
        try:
            meta_graph = tf.compat.v1.saved_model.load(self._session, ["serve"], str(saved_model_dir))
        finally:
            logger.setLevel(level)
        signature = meta_graph.signature_def["serving_default"]
        ((input_key, input_info),) = signature.inputs.items()
        ((output_key, output_info),) = signature.outputs.items()
        self.signature_keys = (input_key, output_key)
        input_tensor = graph.get_tensor_by_name(input_info.name)
        output_tensor = graph.get_tensor_by_name(output_info.name)
        dims = input_tensor.shape.as_list()
        if len(dims) != 4 or any(dim is None for dim in dims[1:]):
            raise ValueError(f"{saved_model_dir}: expected an input of shape (batch, h, w, c), got {dims}")
        self.input_shape = (dims[1], dims[2], dims[3])
        self.num_classes = int(output_tensor.shape[-1])
        self.preprocessing = preprocessing or Preprocessing.from_dict(None, self.input_shape[2])
        # The session's ops use TensorFlow's process-wide pool, sized by the first TensorFlow use
        # in the process (see _configure_tensorflow_once): with one thread, ops run inline.
        # The eager setting is what this reads; the first SavedModel runtime and the tests set it
        # before any other TensorFlow use, so the pool is the one it names.
        self.runs_on_calling_thread = threads == 1 and tf.config.threading.get_intra_op_parallelism_threads() == 1
        self._call = self._session.make_callable(output_tensor, [input_tensor])

    def _run_model(self, model_input: np.ndarray) -> np.ndarray:
        return self._call(model_input)

    def close(self) -> None:
        self._session.close()


class LiteRTRuntime(PreprocessedRuntime):
    """A ``.tflite`` on LiteRT, one interpreter per batch size: int8 (full-integer quantized) or fp32 (float).

    ``precision`` is the variant it serves. A quantized model's input is quantized and its
    output dequantized by the scale and zero point the file holds; a float model (no
    quantization parameters) takes and gives float32 as it is.
    """

    engine = "litert"

    def __init__(
        self,
        tflite_path: Path,
        max_batch_size: int = 32,
        threads: int = 0,
        preprocessing: Preprocessing | None = None,
        precision: Precision = Precision.INT8,
    ) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.precision = precision
        self._model = Path(tflite_path).read_bytes()
        self._threads = threads if threads > 0 else None
        self.runs_on_calling_thread = threads == 1
        self._batch_sizes = allowed_batch_sizes(max_batch_size)
        probe = Interpreter(model_content=self._model, num_threads=self._threads)
        input_detail = probe.get_input_details()[0]
        output_detail = probe.get_output_details()[0]
        input_shape = tuple(int(dim) for dim in input_detail["shape"][1:])
        if len(input_shape) != 3:
            raise ValueError(f"{tflite_path}: expected an input of shape (batch, h, w, c), got {input_detail['shape']}")
        self.input_shape = input_shape
        self.num_classes = int(output_detail["shape"][-1])
        self.preprocessing = preprocessing or Preprocessing.from_dict(None, self.input_shape[2])
        # A model converted from a SavedModel keeps its signature's names (TF Serving's clients send them).
        signature = probe.get_signature_list().get("serving_default", {})
        if len(signature.get("inputs", ())) == 1 and len(signature.get("outputs", ())) == 1:
            self.signature_keys = (signature["inputs"][0], signature["outputs"][0])
        self._input_dtype = np.dtype(input_detail["dtype"])
        self._input_scale, self._input_zero = input_detail["quantization"]
        self._output_scale, self._output_zero = output_detail["quantization"]
        quantized = bool(self._input_scale)
        if quantized != (precision is Precision.INT8):
            kind = "quantized" if quantized else "float"
            raise ValueError(f"{tflite_path}: a {kind} model cannot serve {precision.value}")
        self._interpreters: dict[int, tuple[Interpreter, int, int]] = {}
        for size in self._batch_sizes:
            interpreter = Interpreter(model_content=self._model, num_threads=self._threads)
            interpreter.resize_tensor_input(input_detail["index"], [size, *self.input_shape])
            interpreter.allocate_tensors()
            self._interpreters[size] = (
                interpreter,
                interpreter.get_input_details()[0]["index"],
                interpreter.get_output_details()[0]["index"],
            )

    def _encode(self, model_input: np.ndarray) -> np.ndarray:
        return self._quantize(model_input)

    def _run_model(self, quantized: np.ndarray) -> np.ndarray:
        """Dequantized outputs of a batch already quantized to the model's input type."""
        largest = self._batch_sizes[-1]
        if len(quantized) > largest:
            return np.concatenate(
                [self._run_model(quantized[start : start + largest]) for start in range(0, len(quantized), largest)]
            )
        size = next(size for size in self._batch_sizes if size >= len(quantized))
        interpreter, input_index, output_index = self._interpreters[size]
        batch = quantized
        if size > len(batch):
            padded = np.zeros((size, *self.input_shape), dtype=self._input_dtype)
            padded[: len(batch)] = quantized
            quantized = padded
        interpreter.set_tensor(input_index, quantized)
        interpreter.invoke()
        raw = interpreter.get_tensor(output_index)[: len(batch)]
        if self._output_scale:
            return ((raw.astype(np.float32) - self._output_zero) * self._output_scale).astype(np.float32)
        return raw.astype(np.float32)

    def _quantize(self, batch: np.ndarray) -> np.ndarray:
        if not self._input_scale:
            return batch.astype(self._input_dtype)
        info = np.iinfo(self._input_dtype)
        scaled = np.round(batch / self._input_scale + self._input_zero)
        return np.clip(scaled, info.min, info.max).astype(self._input_dtype)
