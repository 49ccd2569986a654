import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import keras_solov2  # noqa: F401
from keras_solov2.data import SOLOv2CocoConfig, load_coco, make_tfds_dataset


def test_tfds_build_of_real_coco_subset(shared_dir, tmp_path):
    root = shared_dir / "data" / "coco_train_mini"
    ann = root / "annotations" / "instances_train2017.json"
    config = SOLOv2CocoConfig(name="coco_train_mini", annotation_file=str(ann), image_dir=str(root / "train2017"))
    builder = tfds.builder("solov2_coco", config=config, data_dir=str(tmp_path))
    builder.download_and_prepare()
    info = builder.info
    assert info.splits["train"].num_examples == 160
    assert len(info.metadata["category_ids"]) == 80 and info.metadata["category_ids"][-1] == 90
    assert info.metadata["class_names"][79] == "toothbrush"

    coco = load_coco(ann)
    ds = builder.as_dataset(split="train")
    total, crowd, checked = 0, 0, 0
    for ex in tfds.as_numpy(ds):
        objs = ex["objects"]
        total += len(objs["label"])
        crowd += int(objs["is_crowd"].sum())
        if checked < 3:  # masks equal pycocotools' annToMask, in annotation order
            anns = [a for a in coco.imgToAnns[int(ex["image/id"])] if coco.annToMask(a).any()]
            assert len(anns) == len(objs["mask"]) == len(objs["label"]) > 0
            for a, m, cat, lab in zip(anns, objs["mask"], objs["category_id"], objs["label"]):
                np.testing.assert_array_equal(m[..., 0], coco.annToMask(a))
                assert cat == a["category_id"] and info.metadata["category_ids"][lab] == cat
            checked += 1
    assert total == 1444 and crowd > 0  # every official annotation (none is empty here), crowds marked

    batches = make_tfds_dataset(ds.take(2), scale=(320, 320), batch_size=2, max_instances=50, training=False)
    x, y = next(iter(batches))
    # mmdet's test padding: the batch's largest image, rounded up to 32.
    hw = np.asarray(x["image_shape"])
    padded = tuple(int(v) for v in (hw.max(0) + 31) // 32 * 32)
    # Slots: the batch's largest instance count; the other image's end in -1.
    counts = (np.asarray(y["gt_labels"]) >= 0).sum(1)
    assert x["images"].shape == (2, *padded, 3) and y["gt_masks"].shape == (2, counts.max(), *padded)
    assert 0 < counts.min() < counts.max() <= 50
    assert (np.asarray(y["gt_labels"])[counts.argmin(), counts.min():] == -1).all()
    assert not np.asarray(y["gt_masks"])[counts.argmin(), counts.min():].any()
    # static_slots: the same batch in max_instances slots.
    _, y_static = next(iter(make_tfds_dataset(ds.take(2), scale=(320, 320), batch_size=2, max_instances=50,
                                              training=False, static_slots=True)))
    assert y_static["gt_masks"].shape == (2, 50, *padded)
    np.testing.assert_array_equal(np.asarray(y_static["gt_masks"])[:, :counts.max()], y["gt_masks"])
    np.testing.assert_array_equal(np.asarray(y_static["gt_labels"])[:, :counts.max()], y["gt_labels"])
    assert (np.asarray(y_static["gt_labels"])[:, counts.max():] == -1).all()
    # Training batches: one orientation each (of the source image), padded to their largest image;
    # the groups left unfilled at the end make the last, mixed batch: len(ds) // batch_size in all.
    train = make_tfds_dataset(ds.take(25), scale=(320, 320), batch_size=3, max_instances=50)
    assert len(train) == 8
    mixed = 0
    for x, y in train:
        original, hw = np.asarray(x["original_shape"]), np.asarray(x["image_shape"])
        mixed += len(set(original[:, 1] < original[:, 0])) > 1
        assert x["images"].shape[1:3] == tuple(int(v) for v in -(-hw.max(0) // 32) * 32)
    assert mixed <= 1
    assert hw.max() == 320
    pad_pixels = np.asarray(x["images"])[np.argmin(hw[:, 0]), hw[:, 0].min():]
    if pad_pixels.size:  # padded with the mean pixel, which the model normalises to 0
        np.testing.assert_array_equal(np.unique(pad_pixels.reshape(-1, 3), axis=0),
                                      np.array([[123.675, 116.28, 103.53]], "float32"))
    labels = np.asarray(y["gt_labels"])
    assert (labels >= 0).any() and set(np.unique(np.asarray(y["gt_masks"]))) <= {0, 1}


def _build(folder, data_dir, images, anns):
    (folder / "ann.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                 "categories": [{"id": 1, "name": "a"}]}))
    config = SOLOv2CocoConfig(name="odd", annotation_file=str(folder / "ann.json"), image_dir=str(folder))
    builder = tfds.builder("solov2_coco", config=config, data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder


def test_tfds_builder_converts_odd_images_and_skips_unusable_annotations(tmp_path, caplog):
    from tests.data.test_coco_folder import _odd_images, _rle

    folder = tmp_path / "data"
    folder.mkdir()
    expected = _odd_images(folder)
    images = [{"id": i + 1, "file_name": n, "height": 20, "width": 30} for i, n in enumerate(expected)]
    crowd = np.zeros((20, 30), np.uint8)
    crowd[10:, 20:] = 1
    anns = [{"id": k, "image_id": 1, "category_id": 1, "segmentation": s, "area": 1, "bbox": [0, 0, 1, 1],
             "iscrowd": int(k == 4)}
            for k, s in [(1, [[1, 1, 10, 1, 10, 10]]), (2, [[1, 1, 10, 1]]), (3, [[1, 1, 5, 5, 9, 9]]),
                         (4, _rle(crowd))]]
    with caplog.at_level("WARNING"):
        builder = _build(folder, tmp_path / "tfds", images, anns)
    assert "skipping 1 annotation(s)" in caplog.text and "2 (degenerate polygon" in caplog.text
    assert "annotation 3 has a zero-area mask" in caplog.text
    ds = builder.as_dataset(split="train")
    seen = {}
    for ex in tfds.as_numpy(ds):
        seen[ex["image/filename"].decode()] = ex
        assert ex["image"].shape == (20, 30, 3) and ex["image"].dtype == np.uint8
    assert sorted(seen) == sorted(expected)  # images without annotations are kept
    for name, rgb in expected.items():
        assert tuple(seen[name]["image"][0, 0]) == rgb, name
    objs = seen["gray.png"]["objects"]
    assert list(objs["is_crowd"]) == [False, True] and objs["mask"][1, 10:, 20:].all()
    assert all(len(seen[n]["objects"]["label"]) == 0 for n in expected if n != "gray.png")
    # Negatives go through the pipeline too (crowd left out of the targets).
    x, y = next(iter(make_tfds_dataset(ds, scale=(32, 32), batch_size=6, max_instances=2, training=False)))
    labels = np.asarray(y["gt_labels"])
    assert labels.shape == (6, 1) and (labels >= 0).sum() == 1  # slots: the most real instances of an image


def test_tfds_builder_errors_name_the_file_and_annotation(tmp_path):
    poly = {"segmentation": [[1, 1, 10, 1, 10, 10]], "area": 40, "bbox": [1, 1, 9, 9], "iscrowd": 0}
    image = {"id": 1, "file_name": "ok.png", "height": 20, "width": 30}
    cases = [
        ("missing", [dict(image, file_name="missing.png")], [], FileNotFoundError,
         r"image 1 file .*missing\.png does not exist"),
        ("corrupt", [dict(image, file_name="bad.png")], [], ValueError, r"image 1 file .*bad\.png is not a readable"),
        ("truncated", [dict(image, file_name="t.png")], [], ValueError, r"image 1 file .*t\.png .*truncated"),
        ("size", [dict(image, height=21)], [], ValueError, r"image 1 \(ok\.png\) is 20x30 but the JSON says 21x30"),
        ("escape", [dict(image, file_name="../ok.png")], [], ValueError, r"'\.\./ok\.png' escapes the image root"),
        ("category", [image], [dict(poly, id=7, image_id=1, category_id=99)], ValueError,
         r"annotation 7 has unknown category_id 99"),
        ("image_id", [image], [dict(poly, id=8, image_id=5, category_id=1)], ValueError,
         r"annotation 8 refers to unknown image_id 5"),
        ("polygon", [image], [dict(poly, id=9, image_id=1, category_id=1, segmentation=[1, 1, 10, 1, 10, 10])],
         ValueError, r"annotation 9 \(image 1\): segmentation is a flat list"),
        ("iscrowd", [image], [dict(poly, id=10, image_id=1, category_id=1, iscrowd="yes")], ValueError,
         r"annotation 10 has iscrowd 'yes'; expected 0 or 1"),
    ]
    for name, images, anns, err, pattern in cases:
        folder = tmp_path / name / "images"
        folder.mkdir(parents=True)
        Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(folder / "ok.png")
        Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / name / "ok.png")  # outside the root
        (folder / "bad.png").write_bytes(b"not an image" * 20)
        noise = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
        Image.fromarray(noise).save(folder / "t.png")
        (folder / "t.png").write_bytes((folder / "t.png").read_bytes()[:600])
        with pytest.raises(err, match=r"ann\.json.*" + pattern):
            _build(folder, tmp_path / name / "tfds", images, anns)


def test_tfds_builder_refuses_a_stale_build(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    images = [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}]
    ann = {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]], "area": 25,
           "bbox": [1, 1, 5, 5], "iscrowd": 0}
    builder = _build(folder, tmp_path / "tfds", images, [ann])
    assert builder.info.splits["train"].num_examples == 1
    _build(folder, tmp_path / "tfds", images, [ann])  # same source: the build is reused
    with pytest.raises(ValueError, match="was prepared for config 'odd' from .*ann.json.*Delete"):
        _build(folder, tmp_path / "tfds", images, [dict(ann, segmentation=[[1, 1, 7, 1, 7, 7]])])
    # A build with no record (an earlier version's, or an interrupted one) is not vouched for.
    (tmp_path / "tfds2").mkdir()
    builder = _build(folder, tmp_path / "tfds2", images, [ann])
    (Path(str(builder.data_dir)) / "solov2_source.json").unlink()
    with pytest.raises(ValueError, match="no record of the annotation file.*Delete"):
        _build(folder, tmp_path / "tfds2", images, [ann])
