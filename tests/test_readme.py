"""The README's Python examples run as a new user would run them.

Each example is read from README.md (so an edit that breaks it fails here) and
run in a fresh interpreter, in a scratch folder, with its own Keras and
tensorflow-datasets caches.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example(heading):
    """The first ```python block under the README section titled `heading`."""
    text = README.read_text()
    section = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## )", text, re.M | re.S)
    assert section, f"README.md has no section '## {heading}'"
    block = re.search(r"^```python\n(.*?)^```", section.group(1), re.M | re.S)
    assert block, f"README.md's '## {heading}' has no python example"
    return block.group(1)


def run_example(code, cwd, timeout):
    env = dict(os.environ, KERAS_HOME=str(cwd / "keras_home"), TFDS_DATA_DIR=str(cwd / "tfds"),
               TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_build_and_predict_example(tmp_path):
    code = readme_example("Build a model and predict (5 lines)")
    out = run_example(code + "\nprint(out['masks'].shape, out['scores'].shape, out['labels'].shape)\n",
                      tmp_path, timeout=600)
    # The shapes the example's comment promises: max_per_img (100) masks at the input size.
    assert out.strip().splitlines()[-1] == "(1, 100, 480, 640) (1, 100) (1, 100)"


# The cache as a first download leaves it (this machine cannot reach the
# checkpoint host): the converted light R18 preset, random weights.
CACHED_PRESET = """
from keras_solov2 import SOLOv2
from keras_solov2.models import presets
presets.save_to_preset(SOLOv2.from_architecture("solov2_light_r18"),
                       presets.converted_preset_dir("light_resnet18_coco"),
                       metadata={"source": {"converter_version": presets.CONVERTER_VERSION}})
"""

REPORT = """
import json
from keras_solov2.evaluation import evaluate_coco
saved = keras.saving.load_model("best.keras")
saved_ap = evaluate_coco(saved, val, "peds.json", builder.info.metadata["category_ids"])["AP"]
json.dump({"saved_ap": saved_ap, "examples": builder.info.splits["train"].num_examples,
           "train_examples": builder.info.splits["train[:80%]"].num_examples,
           "steps": len(train), "val_batches": len(val), "num_classes": saved.num_classes,
           "class_names": list(saved.class_names), "history": model.history.history},
          open("report.json", "w"))
"""


def test_fine_tuning_example_on_pennfudan(shared_dir, tmp_path):
    """The fine-tuning example, verbatim but for one epoch instead of 12, on
    the real Penn-Fudan images and instance masks: importer → tfds builder →
    `make_tfds_dataset` → `from_preset(num_classes=1)` → `fit` with the mask
    AP callback and a best-AP checkpoint."""
    code = readme_example("Fine-tune on your own data (import → tensorflow-datasets → fit → evaluate)")
    assert "epochs=12" in code
    (tmp_path / "PennFudanPed").symlink_to(shared_dir / "data" / "pennfudan")
    run_example(CACHED_PRESET + code.replace("epochs=12", "epochs=1") + REPORT, tmp_path, timeout=1500)

    report = json.loads((tmp_path / "report.json").read_text())
    images = json.loads((tmp_path / "peds.json").read_text())["images"]
    assert report["examples"] == len(images) == 126
    assert report["steps"] == report["train_examples"] // 4  # batches of 4, the rest dropped
    assert report["val_batches"] == len(images) - report["train_examples"]  # batches of 1
    assert report["num_classes"] == 1 and report["class_names"] == ["pedestrian"]
    (loss,) = report["history"]["loss"]
    (ap,) = report["history"]["val_mask_AP"]
    assert loss == loss and 0 < loss < 100  # finite
    # The callback's AP is pycocotools' (not -1: the images and categories matched), and it
    # is the AP of the model ModelCheckpoint saved (after one epoch from random weights both
    # may be 0: then this checks that best.keras was written and evaluates).
    assert 0.0 <= ap <= 1.0
    assert ap == pytest.approx(report["saved_ap"], abs=1e-9)
