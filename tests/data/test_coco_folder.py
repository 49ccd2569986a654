import json

import numpy as np
import pytest
from PIL import Image

import keras_solov2  # noqa: F401
from keras_solov2.data.coco_folder import (OrientationGroupedOrder, describe, load_coco, make_dataset,
                                          split_ids)


@pytest.fixture
def coco_mini(shared_dir):
    root = shared_dir / "data" / "coco_train_mini"
    return root / "annotations" / "instances_train2017.json", root / "train2017"


def test_describe_real_coco_subset(coco_mini):
    ann, images = coco_mini
    info = describe(ann, images)
    assert len(info.image_ids) == 160 and info.num_classes == 80
    assert info.category_ids == sorted(info.category_ids) and info.category_ids[-1] == 90
    # Ids have gaps: the contiguous label of category 90 ("toothbrush") is 79, not 89.
    assert info.label_to_category_id[79] == 90 and info.class_names[79] == "toothbrush"
    coco = load_coco(ann)
    assert len(coco.dataset["annotations"]) == 1444
    train, val = split_ids(info.image_ids, 0.2)
    assert len(val) == 32 and not set(train) & set(val) and sorted(train + val) == info.image_ids
    assert split_ids(info.image_ids, 0.0) == (info.image_ids, [])  # no validation
    assert len(split_ids(info.image_ids, 0.001)[1]) == 1
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
            split_ids(info.image_ids, bad)


def test_masks_equal_pycocotools_and_stay_aligned(coco_mini):
    ann, images = coco_mini
    info = describe(ann, images)
    coco = load_coco(ann)
    ids = info.image_ids[:2]
    ds = make_dataset(info, ids, scale=(640, 640), batch_size=1, training=False)
    batches = list(ds)
    assert len(batches) == len(ids)
    for (x, y), image_id in zip(batches, ids):
        assert int(x["image_id"][0]) == image_id
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        h, w = coco.imgs[image_id]["height"], coco.imgs[image_id]["width"]
        assert list(np.asarray(x["original_shape"][0])) == [h, w] == list(np.asarray(x["image_shape"][0]))
        labels = np.asarray(y["gt_labels"][0])
        assert (labels >= 0).sum() == len([a for a in anns if coco.annToMask(a).any()])
        masks = np.asarray(y["gt_masks"][0])
        k = 0
        for a in anns:
            ref = coco.annToMask(a)
            if not ref.any():
                continue
            np.testing.assert_array_equal(masks[k, :h, :w], ref)
            assert masks[k, h:, :].sum() == 0 and masks[k, :, w:].sum() == 0
            assert info.label_to_category_id[labels[k]] == a["category_id"]
            k += 1
        assert k == (labels >= 0).sum() > 0
        # Padding is the mean pixel, which the model normalises to 0.
        if h < 640:
            pad = np.asarray(x["images"][0, h:, 0])
            np.testing.assert_allclose(pad, np.broadcast_to([123.675, 116.28, 103.53], pad.shape), atol=1e-4)


def test_evaluation_batches_of_several_sizes_validate_in_fit(coco_mini):
    """`fit(validation_data=make_dataset(..., training=False))`: mmdet's test
    padding gives batches of several sizes (spec `(None, None, None, 3)`),
    which failed inside the targets ("None values not supported")."""
    from tests.test_model import tiny_model

    ann, images = coco_mini
    info = describe(ann, images)
    ids = info.image_ids[:8]
    train = make_dataset(info, ids[:4], scale=(320, 192), batch_size=2, max_instances=40)
    val = make_dataset(info, ids[4:], scale=(320, 192), batch_size=2, max_instances=40, training=False)
    sizes = {tuple(np.asarray(x["images"]).shape[1:3]) for x, _ in val}
    assert len(sizes) > 1 and val.element_spec[0]["images"].shape[1] is None, sizes
    # tf.data's autotuning thread could hold up the end of `fit` (coco_folder._finished).
    assert train.options().autotune.enabled is False and val.options().autotune.enabled is False
    model = tiny_model(num_classes=info.num_classes)
    model.compile()
    history = model.fit(train, epochs=1, validation_data=val, verbose=0).history
    assert np.isfinite(history["val_loss"][0]) and history["val_loss_mask"][0] > 0, history


def test_training_batches_are_padded_as_mmdet_pads_them(coco_mini):
    """As mmdet's AspectRatioBatchSampler and pad_size_divisor=32: every
    training batch is of one orientation and padded to its largest image
    rounded up to 32, with the mean pixel; `pad_to` gives one static shape.
    On coco_train_mini at 1333×800 the batches have ≈ half the pixels of the
    1344×1344 square every batch had before."""
    ann, images = coco_mini
    info = describe(ann, images)
    coco = load_coco(ann)
    ds = make_dataset(info, batch_size=2, steps_per_epoch=12, shuffle_seed=3)
    assert ds.element_spec[0]["images"].shape.as_list() == [2, None, None, 3]
    pixels = []
    for x, y in ds:
        ids = np.asarray(x["image_id"])
        portrait = {coco.imgs[int(i)]["width"] < coco.imgs[int(i)]["height"] for i in ids}
        assert len(portrait) == 1, ids
        hw = np.asarray(x["image_shape"])
        padded = tuple(int(v) for v in -(-hw.max(0) // 32) * 32)
        assert x["images"].shape == (2, *padded, 3) and y["gt_masks"].shape[2:] == padded
        k = int(np.argmin(hw[:, 0]))
        pad = np.asarray(x["images"])[k, hw[k, 0]:].reshape(-1, 3)
        np.testing.assert_allclose(pad, np.broadcast_to([123.675, 116.28, 103.53], pad.shape), atol=1e-4)
        assert not np.asarray(y["gt_masks"])[k, :, hw[k, 0]:].any()
        pixels.append(padded[0] * padded[1])
    assert np.mean(pixels) < 0.6 * 1344 * 1344
    (x, _), = make_dataset(info, batch_size=2, steps_per_epoch=1, pad_to=(1344, 1344))
    assert x["images"].shape == (2, 1344, 1344, 3)


def test_orientation_grouped_order_is_every_pass_in_batches_of_one_orientation():
    portrait = np.random.default_rng(0).random(11) < 0.3
    order = OrientationGroupedOrder(portrait, batch_size=3, seed=5)
    stream = [order[p] for p in range(3 * 11 * 10)]
    batches = np.reshape(stream, (-1, 3))
    assert all(len(set(portrait[b])) == 1 for b in batches)
    # Every image as often as the others, give or take the groups carried over.
    counts = np.bincount(stream, minlength=11)
    assert counts.max() - counts.min() <= 2, counts
    # A pure function of the seed, whatever the order of the lookups.
    again = OrientationGroupedOrder(portrait, batch_size=3, seed=5)
    assert [again[p] for p in reversed(range(len(stream)))] == stream[::-1]
    # One orientation: the seeded permutations, one after the other.
    plain = OrientationGroupedOrder([False] * 7, batch_size=2, seed=1)
    expected = np.concatenate([np.random.default_rng([1, p]).permutation(7) for p in range(3)])
    assert [plain[p] for p in range(21)] == expected.tolist()


def test_resize_and_flip_keep_masks_on_their_pixels(tmp_path):
    # One red square on black: after resize + flip the mask must still cover red pixels.
    img = np.zeros((60, 100, 3), np.uint8)
    img[10:30, 10:40] = (255, 0, 0)
    Image.fromarray(img).save(tmp_path / "a.png")
    m = np.zeros((60, 100), np.uint8)
    m[10:30, 10:40] = 1
    from pycocotools import mask as mu

    rle = mu.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    (tmp_path / "a.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "height": 60, "width": 100}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "segmentation": rle, "area": 600,
                         "bbox": [10, 10, 30, 20], "iscrowd": 0}],
        "categories": [{"id": 3, "name": "red"}]}))
    info = describe(tmp_path / "a.json", tmp_path)
    (x, y), = make_dataset(info, scale=(200, 120), pad_to=(128, 224), batch_size=1, training=True, flip_prob=1.0)
    mask = np.asarray(y["gt_masks"][0, 0]).astype(bool)
    image = np.asarray(x["images"][0])
    assert list(np.asarray(x["image_shape"][0])) == [120, 200]
    assert set(np.unique(np.asarray(y["gt_masks"]))) <= {0, 1}
    assert mask.sum() == 60 * 40  # nearest-neighbour x2 of 20x30
    # Bilinear image resize blends only the border ring; the mask sits on red.
    red = (image[..., 0] > 200) & (image[..., 1] < 50)
    assert (mask & red).sum() >= 0.9 * mask.sum() and (red & ~mask).sum() == 0
    assert mask[:, 200 - 80:200 - 20].any() and not mask[:, 20:80].any()  # flipped


def _write(tmp_path, images, anns, cats=({"id": 1, "name": "a"},)):
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": list(cats)}))
    return tmp_path / "ann.json"


def test_bad_inputs_name_the_file_and_annotation(tmp_path):
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "ok.png")
    poly = {"segmentation": [[1, 1, 10, 1, 10, 10]], "area": 40, "bbox": [1, 1, 9, 9], "iscrowd": 0}
    ann = _write(tmp_path, [{"id": 1, "file_name": "ok.png", "height": 20, "width": 30}],
                 [dict(poly, id=7, image_id=1, category_id=99)])
    with pytest.raises(ValueError, match=r"ann.json.*annotation 7.*category_id 99"):
        describe(ann, tmp_path)
    ann = _write(tmp_path, [{"id": 1, "file_name": "ok.png", "height": 20, "width": 30}],
                 [dict(poly, id=8, image_id=5, category_id=1)])
    with pytest.raises(ValueError, match=r"annotation 8.*image_id 5"):
        describe(ann, tmp_path)
    for name, err, pattern in [
        ("../outside.png", ValueError, r"'\.\./outside\.png' escapes the image root"),
        ("missing.png", FileNotFoundError, r"image 1 file .*missing\.png does not exist"),
    ]:
        ann = _write(tmp_path, [{"id": 1, "file_name": name, "height": 20, "width": 30}],
                     [dict(poly, id=1, image_id=1, category_id=1)])
        with pytest.raises(err, match=pattern):
            make_dataset(describe(ann, tmp_path), batch_size=1, scale=(64, 64), training=False)
    ann = _write(tmp_path, [{"id": 1, "file_name": "ok.png", "height": 21, "width": 30}],
                 [dict(poly, id=1, image_id=1, category_id=1)])
    with pytest.raises(ValueError, match=r"image 1 \(ok\.png\) is 20x30 but the JSON says 21x30"):
        make_dataset(describe(ann, tmp_path), batch_size=1, scale=(64, 64), training=False)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not a readable COCO"):
        describe(tmp_path / "broken.json", tmp_path)


def test_corrupt_and_truncated_images_name_the_file(tmp_path):
    import tensorflow as tf

    poly = {"segmentation": [[1, 1, 10, 1, 10, 10]], "area": 40, "bbox": [1, 1, 9, 9], "iscrowd": 0}
    (tmp_path / "bad.png").write_bytes(b"this is not an image" * 10)
    ann = _write(tmp_path, [{"id": 1, "file_name": "bad.png", "height": 20, "width": 30}],
                 [dict(poly, id=1, image_id=1, category_id=1)])
    with pytest.raises(ValueError, match=r"ann\.json: image 1 file .*bad\.png is not a readable image"):
        make_dataset(describe(ann, tmp_path), batch_size=1, scale=(64, 64), training=False)
    # A valid header with half the data passes the header check and fails,
    # with its name, when the pipeline reads it.
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    ann = _write(tmp_path, [{"id": 4, "file_name": "t.png", "height": 20, "width": 30}],
                 [dict(poly, id=1, image_id=4, category_id=1)])
    ds = make_dataset(describe(ann, tmp_path), batch_size=1, scale=(64, 64), training=False)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"image 4 file .*t\.png is not a readable image.*truncated"):
        next(iter(ds))


def _rle(mask):
    from pycocotools import mask as mu

    rle = mu.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def test_degenerate_polygons_and_zero_area_masks_are_logged_skips(tmp_path, caplog):
    from pycocotools.coco import COCO

    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "ok.png")
    good = [1, 1, 10, 1, 10, 10]
    segs = {
        1: [good],
        2: [[1, 1, 10, 1]],  # 2 points: pycocotools would read it as a box (and crash)
        3: [[1, 1]],  # 1 point: pycocotools raises
        4: [],  # nothing
        5: [[1, 1, 5, 5, 9, 9]],  # 3 collinear points: a zero-area mask
        6: [[2, 12, 20, 12, 20, 18], [3, 3, 4, 4]],  # one usable polygon: kept, the other dropped
        7: _rle(np.zeros((20, 30))),  # an all-zero RLE
    }
    anns = [{"id": k, "image_id": 1, "category_id": 1, "segmentation": s, "area": 1, "bbox": [0, 0, 1, 1],
             "iscrowd": 0} for k, s in segs.items()]
    ann = _write(tmp_path, [{"id": 1, "file_name": "ok.png", "height": 20, "width": 30}], anns)
    with caplog.at_level("WARNING"):
        (x, y), = make_dataset(describe(ann, tmp_path), batch_size=1, scale=(30, 20), max_instances=8,
                               training=False)
    log = caplog.text
    assert "skipping 3 annotation(s)" in log and "2 (degenerate polygon (< 3 points))" in log
    assert "3 (degenerate polygon" in log and "4 (no segmentation)" in log
    assert "annotation 5 has a zero-area mask" in log and "annotation 7 has a zero-area mask" in log
    labels, masks = np.asarray(y["gt_labels"][0]), np.asarray(y["gt_masks"][0])
    assert (labels >= 0).sum() == 2  # annotations 1 and 6
    coco = COCO(str(ann))
    np.testing.assert_array_equal(masks[0, :20, :30], coco.annToMask(coco.anns[1]))
    only_good = dict(coco.anns[6], segmentation=[segs[6][0]])
    np.testing.assert_array_equal(masks[1, :20, :30], coco.annToMask(only_good))


def test_malformed_segmentations_name_the_annotation(tmp_path):
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "ok.png")
    for seg, pattern in [
        ([1, 1, 10, 1, 10, 10], r"annotation 9 \(image 1\): segmentation is a flat list"),
        ([[1, 1, 10, 1, 10]], r"annotation 9 \(image 1\): a polygon has an odd number \(5\)"),
        ([[1, 1, 10, "a", 10, 10]], r"annotation 9 \(image 1\): a polygon has a non-numeric"),
        (_rle(np.ones((21, 30))), r"annotation 9 \(image 1\): RLE size \[21, 30\] differs from the image's 20x30"),
        ({"counts": [5, 3], "size": [20, 30]}, r"annotation 9 \(image 1\): uncompressed RLE counts sum to 8"),
        ("polygon", r"annotation 9 \(image 1\): segmentation must be polygons or RLE"),
    ]:
        ann = _write(tmp_path, [{"id": 1, "file_name": "ok.png", "height": 20, "width": 30}],
                     [{"id": 9, "image_id": 1, "category_id": 1, "segmentation": seg, "area": 1,
                       "bbox": [0, 0, 1, 1], "iscrowd": 0}])
        with pytest.raises(ValueError, match=r"ann\.json: " + pattern):
            make_dataset(describe(ann, tmp_path), batch_size=1, scale=(64, 64), training=False)


def _odd_images(folder):
    """Image files PIL's convert("RGB") gets right (grayscale, RGBA, palette)
    or wrong (16-bit grayscale clips at 255), and their expected RGB pixel."""
    import tensorflow as tf

    Image.fromarray(np.full((20, 30), 77, np.uint8)).save(folder / "gray.png")
    Image.fromarray(np.full((20, 30, 4), (10, 20, 30, 0), np.uint8)).save(folder / "rgba.png")
    Image.fromarray(np.full((20, 30), 40000, np.uint16)).save(folder / "gray16.png")  # PIL mode I;16
    rgb16 = np.zeros((20, 30, 3), np.uint16) + np.array([40000, 1000, 65535], np.uint16)
    tf.io.write_file(str(folder / "rgb16.png"), tf.io.encode_png(rgb16))
    orange = Image.fromarray(np.full((20, 30, 3), (200, 100, 0), np.uint8))
    orange.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(np.full((20, 30), 1234, np.uint16)).save(folder / "gray16.tif")
    return {"gray.png": (77, 77, 77), "rgba.png": (10, 20, 30), "gray16.png": (156, 156, 156),
            "rgb16.png": (156, 3, 255), "palette.png": (200, 100, 0), "gray16.tif": (4, 4, 4)}


def test_grayscale_rgba_and_16bit_images_become_8bit_rgb(tmp_path):
    from keras_solov2.data.coco_folder import read_rgb

    expected = _odd_images(tmp_path)
    assert Image.open(tmp_path / "gray16.png").convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # PIL's clip
    for name, rgb in expected.items():
        pixels = read_rgb(tmp_path / name)
        assert pixels.dtype == np.uint8 and pixels.shape == (20, 30, 3), name
        assert tuple(pixels[0, 0]) == rgb, (name, pixels[0, 0])
    images = [{"id": i + 1, "file_name": n, "height": 20, "width": 30} for i, n in enumerate(expected)]
    ann = _write(tmp_path, images, [])
    ds = make_dataset(describe(ann, tmp_path), batch_size=1, scale=(30, 20), training=False)
    batches = list(ds)
    assert len(batches) == len(expected)
    for (x, _), rgb in zip(batches, expected.values()):
        np.testing.assert_allclose(np.asarray(x["images"][0, :20, :30]), np.broadcast_to(rgb, (20, 30, 3)))
    Image.fromarray(np.full((20, 30), 0.5, np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match=r"image 3 file .*float\.tif is not a readable image.*mode F"):
        read_rgb(tmp_path / "float.tif", 3, "ann.json")


def test_images_without_annotations_are_kept_as_negatives(tmp_path):
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / name)
    poly = {"segmentation": [[1, 1, 10, 1, 10, 10]], "area": 40, "bbox": [1, 1, 9, 9], "iscrowd": 0}
    ann = _write(tmp_path, [{"id": 1, "file_name": "a.png", "height": 20, "width": 30},
                            {"id": 2, "file_name": "b.png", "height": 20, "width": 30}],
                 [dict(poly, id=1, image_id=1, category_id=1)])
    info = describe(ann, tmp_path)
    assert info.image_ids == [1, 2]
    (x, y), = make_dataset(info, batch_size=2, scale=(30, 20), max_instances=3, training=False)
    assert list(np.asarray(x["image_id"])) == [1, 2]
    labels = np.asarray(y["gt_labels"])
    assert labels.tolist() == [[0], [-1]]  # slots: the batch's most instances
    (_, y_static), = make_dataset(info, batch_size=2, scale=(30, 20), max_instances=3, training=False,
                                  static_slots=True)
    assert np.asarray(y_static["gt_labels"]).tolist() == [[0, -1, -1], [-1, -1, -1]]
    np.testing.assert_array_equal(np.asarray(y_static["gt_masks"])[:, :1], y["gt_masks"])
    assert not np.asarray(y["gt_masks"][1]).any()
    # Training keeps them too (and crops of the positive may make more).
    batches = list(make_dataset(info, batch_size=2, scale=(30, 20), max_instances=3, crop_size=(0.3, 0.3),
                                crop_type="relative_range"))
    assert len(batches) == 1 and sorted(np.asarray(batches[0][0]["image_id"])) == [1, 2]


def test_image_paths_stay_under_their_root_lexically(tmp_path):
    from keras_solov2.data.coco_folder import safe_image_path

    root = tmp_path / "root"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    # A folder symlinked into the root is part of it (importers may build such roots)...
    assert safe_image_path(root, "linked/a.png") == root / "linked" / "a.png"
    # ...but no file_name climbs out, however it is spelled.
    for name in ("../x.png", "a/../../x.png", "linked/../../x.png", "/etc/passwd"):
        with pytest.raises(ValueError, match="escapes the image root"):
            safe_image_path(root, name, "ann.json")


def test_bad_counts_and_too_few_images_are_named(tmp_path):
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    ann = _write(tmp_path, [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}], [])
    info = describe(ann, tmp_path)
    with pytest.raises(IsADirectoryError, match=r"annotation file .* is a folder; expected a COCO instances JSON"):
        describe(tmp_path, tmp_path)
    for args, message in [
        (dict(batch_size=0), "batch_size must be a positive int, got 0"),  # was a ZeroDivisionError
        (dict(max_instances=0), "max_instances must be a positive int, got 0"),
        (dict(steps_per_epoch=0), "steps_per_epoch must be a positive int or None, got 0"),
        (dict(image_ids=[]), r"ann\.json: no images"),
        # One image, batches of 2 with the remainder dropped: epochs of no step.
        (dict(batch_size=2), r"ann\.json: 1 training images, fewer than batch_size=2"),
        (dict(image_ids=[1, 42, 43], batch_size=2), r"ann\.json has no image with id 42 \(nor 1 other"),
        (dict(scale=320), r"scale: 320 is not \(long, short\)"),  # was a TypeError from len()
        (dict(pad_to=(100, 96)), r"pad_to \(100, 96\): expected \(H, W\), positive multiples of 32"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_dataset(info, **{"scale": (30, 20), **args})
    # Evaluation keeps the partial batch, and steps_per_epoch repeats the images.
    assert len(list(make_dataset(info, scale=(30, 20), batch_size=2, training=False))) == 1
    assert len(list(make_dataset(info, scale=(30, 20), batch_size=2, steps_per_epoch=3))) == 3
    from keras_solov2.data.coco_folder import make_tfds_dataset

    with pytest.raises(ValueError, match="max_instances must be a positive int, got -5"):
        make_tfds_dataset(None, max_instances=-5)  # checked before the tfds split is read
