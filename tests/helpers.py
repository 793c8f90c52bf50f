"""Test doubles that wrap a real runtime to inject what cannot be produced on demand: a stall or a failure."""

from __future__ import annotations

import threading

import numpy as np

from costserve.server.runtimes import Runtime


class SpyRuntime(Runtime):
    """Delegates to a real runtime; records each batch, can hold batches and fail poisoned ones."""

    def __init__(self, inner: Runtime, poison_value: float | None = None) -> None:
        self.inner = inner
        self.precision = inner.precision
        self.input_shape = inner.input_shape
        self.num_classes = inner.num_classes
        self.poison_value = poison_value
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    @property
    def images_computed(self) -> int:
        return sum(self.batches)

    def warm_up(self, batch_sizes: list[int]) -> None:  # type: ignore[override]
        self.inner.warm_up(batch_sizes)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(timeout=60), "test never opened the gate"
        self.batches.append(len(batch))
        if self.poison_value is not None and np.any(np.all(batch == self.poison_value, axis=(1, 2, 3))):
            raise RuntimeError("poisoned batch")
        return self.inner.predict(batch)
