"""`keras-solov2 predict` on image files: overlays and a COCO results JSON; bad
input as one-line errors; the count options' checks; `--model` resolution;
what `train --seed` fixes."""

import json

import numpy as np
import pytest
from PIL import Image

import keras_solov2  # noqa: F401
from keras_solov2.cli import _load_model, main
from tests.test_model import tiny_model


def save_detecting_model(path):
    """A tiny 3-class model (`a`, `b`, `c`) saved to `path`, whose class
    logits start at 0 (scores ~0.5): detections on random weights."""
    model = tiny_model(class_names=["a", "b", "c"], max_per_img=5)
    bias = model.instance_head.conv_cls.bias
    bias.assign(np.zeros(bias.shape, "float32"))
    model.save(path)


def test_predict_writes_overlays_and_results_with_category_ids(tmp_path):
    save_detecting_model(tmp_path / "m.keras")
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


def test_predict_reads_a_photo_turned_by_its_exif_orientation(tmp_path):
    from tests.data.test_image_orientation import _save_with_orientation

    save_detecting_model(tmp_path / "m.keras")
    pixels = np.random.default_rng(1).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    _save_with_orientation(tmp_path / "photo.jpg", pixels, 6)  # stored 48x80, shown 80x48
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "photo.jpg"), "--model", str(tmp_path / "m.keras"),
                 "--output", str(out), "--score-thr", "0.0"]) in (None, 0)
    assert Image.open(out / "photo.png").size == (48, 80)  # (width, height) of the turned photo
    results = json.loads((out / "results.json").read_text())
    assert results and {tuple(r["segmentation"]["size"]) for r in results} == {(80, 48)}
    # Nothing drawn (no score reaches 1): the overlay is the photo turned 90° clockwise.
    assert main(["predict", str(tmp_path / "photo.jpg"), "--model", str(tmp_path / "m.keras"),
                 "--output", str(tmp_path / "plain"), "--score-thr", "1.0"]) in (None, 0)
    with Image.open(tmp_path / "photo.jpg") as stored:
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "plain" / "photo.png")),
                                      np.rot90(np.asarray(stored.convert("RGB")), -1))


@pytest.mark.parametrize("command, option", [
    ("train", "--batch-size"), ("train", "--epochs"),
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


def test_micro_batch_size_option_takes_auto_none_or_a_count(capsys):
    from keras_solov2.training import _micro_batch_size

    assert [_micro_batch_size(v) for v in ("auto", "AUTO", "none", "3")] == ["auto", "auto", None, 3]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--annotations", "a.json", "--images", "img", "--micro-batch-size", "0"])
    assert exit_info.value.code == 2
    assert "--micro-batch-size: expected auto, none or a positive integer, got '0'" in capsys.readouterr().err


def test_predict_skips_unreadable_files_by_name_and_scores_by_the_annotation_ids(tmp_path, capsys):
    save_detecting_model(tmp_path / "m.keras")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(images / "good.png")
    (images / "broken.png").write_text("not an image")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / "cut.jpg")
    (images / "cut.jpg").write_bytes((images / "cut.jpg").read_bytes()[:400])
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 31, "file_name": "sub/good.png", "height": 70, "width": 90}],
                               "annotations": [], "categories": [{"id": k, "name": n} for k, n in
                                                                 [(1, "a"), (2, "b"), (3, "c")]]}))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(images), "--model", str(tmp_path / "m.keras"), "--output", str(out),
              "--score-thr", "0.0", "--annotations", str(ann)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{images / 'broken.png'}: skipped, not a readable image" in err
    assert f"{images / 'cut.jpg'}: skipped, not a readable image (Truncated File Read)" in err
    assert err.strip().splitlines()[-1] == (
        f"keras-solov2 predict: error: 2 of 3 files are not readable images and were skipped: "
        f"{images / 'broken.png'}, {images / 'cut.jpg'} (the results of the others are written)")
    assert sorted(p.name for p in out.iterdir()) == ["good.png", "results.json"]
    results = json.loads((out / "results.json").read_text())
    assert results and {r["image_id"] for r in results} == {31}  # the annotation file's id, by file name


def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 2, "width": 2}],
                               "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "iscrowd": "yes",
                                                "segmentation": [[0, 0, 1, 0, 1, 1]]}],
                               "categories": [{"id": 1, "name": "a"}]}))
    for args, message in [
        (["evaluate", "--annotations", str(ann), "--images", str(tmp_path), "--model", "solov2_light_r18"],
         f"keras-solov2 evaluate: error: {ann}: annotation 5 has iscrowd 'yes'; expected 0 or 1."),
        (["train", "--annotations", str(ann), "--images", str(tmp_path), "--scale", "800"],
         "keras-solov2 train: error: --scale '800': expected LONG,SHORT or LONG,SHORT;LONG,SHORT;..."),
        (["predict", str(tmp_path / "none"), "--model", "solov2_light_r18"],
         f"keras-solov2 predict: error: {tmp_path / 'none'} is neither an image file nor a folder."),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and "Traceback" not in err
        assert err.strip().splitlines()[-1] == message


def write_training_folder(tmp_path, file_names=("a.png",)):
    """A 1-class COCO JSON listing `file_names` (only `a.png` is written, 32×32,
    one square each) and a tiny model for it: `(annotations, images, model)`."""
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "a.png")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({
        "images": [{"id": k, "file_name": name, "height": 32, "width": 32} for k, name in enumerate(file_names, 1)],
        "annotations": [{"id": k, "image_id": k, "category_id": 1, "iscrowd": 0, "area": 64.0,
                         "bbox": [4, 4, 8, 8], "segmentation": [[4, 4, 12, 4, 12, 12, 4, 12]]}
                        for k in range(1, len(file_names) + 1)],
        "categories": [{"id": 1, "name": "a"}]}))
    tiny_model(num_classes=1, class_names=["a"]).save(tmp_path / "m.keras")
    return ann, images, tmp_path / "m.keras"


def test_train_on_a_missing_image_names_it_and_leaves_no_output_folder(tmp_path, capsys):
    # Before: the output folder and its split.json were written before the images were checked.
    ann, images, model = write_training_folder(tmp_path, ("a.png", "gone.png"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--annotations", str(ann), "--images", str(images), "--model", str(model),
              "--output", str(out), "--val-fraction", "0", "--batch-size", "1", "--scale", "64,32"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"keras-solov2 train: error: {ann}: image 2 file {images / 'gone.png'} does not exist.")
    assert not out.exists()


def test_model_option_names_what_it_accepts_and_fits_a_saved_model_to_the_data(tmp_path):
    with pytest.raises(ValueError, match=r"--model 'solov2_lite_r18' is neither a file or folder nor a name: "
                                         r"architectures \[.*'solov2_light_r18'.*\], presets \[.*'resnet50_coco'"):
        _load_model("solov2_lite_r18")
    model = tiny_model(class_names=["a", "b", "c"])
    model.save(tmp_path / "m.keras")
    # `train --model m.keras` on data of one class: a new class-logit conv, every other weight kept.
    one = _load_model(str(tmp_path / "m.keras"), num_classes=1, class_names=["person"])
    assert one.num_classes == 1 and one.class_names == ["person"]
    np.testing.assert_array_equal(np.asarray(one.mask_feature_head.weights[0]),
                                  np.asarray(model.mask_feature_head.weights[0]))
    same = _load_model(str(tmp_path / "m.keras"), num_classes=3, class_names=["x", "y", "z"])
    assert same.num_classes == 3 and same.class_names == ["x", "y", "z"]


def test_train_refuses_the_sequential_step_with_micro_batches_in_one_line(tmp_path, capsys):
    ann, images, model = write_training_folder(tmp_path)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--annotations", str(ann), "--images", str(images), "--model", str(model),
              "--output", str(out), "--val-fraction", "0", "--batch-size", "2", "--scale", "64,32",
              "--step-executor", "sequential", "--micro-batch-size", "1"])
    assert exit_info.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("keras-solov2 train: error: step_executor='sequential' runs the step's ops one at a "
                           "time on the CPU alone, but TensorFlow runs the micro-batch loop"), last
    assert not out.exists()


def test_train_seed_fixes_the_initial_weights_of_the_layers_it_builds(tmp_path, monkeypatch):
    # Before: --seed seeded the split and the data stream only, so the same
    # command started from other random weights at every run.
    ann, images, _ = write_training_folder(tmp_path)
    tiny_model(class_names=["a", "b", "c"]).save(tmp_path / "three.keras")
    started = []
    monkeypatch.setattr("keras_solov2.training.train", lambda model, *args, **kwargs: started.append(
        np.asarray(model.instance_head.conv_cls.kernel)))

    def initial_class_conv(seed):
        # 3 classes, data of 1: the run builds a new class-logit conv.
        main(["train", "--annotations", str(ann), "--images", str(images), "--model", str(tmp_path / "three.keras"),
              "--output", str(tmp_path / "run"), "--val-fraction", "0", "--seed", str(seed)])
        return started[-1]

    first, again, other = initial_class_conv(5), initial_class_conv(5), initial_class_conv(6)
    assert first.shape[-1] == 1 and np.std(first) > 0
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
