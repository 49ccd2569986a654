"""Opt-in: load tensorflow-text at its first use instead of when keras-hub imports it.

keras-hub imports tensorflow-text (its text tokenizers' TensorFlow ops) when it
is imported. SOLOv2 never uses it, and loading it adds ≈ 116 MB to the
process's resident memory (0.69 → 0.57 GB after `from keras_solov2 import
SOLOv2`; float32 R50 train-step peak 2.85 → 2.71 GB on the benchmark machine).
`defer_tensorflow_text()` puts a stand-in module under `tensorflow_text` that
imports the real one at its first attribute read, so keras-hub's tokenizers
still work; they just load it when first used. The `keras-solov2` command line
calls it; library users opt in.

Not a default, because the process then differs in two ways:

* tensorflow-text's ops are registered only once something reads an attribute
  of the module: `tf.saved_model.load` of a model that uses them fails with
  "Op type not registered" until then (`import tensorflow_text` does not
  load it; reading any attribute of it does);
* keras-hub sees tensorflow-text as installed even if its import would fail
  (e.g. built for another TensorFlow): its tokenizers then raise that
  ImportError at first use instead of falling back to their pure-Python paths.
"""

import importlib
import importlib.util
import sys
import threading
import types

# Reentrant: the real package's own imports may reach the stand-in again.
_LOCK = threading.RLock()


class _DeferredModule(types.ModuleType):
    """A package that imports its real self at the first attribute it lacks.

    Its `__spec__` and `__path__` are plain attributes, so `import name` and
    the import of its submodules return without loading the package's own
    code. (The standard library's `LazyLoader` module loads as soon as an
    `import` statement reads its `__spec__`.)
    """

    def _load(self):
        with _LOCK:
            module = self.__dict__.get("_deferred_module")
            if module is None:
                if sys.modules.get(self.__name__) is self:
                    sys.modules.pop(self.__name__)
                module = importlib.import_module(self.__name__)
                # Submodules imported through the stand-in were bound to it,
                # not to the package loaded now.
                for key, value in list(self.__dict__.items()):
                    if isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.{key}":
                        if not hasattr(module, key):
                            setattr(module, key, value)
                self.__dict__["_deferred_module"] = module
        return module

    def __getattr__(self, attr):
        return getattr(self._load(), attr)

    def __dir__(self):
        return dir(self._load())


def defer_tensorflow_text():
    """Makes `tensorflow_text` load at its first use instead of at import.

    Call it before keras-hub is imported (before `from keras_solov2 import
    SOLOv2`, or any keras-hub import). Use it only in processes that load no
    SavedModel with tensorflow-text ops (see the module's docstring).

    Returns:
        True if `tensorflow_text` is now deferred; False if it was imported
        already (e.g. by keras-hub) or is not installed.

    Example:
    >>> import keras_solov2
    >>> _ = keras_solov2.defer_tensorflow_text()
    >>> from keras_solov2 import SOLOv2  # keras-hub: tensorflow-text not loaded
    >>> import tensorflow_text  # still not loaded
    >>> tensorflow_text.case_fold_utf8(["ABC"]).numpy()  # loaded now
    array([b'abc'], dtype=object)
    """
    name = "tensorflow_text"
    if name in sys.modules:
        return isinstance(sys.modules[name], _DeferredModule)
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    module = _DeferredModule(name)
    module.__spec__, module.__loader__, module.__file__ = spec, spec.loader, spec.origin
    if spec.submodule_search_locations is not None:
        # keras-hub also imports `tensorflow_text.tools.wordpiece_vocab`
        # (pure Python): submodules import without the package's own code.
        module.__path__, module.__package__ = spec.submodule_search_locations, name
    sys.modules[name] = module
    return True
