"""The LRU prediction cache.

Keys are (model, version, variant, digest of the decoded pixels): a PNG and the
same raw pixels share an entry, fp32 and int8 answers never mix, and a new model
version never sees the old entries. The cache is bounded by entries and by bytes,
so a model with a thousand classes cannot take more memory than its budget. ``cachetools.LRUCache`` is not thread-safe,
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

#: Bytes an entry holds beyond its probabilities' array: the key, its digest, the value tuple,
#: the array's header, and the LRU's own bookkeeping (measured with tracemalloc, rounded up).
ENTRY_OVERHEAD_BYTES = 480


class CacheKey(NamedTuple):
    """Identity of a cached prediction."""

    model: str
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


def entry_bytes(answer: Any) -> int:
    """Estimated bytes of one entry: its first item's array (the probabilities) plus the fixed overhead."""
    first = answer[0] if isinstance(answer, tuple) else answer
    return ENTRY_OVERHEAD_BYTES + int(getattr(first, "nbytes", 0))


class _CountingLRU(LRUCache[CacheKey, Any]):
    """An LRUCache bounded in bytes that reports each eviction (``popitem`` is how cachetools evicts)."""

    def __init__(self, max_bytes: int, on_evict: Callable[[], None]) -> None:
        super().__init__(max_bytes, getsizeof=entry_bytes)
        self._on_evict = on_evict

    def popitem(self) -> tuple[CacheKey, Any]:
        item = super().popitem()
        self._on_evict()
        return item


class PredictionCache:
    """Thread-safe LRU of answers, bounded to ``max_entries`` (0 = off) and ``max_bytes`` (estimated).

    Values are stored as given and must not be changed afterwards; the core stores
    each image's (read-only probabilities, label, score).

    Example::

        cache = PredictionCache(max_entries=10_000, max_bytes=64 * 2**20)
        key = CacheKey("digits", "1", "fp32", pixels_digest(pixels))
        if (probabilities := cache.get(key)) is None:
            probabilities = runtime.predict(pixels[None])[0]
            cache.put(key, probabilities)
    """

    def __init__(
        self, max_entries: int, max_bytes: int = 256 * 2**20, on_evict: Callable[[], None] | None = None
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.evictions = 0
        self._on_evict = on_evict
        self._lock = threading.Lock()
        self._entries: _CountingLRU | None = (
            _CountingLRU(max_bytes, self._count_eviction) if max_entries and max_bytes else None
        )

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
        """Store ``answer``, evicting the least recently used entries while over either bound.

        An answer larger than the whole byte budget is not stored.
        """
        entries = self._entries
        if entries is None:
            return
        with self._lock:
            try:
                entries[key] = answer
            except ValueError:  # cachetools: the value alone is larger than max_bytes
                return
            while len(entries) > self.max_entries:
                entries.popitem()

    def discard(self, doomed: Callable[[CacheKey], bool]) -> int:
        """Remove every entry whose key ``doomed`` accepts (an unloaded model version's); returns how many."""
        entries = self._entries
        if entries is None:
            return 0
        with self._lock:
            keys = [key for key in entries if doomed(key)]
            for key in keys:
                del entries[key]
        return len(keys)

    @property
    def size_bytes(self) -> int:
        """Estimated bytes the entries hold."""
        if self._entries is None:
            return 0
        with self._lock:
            return int(self._entries.currsize)

    def __len__(self) -> int:
        if self._entries is None:
            return 0
        with self._lock:
            return len(self._entries)
