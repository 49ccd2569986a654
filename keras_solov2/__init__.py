"""SOLOv2 instance segmentation for Keras 3 (TensorFlow backend).

The package sets ``KERAS_BACKEND=tensorflow`` before Keras is imported, so users
need not export it. Another backend (Keras imported with it first, or asked for
in ``KERAS_BACKEND``) is an error. Importing the package imports neither Keras
nor TensorFlow: its classes load at first use, so the command line can quiet
TensorFlow's start-up logging before TensorFlow loads.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _backend():
    keras = sys.modules.get("keras")
    return keras.config.backend() if keras is not None else os.environ["KERAS_BACKEND"]


if _backend() != "tensorflow":
    raise ImportError(
        f"keras_solov2 needs the TensorFlow backend, but Keras has backend {_backend()!r} "
        "(imported with it, or KERAS_BACKEND). Set KERAS_BACKEND=tensorflow (or import "
        "keras_solov2 before keras)."
    )

__version__ = "0.1.0"

__all__ = ["SOLOv2", "CoordConv", "DynamicMaskConv", "MatrixNMS", "defer_tensorflow_text", "__version__"]

_LAZY = {
    "SOLOv2": "keras_solov2.models.solov2",
    "CoordConv": "keras_solov2.layers.coord_conv",
    "DynamicMaskConv": "keras_solov2.layers.dynamic_mask_conv",
    "MatrixNMS": "keras_solov2.layers.matrix_nms",
    "defer_tensorflow_text": "keras_solov2.lazy_tensorflow_text",
}


def __getattr__(name):
    # Lazy so that `keras_solov2.data` (tf.data only) does not build the model modules.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'keras_solov2' has no attribute {name!r}")
