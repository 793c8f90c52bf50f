"""The LRU prediction cache.

Keys are (model version, variant, digest of the decoded pixels): a PNG and the
same raw pixels share an entry, fp32 and int8 answers never mix, and a new model
version never sees the old entries. ``cachetools.LRUCache`` is not thread-safe,
so every access holds a lock (the metrics endpoint reads sizes from its own
thread).
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from cachetools import LRUCache


class CacheKey(NamedTuple):
    """Identity of a cached prediction."""

    model_version: str
    #: The variant's label (``Precision.value``): a string, so the key holds nothing the GC tracks.
    variant: str
    pixels_digest: bytes


def pixels_digest(pixels: np.ndarray) -> bytes:
    """A 128-bit BLAKE2b digest of decoded pixels with their dtype and shape."""
    return buffer_digest(np.ascontiguousarray(pixels).data, pixels.dtype.str, pixels.shape)


def buffer_digest(data: bytes | memoryview, dtype: str, shape: tuple[int, ...]) -> bytes:
    """:func:`pixels_digest` of an array given by its row-major bytes, ``dtype.str`` and shape."""
    digest = hashlib.blake2b(_digest_prefix(dtype, shape), digest_size=16)
    digest.update(data)
    return digest.digest()


@functools.lru_cache(maxsize=64)
def _digest_prefix(dtype: str, shape: tuple[int, ...]) -> bytes:
    return f"{dtype}{shape}".encode()


class _CountingLRU(LRUCache[CacheKey, Any]):
    """An LRUCache that reports each eviction (``popitem`` is how cachetools evicts)."""

    def __init__(self, maxsize: int, on_evict: Callable[[], None]) -> None:
        super().__init__(maxsize)
        self._on_evict = on_evict

    def popitem(self) -> tuple[CacheKey, Any]:
        item = super().popitem()
        self._on_evict()
        return item


class PredictionCache:
    """Thread-safe LRU of answers, bounded to ``max_entries`` (0 = off).

    Values are stored as given and must not be changed afterwards; the core stores
    each image's (read-only probabilities, label, score).

    Example::

        cache = PredictionCache(max_entries=10_000)
        key = CacheKey("1", "fp32", pixels_digest(pixels))
        if (probabilities := cache.get(key)) is None:
            probabilities = runtime.predict(pixels[None])[0]
            cache.put(key, probabilities)
    """

    def __init__(self, max_entries: int, on_evict: Callable[[], None] | None = None) -> None:
        self.max_entries = max_entries
        self.evictions = 0
        self._on_evict = on_evict
        self._lock = threading.Lock()
        self._entries: _CountingLRU | None = _CountingLRU(max_entries, self._count_eviction) if max_entries else None

    @property
    def enabled(self) -> bool:
        """False when the cache was configured with 0 entries."""
        return self._entries is not None

    def _count_eviction(self) -> None:
        self.evictions += 1
        if self._on_evict is not None:
            self._on_evict()

    def get(self, key: CacheKey) -> Any:
        """The cached answer for ``key`` (marking it most recently used), or None on a miss."""
        if self._entries is None:
            return None
        with self._lock:
            try:
                return self._entries[key]
            except KeyError:
                return None

    def put(self, key: CacheKey, answer: Any) -> None:
        """Store ``answer``, evicting the least recently used entry when full."""
        if self._entries is None:
            return
        with self._lock:
            self._entries[key] = answer

    def __len__(self) -> int:
        if self._entries is None:
            return 0
        with self._lock:
            return len(self._entries)
