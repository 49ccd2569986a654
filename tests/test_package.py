"""Package-level behaviour: what importing keras_solov2 does to the process.

Each test runs in a fresh interpreter: what is imported, and in which order,
is the behaviour under test.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

needs_tensorflow_text = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow_text") is None,
    reason="needs tensorflow-text installed (keras-hub's dependency)",
)
needs_proc_maps = pytest.mark.skipif(
    not Path("/proc/self/maps").exists(), reason="reads the process's mapped files (Linux /proc)"
)

LOADED = """
def loaded():
    # tensorflow-text's shared libraries are mapped once its code has run.
    return any("tensorflow_text" in line for line in open("/proc/self/maps"))
"""


def run_python(code):
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


@needs_tensorflow_text
@needs_proc_maps
def test_by_default_keras_hub_loads_tensorflow_text_as_it_always_does():
    out = run_python(
        LOADED
        + """
import sys, types
from keras_solov2 import SOLOv2  # imports keras-hub

print(loaded(), type(sys.modules["tensorflow_text"]) is types.ModuleType)
"""
    )
    assert out == ["True", "True"]


@needs_tensorflow_text
@needs_proc_maps
def test_deferred_tensorflow_text_loads_at_first_use_and_keras_hub_text_code_works():
    out = run_python(
        LOADED
        + """
import sys
import numpy as np
import keras_solov2

print(keras_solov2.defer_tensorflow_text())
from keras_solov2 import SOLOv2  # imports keras-hub
import keras_hub
import tensorflow_text

print(loaded())
from keras_hub.src.utils import tensor_utils

print(tensor_utils.tf_text.case_fold_utf8(["DEF"]).numpy()[0].decode())
from tensorflow_text import case_fold_utf8

print(case_fold_utf8(["ABC"]).numpy()[0].decode())
vocab = ["[UNK]", "the", "qu", "##ick"]
ids = keras_hub.tokenizers.WordPieceTokenizer(vocabulary=vocab)(["the quick"])
print(",".join(str(int(i)) for i in np.asarray(ids).ravel()))
# keras-hub imported this subpackage through the stand-in: the real module has it too.
print(sys.modules["tensorflow_text"].tools.wordpiece_vocab.__name__)
print(loaded(), keras_solov2.defer_tensorflow_text())
"""
    )
    assert out == [
        "True", "False", "def", "abc", "1,2,3", "tensorflow_text.tools.wordpiece_vocab", "True", "False"
    ]


@needs_tensorflow_text
def test_defer_is_a_no_op_once_tensorflow_text_is_imported():
    out = run_python(
        """
import sys, types
import keras_hub  # imports tensorflow-text
import keras_solov2

print(keras_solov2.defer_tensorflow_text(), type(sys.modules["tensorflow_text"]) is types.ModuleType)
"""
    )
    assert out == ["False", "True"]


@needs_tensorflow_text
def test_command_line_defers_tensorflow_text():
    out = run_python(
        """
import sys
from keras_solov2 import cli

try:
    cli.main(["--help"])
except SystemExit:
    pass
print(type(sys.modules["tensorflow_text"]).__name__)
"""
    )
    assert out[-1] == "_DeferredModule"


def test_import_loads_neither_keras_nor_tensorflow_and_refuses_another_backend():
    # The command line sets TF_CPP_MIN_LOG_LEVEL after importing the package:
    # it only takes effect if TensorFlow is not loaded by then.
    out = run_python("""
import sys, keras_solov2
print("tensorflow" in sys.modules, "keras" in sys.modules, keras_solov2.SOLOv2.__name__)
""")
    assert out == ["False", "False", "SOLOv2"]
    # Asked for in the environment, or Keras imported first with it (a stand-in
    # module: the other backends need packages this project does not install).
    fake_keras = ("import sys, types; sys.modules['keras'] = types.SimpleNamespace("
                  "config=types.SimpleNamespace(backend=lambda: 'torch')); import keras_solov2")
    for code, env, backend in [("import keras_solov2", {"KERAS_BACKEND": "numpy"}, "numpy"),
                               (fake_keras, {}, "torch")]:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env={**os.environ, **env})
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert f"keras_solov2 needs the TensorFlow backend, but Keras has backend '{backend}'" in proc.stderr
