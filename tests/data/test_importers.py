import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

import keras_solov2  # noqa: F401
from keras_solov2.data.coco_folder import describe, make_dataset
from keras_solov2.data.importers import import_dataset


def test_pennfudan_instance_pngs(shared_dir, tmp_path):
    root = shared_dir / "data" / "pennfudan"
    out = tmp_path / "pennfudan.json"
    report = import_dataset("instance_png", root / "PNGImages", root / "PedMasks", out, category="pedestrian")
    assert report["images"] == 126 and report["categories"] == 1 and not report["skipped"]
    ids = np.asarray(Image.open(root / "PedMasks" / "FudanPed00001_mask.png"))
    coco = COCO(str(out))
    first = [i for i in coco.imgs.values() if i["file_name"] == "FudanPed00001.png"][0]
    anns = coco.imgToAnns[first["id"]]
    assert len(anns) == len(np.unique(ids)) - 1
    for k, a in zip(sorted(set(np.unique(ids)) - {0}), anns):
        np.testing.assert_array_equal(coco.annToMask(a), (ids == k).astype(np.uint8))
    with pytest.raises(FileExistsError, match="overwrite"):
        import_dataset("instance_png", root / "PNGImages", root / "PedMasks", out)
    # The pipeline reads it.
    info = describe(out, report["image_root"])
    (x, y), = make_dataset(info, info.image_ids[:1], scale=(320, 320), batch_size=1, training=False)
    assert int((np.asarray(y["gt_labels"]) >= 0).sum()) == len(anns)


def test_dsb_instance_folders(shared_dir, tmp_path):
    root = shared_dir / "data" / "dsb2018" / "stage1_train"
    some = sorted(p.name for p in root.iterdir())[:5]
    sub = tmp_path / "dsb"
    sub.mkdir()
    for name in some:  # links, not copies
        (sub / name).symlink_to(root / name)
    report = import_dataset("instance_folders", sub, tmp_path / "dsb.json", category="nucleus")
    expected = sum(len(list((root / n / "masks").glob("*.png"))) for n in some)
    assert report["images"] == 5 and report["instances"] + len(report["skipped"]) == expected
    coco = COCO(str(tmp_path / "dsb.json"))
    a = coco.dataset["annotations"][0]
    img = coco.imgs[a["image_id"]]
    mask_files = sorted((sub / img["file_name"].split("/")[0] / "masks").glob("*.png"))
    ref = np.asarray(Image.open(mask_files[0]))
    np.testing.assert_array_equal(coco.annToMask(a), (ref > 0).astype(np.uint8))


def test_labelme_matches_the_reference_coco(shared_dir, tmp_path):
    src = shared_dir / "data" / "labelme_example"
    report = import_dataset("labelme", src / "data_annotated", tmp_path / "lm.json")
    ours = COCO(str(tmp_path / "lm.json"))
    ref = COCO(str(src / "data_dataset_coco" / "annotations.json"))
    assert report["images"] == 3
    names = {c["id"]: c["name"] for c in ours.dataset["categories"]}
    ref_names = {c["id"]: c["name"] for c in ref.dataset["categories"]}
    ours_by_img = {i["file_name"].split("/")[-1]: i["id"] for i in ours.imgs.values()}
    matched = 0
    for ra in ref.dataset["annotations"]:
        fname = ref.imgs[ra["image_id"]]["file_name"].split("/")[-1]
        rm = ref.annToMask(ra).astype(bool)
        cands = [a for a in ours.imgToAnns[ours_by_img[fname]] if not a["iscrowd"]
                 and names[a["category_id"]] == ref_names[ra["category_id"]]]
        best = max(((ours.annToMask(a).astype(bool) & rm).sum() / (ours.annToMask(a).astype(bool) | rm).sum()
                    for a in cands), default=0)
        assert best > 0.95, (fname, ref_names[ra["category_id"]], best)
        matched += 1
    assert matched == len(ref.dataset["annotations"])


def test_labelme_bad_inputs(tmp_path):
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "a.png")
    doc = {"imagePath": "a.png", "imageHeight": 10, "imageWidth": 12,
           "shapes": [{"label": "cat", "points": [[1, 1], [5, 1]], "shape_type": "polygon"},
                      {"label": "cat", "points": [[1, 1], [8, 1], [8, 8]], "shape_type": "polygon"}]}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    report = import_dataset("labelme", tmp_path, tmp_path / "out" / "x.json")
    assert report["instances"] == 1 and "a.json shape 0: polygon with 2 points" in report["skipped"][0]
    (tmp_path / "a.json").write_text(json.dumps(dict(doc, imagePath="../a.png")))
    with pytest.raises(ValueError, match="escapes"):
        import_dataset("labelme", tmp_path, tmp_path / "out" / "y.json")
    with pytest.raises(ValueError, match="unknown format"):
        import_dataset("voc", tmp_path, tmp_path / "z.json")


def test_labelme_ignore_region_is_ignored_for_every_category(tmp_path):
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    square = [[10, 10], [18, 10], [18, 18], [10, 18]]
    doc = {"imagePath": "a.png", "imageHeight": 20, "imageWidth": 20,
           "shapes": [{"label": "cat", "points": [[1, 1], [8, 1], [8, 8], [1, 8]], "shape_type": "polygon"},
                      {"label": "dog", "points": [[1, 10], [8, 10], [8, 18], [1, 18]], "shape_type": "polygon"},
                      {"label": "__ignore__", "points": square, "shape_type": "polygon"}]}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    import_dataset("labelme", tmp_path, tmp_path / "out.json")
    coco = COCO(str(tmp_path / "out.json"))
    assert sorted(c["name"] for c in coco.cats.values()) == ["cat", "dog"]
    crowd = [a for a in coco.anns.values() if a["iscrowd"]]
    assert sorted(coco.cats[a["category_id"]]["name"] for a in crowd) == ["cat", "dog"]
    for a in crowd:
        assert coco.annToMask(a)[10:18, 10:18].all() and coco.annToMask(a).sum() == coco.annToMask(crowd[0]).sum()
