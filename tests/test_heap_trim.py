"""The train and eval steps give glibc's freed heap pages back before their ops run."""

import ctypes
import ctypes.util
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from keras_solov2 import heap_trim
from tests.test_model import tiny_model
from tests.test_training import synthetic_batch

MB = 2**20


def _rss_anon():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssAnon in /proc/self/status")


@pytest.mark.skipif(heap_trim._MALLOC_TRIM is None, reason="the C library has no malloc_trim (not glibc)")
def test_malloc_trim_returns_freed_heap_pages():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    chunk, n = 32 * 1024, 2048  # 64 MB in chunks below glibc's mmap threshold: on the heap
    # Earlier tests leave freed heap pages resident, which these chunks would
    # reuse without a page fault: start from a trimmed heap.
    heap_trim.malloc_trim()
    start = _rss_anon()
    chunks = [libc.malloc(chunk) for _ in range(n)]
    for p in chunks:
        ctypes.memset(p, 1, chunk)
    # Keeps the freed chunks off the heap's top, which free() would trim itself.
    sentinel = libc.malloc(chunk)
    touched = _rss_anon() - start
    for p in chunks:
        libc.free(p)
    freed = _rss_anon()
    assert touched >= 56 * MB, touched / MB
    assert freed - start >= 56 * MB, "glibc returned the freed chunks without malloc_trim"
    assert heap_trim.malloc_trim() is True
    assert freed - _rss_anon() >= 56 * MB, (freed - _rss_anon()) / MB
    libc.free(sentinel)


def test_without_malloc_trim_the_data_is_returned_unchanged(monkeypatch):
    monkeypatch.setattr(heap_trim, "_MALLOC_TRIM", None)
    data = (tf.ones((1, 2)), {"a": tf.zeros(3)})
    assert heap_trim.after_heap_trim(data) is data
    assert heap_trim.malloc_trim() is False


def test_fit_and_evaluate_trim_before_each_step(monkeypatch):
    calls = []
    monkeypatch.setattr(heap_trim, "_MALLOC_TRIM", lambda pad: calls.append(pad) or 1)
    images, y = synthetic_batch(n=4)
    ds = tf.data.Dataset.from_tensor_slices((images, y)).batch(2)
    model = tiny_model()
    model.compile()
    model.fit(ds, epochs=2, verbose=0)
    assert calls == [0] * 4  # 2 epochs of 2 steps
    model.evaluate(ds, verbose=0)
    assert len(calls) == 6


def test_a_step_waits_for_the_trim(monkeypatch):
    """Every op reading the returned tensors runs after `malloc_trim`."""
    order = []

    def trim(pad):
        time.sleep(0.05)  # without the wait, the read would run first
        order.append("trim")
        return 1

    def read(x):
        order.append("read")
        return x

    @tf.function
    def step(x):
        x = heap_trim.after_heap_trim({"x": x})["x"]
        # Stateless: tf.function orders stateful ops by itself.
        return tf.numpy_function(read, [x], tf.float32, stateful=False)

    monkeypatch.setattr(heap_trim, "_MALLOC_TRIM", trim)
    for _ in range(3):
        np.testing.assert_array_equal(step(tf.ones(2)), [1, 1])
    assert order == ["trim", "read"] * 3
