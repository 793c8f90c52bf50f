"""Unit tests for the LRU prediction cache and its keys (costserve.server.cache)."""

from __future__ import annotations

import threading

import numpy as np

from costserve.server.cache import CacheKey, PredictionCache, entry_bytes, pixels_digest
from costserve.server.domain import Precision


def _pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((28, 28, 1), dtype=np.float32)


def _probabilities(seed: int = 0) -> np.ndarray:
    raw = np.random.default_rng(seed).random(10, dtype=np.float32)
    return raw / raw.sum()


def _key(n: int, version: str = "1", precision: Precision = Precision.FP32) -> CacheKey:
    return CacheKey("m", version, precision.value, n.to_bytes(16, "big"))


class _EvictionCounter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


# --- LRU semantics ----------------------------------------------------------------------


def test_least_recently_used_entry_is_evicted_not_the_touched_one() -> None:
    counter = _EvictionCounter()
    cache = PredictionCache(max_entries=3, on_evict=counter)
    for n in range(3):
        cache.put(_key(n), _probabilities(n))
    assert len(cache) == 3 and cache.evictions == 0 and counter.calls == 0

    assert cache.get(_key(0)) is not None  # 0 is now the most recently used; 1 the least
    cache.put(_key(3), _probabilities(3))

    assert cache.get(_key(1)) is None
    for n in (0, 2, 3):
        np.testing.assert_array_equal(cache.get(_key(n)), _probabilities(n))
    assert len(cache) == 3
    assert cache.evictions == 1
    assert counter.calls == 1


def test_without_touching_the_oldest_entry_is_evicted_first() -> None:
    cache = PredictionCache(max_entries=3)
    for n in range(5):
        cache.put(_key(n), _probabilities(n))
    assert cache.get(_key(0)) is None
    assert cache.get(_key(1)) is None
    assert all(cache.get(_key(n)) is not None for n in (2, 3, 4))
    assert cache.evictions == 2


def test_overwriting_a_key_neither_grows_nor_evicts() -> None:
    counter = _EvictionCounter()
    cache = PredictionCache(max_entries=2, on_evict=counter)
    cache.put(_key(0), _probabilities(0))
    cache.put(_key(1), _probabilities(1))
    cache.put(_key(0), _probabilities(5))
    assert len(cache) == 2
    assert cache.evictions == 0 and counter.calls == 0
    np.testing.assert_array_equal(cache.get(_key(0)), _probabilities(5))


def test_a_miss_returns_none() -> None:
    cache = PredictionCache(max_entries=4)
    assert cache.get(_key(0)) is None
    cache.put(_key(0), _probabilities())
    assert cache.get(_key(1)) is None
    assert cache.enabled


# --- stored values ----------------------------------------------------------------------


def test_get_returns_equal_float32_values() -> None:
    cache = PredictionCache(max_entries=4)
    probabilities = _probabilities(7)
    cache.put(_key(0), probabilities)
    cached = cache.get(_key(0))
    assert cached is not None
    assert cached.dtype == np.float32
    np.testing.assert_array_equal(cached, probabilities)


def test_the_cache_returns_the_answer_it_was_given() -> None:
    # No copy on the hit path: answers are immutable (the batcher hands out read-only rows).
    cache = PredictionCache(max_entries=4)
    answer = _probabilities(8)
    cache.put(_key(0), answer)
    assert cache.get(_key(0)) is answer


# --- key separation ---------------------------------------------------------------------


def test_fp32_and_int8_entries_for_the_same_pixels_do_not_mix() -> None:
    cache = PredictionCache(max_entries=8)
    digest = pixels_digest(_pixels())
    fp32_key = CacheKey("m", "1", Precision.FP32, digest)
    int8_key = CacheKey("m", "1", Precision.INT8, digest)

    cache.put(fp32_key, _probabilities(1))
    assert cache.get(int8_key) is None
    cache.put(int8_key, _probabilities(2))

    np.testing.assert_array_equal(cache.get(fp32_key), _probabilities(1))
    np.testing.assert_array_equal(cache.get(int8_key), _probabilities(2))
    assert len(cache) == 2


def test_different_model_versions_do_not_mix() -> None:
    cache = PredictionCache(max_entries=8)
    digest = pixels_digest(_pixels())
    cache.put(CacheKey("m", "1", Precision.FP32, digest), _probabilities(1))
    assert cache.get(CacheKey("m", "2", Precision.FP32, digest)) is None
    cache.put(CacheKey("m", "2", Precision.FP32, digest), _probabilities(2))
    np.testing.assert_array_equal(cache.get(CacheKey("m", "1", Precision.FP32, digest)), _probabilities(1))
    np.testing.assert_array_equal(cache.get(CacheKey("m", "2", Precision.FP32, digest)), _probabilities(2))


def test_equal_keys_built_separately_hit() -> None:
    cache = PredictionCache(max_entries=8)
    cache.put(CacheKey("m", "1", Precision.INT8, pixels_digest(_pixels(3))), _probabilities(3))
    hit = cache.get(CacheKey("m", "1", Precision.INT8, pixels_digest(_pixels(3).copy())))
    np.testing.assert_array_equal(hit, _probabilities(3))


# --- disabled cache ---------------------------------------------------------------------


def test_zero_entries_disables_the_cache() -> None:
    counter = _EvictionCounter()
    cache = PredictionCache(max_entries=0, on_evict=counter)
    assert not cache.enabled
    for n in range(10):
        cache.put(_key(n), _probabilities(n))
        assert cache.get(_key(n)) is None
    assert len(cache) == 0
    assert cache.evictions == 0 and counter.calls == 0


# --- digests ----------------------------------------------------------------------------


def test_digest_is_equal_for_equal_pixels() -> None:
    pixels = _pixels(4)
    digest = pixels_digest(pixels)
    assert isinstance(digest, bytes) and len(digest) == 16
    assert pixels_digest(pixels.copy()) == digest
    assert pixels_digest(np.asfortranarray(pixels)) == digest  # memory layout does not matter


def test_digest_differs_for_one_changed_pixel() -> None:
    pixels = _pixels(5)
    changed = pixels.copy()
    changed[27, 27, 0] = np.nextafter(changed[27, 27, 0], np.float32(2.0))
    assert pixels_digest(changed) != pixels_digest(pixels)


def test_digest_differs_for_same_bytes_with_another_shape() -> None:
    pixels = _pixels(6)
    assert pixels.tobytes() == pixels.reshape(784).tobytes()
    assert pixels_digest(pixels.reshape(784)) != pixels_digest(pixels)
    assert pixels_digest(pixels.reshape(28, 28)) != pixels_digest(pixels)
    assert pixels_digest(pixels.reshape(14, 56, 1)) != pixels_digest(pixels)


# --- bounds and concurrency -------------------------------------------------------------


def test_size_stays_bounded_under_many_distinct_puts() -> None:
    counter = _EvictionCounter()
    cache = PredictionCache(max_entries=100, on_evict=counter)
    value = _probabilities()
    for n in range(10_000):
        cache.put(_key(n), value)
    assert len(cache) == 100
    assert cache.evictions == 9_900
    assert counter.calls == 9_900
    # The survivors are exactly the 100 most recent keys.
    assert cache.get(_key(9_899)) is None
    assert all(cache.get(_key(n)) is not None for n in range(9_900, 10_000))


def test_concurrent_gets_and_puts_are_safe() -> None:
    max_entries = 16
    counter = _EvictionCounter()
    counter_lock = threading.Lock()

    def on_evict() -> None:
        with counter_lock:
            counter()

    cache = PredictionCache(max_entries=max_entries, on_evict=on_evict)
    values = [np.full(10, n, dtype=np.float32) for n in range(64)]
    errors: list[BaseException] = []
    start = threading.Barrier(8)
    iterations = 2_000

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            start.wait()
            for _ in range(iterations):
                n = int(rng.integers(0, 64))
                hit = cache.get(_key(n))
                if hit is None:
                    cache.put(_key(n), values[n])
                else:
                    # A hit always carries the value stored under that key, never another's.
                    assert hit[0] == n
                assert len(cache) <= max_entries
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert 0 < len(cache) <= max_entries
    assert cache.evictions == counter.calls
    assert cache.evictions > 0


# --- the byte bound and unloading ---------------------------------------------------------


def test_a_thousand_class_model_is_held_to_the_byte_budget() -> None:
    """With room for many entries but few bytes, 1,000-class answers evict by bytes, oldest first."""
    counter = _EvictionCounter()
    entry = np.zeros(1000, dtype=np.float32)
    per_entry = entry_bytes((entry, 0, 0.0))
    cache = PredictionCache(max_entries=10_000, max_bytes=10 * per_entry, on_evict=counter)
    for n in range(25):
        cache.put(_key(n), (entry, 0, 0.0))
    assert len(cache) == 10 and cache.size_bytes == 10 * per_entry
    assert counter.calls == 15
    assert cache.get(_key(14)) is None and cache.get(_key(15)) is not None
    small = entry_bytes((_probabilities(), 0, 0.0))
    assert per_entry - small == (1000 - 10) * 4, "an entry's size grows with its classes"


def test_an_answer_larger_than_the_budget_is_not_cached() -> None:
    cache = PredictionCache(max_entries=10, max_bytes=1000)
    cache.put(_key(1), (np.zeros(1000, dtype=np.float32), 0, 0.0))
    assert len(cache) == 0 and cache.get(_key(1)) is None


def test_the_entry_bound_still_holds_with_bytes_to_spare() -> None:
    cache = PredictionCache(max_entries=3, max_bytes=10**9)
    for n in range(5):
        cache.put(_key(n), (_probabilities(n), 0, 0.0))
    assert len(cache) == 3 and cache.get(_key(1)) is None and cache.get(_key(4)) is not None


def test_discard_drops_one_versions_entries() -> None:
    cache = PredictionCache(max_entries=10)
    for version in ("1", "2"):
        for n in range(3):
            cache.put(_key(n, version), (_probabilities(n), 0, 0.0))
    assert cache.discard(lambda key: key.model_version == "1") == 3
    assert len(cache) == 3 and cache.get(_key(0, "1")) is None and cache.get(_key(0, "2")) is not None
    assert cache.size_bytes == 3 * entry_bytes((_probabilities(), 0, 0.0))
