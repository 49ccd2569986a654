"""`keras-solov2 predict` on image files: overlays and a COCO results JSON; the count options' checks."""

import json

import numpy as np
import pytest
from PIL import Image

import keras_solov2  # noqa: F401
from keras_solov2.cli import main
from tests.test_model import tiny_model


def test_predict_writes_overlays_and_results_with_category_ids(tmp_path):
    model = tiny_model(class_names=["a", "b", "c"], max_per_img=5)
    bias = model.instance_head.conv_cls.bias
    bias.assign(np.zeros(bias.shape, "float32"))  # scores ~0.5: detections on random weights
    model.save(tmp_path / "m.keras")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"one.png": (70, 90), "two.jpg": (64, 128)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / name)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [], "annotations": [],
                               "categories": [{"id": 7, "name": "a"}, {"id": 9, "name": "b"}, {"id": 40, "name": "c"}]}))
    out = tmp_path / "out"
    assert main(["predict", str(images), "--model", str(tmp_path / "m.keras"), "--output", str(out),
                 "--score-thr", "0.0", "--annotations", str(ann)]) in (None, 0)
    assert sorted(p.name for p in out.iterdir()) == ["one.png", "results.json", "two.png"]
    assert Image.open(out / "one.png").size == (90, 70)
    results = json.loads((out / "results.json").read_text())
    assert results and {r["file_name"] for r in results} <= {"one.png", "two.jpg"}
    for r in results:
        assert r["category_id"] == [7, 9, 40][r["label"]] and r["category_name"] == "abc"[r["label"]]
        assert tuple(r["segmentation"]["size"]) in {(70, 90), (64, 128)}


@pytest.mark.parametrize("command, option", [
    ("train", "--micro-batch-size"), ("train", "--batch-size"), ("train", "--epochs"),
    ("train", "--eval-every"), ("train", "--steps-per-epoch"), ("train", "--max-instances"),
    ("evaluate", "--batch-size"),
])
def test_count_options_reject_values_below_one(capsys, command, option):
    # Before: --eval-every 0 divided by zero after the first epoch's training.
    args = [command, "--annotations", "a.json", "--images", "img", option, "0"]
    if command == "evaluate":
        args += ["--model", "m.keras"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert f"{option}: expected a positive integer, got '0'" in capsys.readouterr().err
