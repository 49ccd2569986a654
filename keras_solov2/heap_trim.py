"""Gives the C heap's freed pages back to the system before a step's ops run.

Tracing a `fit`/`evaluate` step and TensorFlow's preparation of the graph for
its first run (Grappler's rewrites, the executor's kernels) allocate and free
many small objects on glibc's heap. glibc keeps the freed pages resident, and
TensorFlow's tensor pool, mapped apart from the heap, cannot reuse them, so
they stay in the process's resident set for the whole training, on top of
the step's tensors. R50 float32 train step at 512² (batch 2; the heap sampled
every 0.1 s): the heap reached 530 MB while the graph was prepared, 332 MB of
it in use when its first op ran. `malloc_trim(0)` returns the freed pages:
called as the step's first op, it took the peak RSS after 12 steps from
2688–2718 to 2500–2520 MB (four runs each, 2026-12-07; `benchmarks/README.md`,
"Findings"), for 20–35 ms on its first call and 1.5–4.5 ms on later ones.

The step calls it every time, not only on its first run: other graphs built
between steps (validation, a callback's `predict`) leave freed heap pages too.
Where the C library has no `malloc_trim` (not glibc), nothing is done.
"""

import ctypes
import ctypes.util

import numpy as np
import tensorflow as tf


def _find_malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def malloc_trim():
    """Returns the C heap's free pages to the system (glibc's `malloc_trim(0)`).

    Returns:
        True if glibc released memory, False if there was none to release or
        the C library has no `malloc_trim`.

    Example:
    >>> isinstance(malloc_trim(), bool)
    True
    """
    return bool(_MALLOC_TRIM(0)) if _MALLOC_TRIM is not None else False


def _trim_op():
    return np.int32(malloc_trim())


def after_heap_trim(data):
    """`data` (a nest of tensors) made to wait for `malloc_trim()`.

    In a traced step, every op that reads the returned tensors runs after
    the heap is trimmed: its first run then starts without the heap pages
    freed while the graph was prepared. Without `malloc_trim` (not glibc)
    `data` is returned as it is.
    """
    if _MALLOC_TRIM is None:
        return data
    done = tf.numpy_function(_trim_op, [], tf.int32, stateful=True, name="malloc_trim")
    with tf.control_dependencies([done]):
        return tf.nest.map_structure(lambda t: tf.identity(t) if isinstance(t, tf.Tensor) else t, data)
