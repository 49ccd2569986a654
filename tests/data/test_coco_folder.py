import json

import numpy as np
import pytest
from PIL import Image

import keras_solov2  # noqa: F401
from keras_solov2.data.coco_folder import describe, load_coco, make_dataset, split_ids


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


def test_masks_equal_pycocotools_and_stay_aligned(coco_mini):
    ann, images = coco_mini
    info = describe(ann, images)
    coco = load_coco(ann)
    ids = info.image_ids[:2]
    ds = make_dataset(info, ids, scale=(640, 640), batch_size=1, training=False)
    for (x, y), image_id in zip(ds, ids):
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
        # Padding is the mean pixel, which the model normalises to 0.
        if h < 640:
            pad = np.asarray(x["images"][0, h:, 0])
            np.testing.assert_allclose(pad, np.broadcast_to([123.675, 116.28, 103.53], pad.shape), atol=1e-4)


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
