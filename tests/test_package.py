"""Package-level behaviour: what importing keras_solov2 does to the process."""

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

needs_tensorflow_text = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow_text") is None or not Path("/proc/self/maps").exists(),
    reason="needs tensorflow-text installed (keras-hub's dependency) and Linux's /proc",
)


def run_python(code):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


@needs_tensorflow_text
def test_tensorflow_text_loads_only_when_keras_hub_text_code_uses_it():
    out = run_python(
        """
        def loaded():
            return any("tensorflow_text" in line for line in open("/proc/self/maps"))

        import numpy as np

        import keras_solov2
        from keras_solov2 import SOLOv2  # imports keras-hub
        import keras_hub

        print(loaded())
        from keras_hub.src.utils import tensor_utils
        from tensorflow_text import case_fold_utf8

        print(case_fold_utf8(["ABC"]).numpy()[0].decode())
        print(tensor_utils.tf_text.case_fold_utf8(["DEF"]).numpy()[0].decode())
        vocab = ["[UNK]", "the", "qu", "##ick"]
        ids = keras_hub.tokenizers.WordPieceTokenizer(vocabulary=vocab)(["the quick"])
        print(",".join(str(int(i)) for i in np.asarray(ids).ravel()))
        print(loaded())
        """
    )
    # Without the deferral, importing keras-hub maps tensorflow-text's libraries.
    assert out == ["False", "abc", "def", "1,2,3", "True"]


@needs_tensorflow_text
def test_tensorflow_text_imported_first_is_left_alone():
    out = run_python(
        """
        import sys, types
        import tensorflow_text
        import keras_solov2

        print(type(sys.modules["tensorflow_text"]) is types.ModuleType)
        print(sys.modules["tensorflow_text"] is tensorflow_text)
        """
    )
    assert out == ["True", "True"]
