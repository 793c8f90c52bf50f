"""Runtimes: one interface, ``predict(batch) -> probabilities``, two implementations.

* :class:`SavedModelRuntime` (fp32) calls the SavedModel's ``serving_default``
  concrete function directly (never ``Model.predict``, which costs ~100 ms a call).
* :class:`LiteRTRuntime` (int8) runs the full-integer quantized ``.tflite`` on
  LiteRT (``ai_edge_litert``). It keeps one interpreter per allowed batch size, so
  no tensor is reallocated while serving; batches are zero-padded up to the next
  allowed size.

A runtime is not thread-safe: the batcher calls each from its own single inference
thread.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from costserve.server.domain import Precision


#: The model input of each 8-bit level: ``LEVEL_FLOATS[v] == np.float32(v) / np.float32(255)``.
LEVEL_FLOATS = np.arange(256, dtype=np.float32) / np.float32(255.0)


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


class Runtime(abc.ABC):
    """A loaded model variant that maps a batch of images to class probabilities."""

    precision: Precision
    #: (height, width, channels), read from the model file.
    input_shape: tuple[int, int, int]
    num_classes: int

    @abc.abstractmethod
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Classify ``batch``: float32 ``(n, *input_shape)`` in [0, 1] -> float32 ``(n, num_classes)``."""

    def predict_levels(self, levels: np.ndarray) -> np.ndarray:
        """Classify a batch of uint8 levels 0..255: the same answer as ``predict(levels / 255)``.

        One table lookup makes the whole batch's input. The inference thread gives up the
        GIL inside every large numpy operation and may wait milliseconds to get it back
        from a busy event loop, so fewer operations per batch keep the runtime busy.
        """
        return self.predict(levels_to_floats(levels))

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run every batch size once so that no graph or tensor is built while serving."""
        for size in batch_sizes:
            self.predict(np.zeros((size, *self.input_shape), dtype=np.float32))

    def _check_batch(self, batch: np.ndarray) -> None:
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise ValueError(f"batch shape {batch.shape} does not match (n, {', '.join(map(str, self.input_shape))})")


def configure_tensorflow_threads(threads: int) -> None:
    """Limit TensorFlow's intra-op threads (0 = its default); call before the first TF op."""
    if threads <= 0:
        return
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)


class SavedModelRuntime(Runtime):
    """fp32: the ``serving_default`` signature of a TensorFlow SavedModel."""

    precision = Precision.FP32

    def __init__(self, saved_model_dir: Path) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        self._tf = tf
        self._loaded = tf.saved_model.load(str(saved_model_dir))
        self._function = self._loaded.signatures["serving_default"]
        (self._input_name, input_spec), = self._function.structured_input_signature[1].items()
        (self._output_name, output_spec), = self._function.structured_outputs.items()
        dims = input_spec.shape.as_list()
        if len(dims) != 4 or any(dim is None for dim in dims[1:]):
            raise ValueError(f"{saved_model_dir}: expected an input of shape (batch, h, w, c), got {dims}")
        self.input_shape = (dims[1], dims[2], dims[3])
        self.num_classes = int(output_spec.shape[-1])

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self._check_batch(batch)
        outputs = self._function(**{self._input_name: self._tf.constant(batch, dtype=self._tf.float32)})
        return outputs[self._output_name].numpy()


class LiteRTRuntime(Runtime):
    """int8: a full-integer quantized model on LiteRT, one interpreter per batch size."""

    precision = Precision.INT8

    def __init__(self, tflite_path: Path, max_batch_size: int = 32, threads: int = 0) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._model = Path(tflite_path).read_bytes()
        self._threads = threads if threads > 0 else None
        self._batch_sizes = allowed_batch_sizes(max_batch_size)
        probe = Interpreter(model_content=self._model, num_threads=self._threads)
        input_detail = probe.get_input_details()[0]
        output_detail = probe.get_output_details()[0]
        self.input_shape = tuple(int(dim) for dim in input_detail["shape"][1:])  # type: ignore[assignment]
        if len(self.input_shape) != 3:
            raise ValueError(f"{tflite_path}: expected an input of shape (batch, h, w, c), got {input_detail['shape']}")
        self.num_classes = int(output_detail["shape"][-1])
        self._input_dtype = np.dtype(input_detail["dtype"])
        self._input_scale, self._input_zero = input_detail["quantization"]
        self._output_scale, self._output_zero = output_detail["quantization"]
        #: The quantized input of each 8-bit level, made exactly as ``_quantize`` makes it.
        self._level_codes = self._quantize(LEVEL_FLOATS)
        self._interpreters: dict[int, tuple[object, int, int]] = {}
        for size in self._batch_sizes:
            interpreter = Interpreter(model_content=self._model, num_threads=self._threads)
            interpreter.resize_tensor_input(input_detail["index"], [size, *self.input_shape])
            interpreter.allocate_tensors()
            self._interpreters[size] = (
                interpreter,
                interpreter.get_input_details()[0]["index"],
                interpreter.get_output_details()[0]["index"],
            )

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self._check_batch(batch)
        return self._run(batch, self._quantize)

    def predict_levels(self, levels: np.ndarray) -> np.ndarray:
        self._check_batch(levels)
        return self._run(levels, lambda part: np.take(self._level_codes, part))

    def _run(self, batch: np.ndarray, quantize: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        largest = self._batch_sizes[-1]
        if len(batch) > largest:
            return np.concatenate(
                [self._run(batch[start : start + largest], quantize) for start in range(0, len(batch), largest)]
            )
        size = next(size for size in self._batch_sizes if size >= len(batch))
        interpreter, input_index, output_index = self._interpreters[size]
        quantized = quantize(batch)
        if size > len(batch):
            padded = np.zeros((size, *self.input_shape), dtype=self._input_dtype)
            padded[: len(batch)] = quantized
            quantized = padded
        interpreter.set_tensor(input_index, quantized)  # type: ignore[attr-defined]
        interpreter.invoke()  # type: ignore[attr-defined]
        raw = interpreter.get_tensor(output_index)[: len(batch)]  # type: ignore[attr-defined]
        if self._output_scale:
            return ((raw.astype(np.float32) - self._output_zero) * self._output_scale).astype(np.float32)
        return raw.astype(np.float32)

    def _quantize(self, batch: np.ndarray) -> np.ndarray:
        if not self._input_scale:
            return batch.astype(self._input_dtype)
        info = np.iinfo(self._input_dtype)
        scaled = np.round(batch / self._input_scale + self._input_zero)
        return np.clip(scaled, info.min, info.max).astype(self._input_dtype)
