"""SOLOv2 instance segmentation for Keras 3 (TensorFlow backend).

The package sets ``KERAS_BACKEND=tensorflow`` before Keras is imported, so users
need not export it. Importing Keras first with another backend is an error.
It also defers tensorflow-text, which keras-hub imports for its text
tokenizers, to their first use (≈ 116 MB less resident memory per process;
see `_defer_tensorflow_text`).
"""

import importlib
import importlib.util
import os
import sys
import types

os.environ.setdefault("KERAS_BACKEND", "tensorflow")


class _DeferredModule(types.ModuleType):
    """A module that imports its real self at the first attribute it lacks.

    Its `__spec__` etc. are plain attributes, so `import name` returns it
    without loading anything (the standard library's `LazyLoader` module
    loads as soon as an `import` statement reads its `__spec__`).
    """

    def __getattr__(self, attr):
        module = self.__dict__.get("_deferred_module")
        if module is None:
            if sys.modules.get(self.__name__) is self:
                del sys.modules[self.__name__]
            module = importlib.import_module(self.__name__)
            self.__dict__["_deferred_module"] = module
        return getattr(module, attr)


def _defer_tensorflow_text():
    """Makes `tensorflow_text` load at its first use instead of at import.

    keras-hub imports tensorflow-text when it is imported, for its text
    tokenizers. SOLOv2 never uses them, and loading that library (its own
    TensorFlow ops) adds ≈ 120 MB to every process's resident memory. The
    module keras-hub gets is a stand-in that imports tensorflow-text at the
    first attribute read, so keras-hub's tokenizers still work. Nothing
    changes if it was imported before, or is not installed.
    """
    name = "tensorflow_text"
    if name in sys.modules:
        return
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return
    if spec is None:
        return
    module = _DeferredModule(name)
    module.__spec__, module.__loader__, module.__file__ = spec, spec.loader, spec.origin
    if spec.submodule_search_locations is not None:
        # keras-hub also imports `tensorflow_text.tools.wordpiece_vocab`
        # (pure Python): submodules import without the package's own code.
        module.__path__, module.__package__ = spec.submodule_search_locations, name
    sys.modules[name] = module


_defer_tensorflow_text()

import keras  # noqa: E402

if keras.config.backend() != "tensorflow":
    raise ImportError(
        "keras_solov2 needs the TensorFlow backend, but Keras was already "
        f"imported with backend {keras.config.backend()!r}. Set "
        "KERAS_BACKEND=tensorflow (or import keras_solov2 before keras)."
    )

__version__ = "0.1.0"

__all__ = ["SOLOv2", "CoordConv", "DynamicMaskConv", "MatrixNMS", "__version__"]

_LAZY = {
    "SOLOv2": "keras_solov2.models.solov2",
    "CoordConv": "keras_solov2.layers.coord_conv",
    "DynamicMaskConv": "keras_solov2.layers.dynamic_mask_conv",
    "MatrixNMS": "keras_solov2.layers.matrix_nms",
}


def __getattr__(name):
    # Lazy so that `keras_solov2.data` (tf.data only) does not build the model modules.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'keras_solov2' has no attribute {name!r}")
