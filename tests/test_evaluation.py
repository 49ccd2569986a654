import contextlib
import io
import json

import keras
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import keras_solov2  # noqa: F401
from keras_solov2.callbacks import COCOMaskMAP
from keras_solov2.evaluation import coco_mask_map
from tests.optional import import_or_skip

CATEGORY_IDS = [1, 5, 90]  # gaps, as COCO


def _rle(m):
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def _write_gt(tmp_path):
    """3 images of different original sizes; image 3 has a crowd region."""
    rng = np.random.default_rng(0)
    images, anns, gt = [], [], {}
    sizes = {1: (60, 80), 2: (50, 70), 3: (64, 64)}
    aid = 1
    for iid, (h, w) in sizes.items():
        images.append({"id": iid, "height": h, "width": w, "file_name": f"{iid}.png"})
        gt[iid] = []
        for k in range(2):
            m = np.zeros((h, w), np.uint8)
            y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
            m[y:y + 18, x:x + 16] = 1
            label = int(rng.integers(0, 3))
            anns.append({"id": aid, "image_id": iid, "category_id": CATEGORY_IDS[label], "iscrowd": 0,
                         "segmentation": _rle(m), "area": int(m.sum()), "bbox": [int(x), int(y), 16, 18]})
            gt[iid].append((m, label))
            aid += 1
    crowd = np.zeros((64, 64), np.uint8)
    crowd[40:64, 0:30] = 1
    anns.append({"id": aid, "image_id": 3, "category_id": 1, "iscrowd": 1, "segmentation": _rle(crowd),
                 "area": int(crowd.sum()), "bbox": [0, 40, 30, 24]})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": c, "name": f"c{c}"} for c in CATEGORY_IDS]}))
    return path, gt, sizes


class _StubModel(keras.Model):
    """Returns fixed instances per image id (stands in for a trained SOLOv2)."""

    def __init__(self, instances):
        super().__init__(name="stub_model")
        self.instances = instances

    def call(self, images, training=False):
        return images

    def inference_outputs(self, images):
        return images

    def decode(self, outputs):
        return {"dummy": outputs}

    def paste(self, decoded, image_shapes, original_shapes):
        return [self.instances[i] for i in self._order.pop(0)]


def _dataset(sizes, batch_ids):
    for ids in batch_ids:
        yield {
            "images": np.zeros((len(ids), 32, 32, 3), "float32"),
            "image_shape": np.array([sizes[i] for i in ids]),
            "original_shape": np.array([sizes[i] for i in ids]),
            "image_id": np.array(ids),
        }


def _run_callback(gt_path, sizes, instances, batch_ids):
    model = _StubModel(instances)
    model._order = [list(b) for b in batch_ids]
    cb = COCOMaskMAP(list(_dataset(sizes, batch_ids)), gt_path, CATEGORY_IDS)
    cb.set_model(model)
    logs = {}
    cb.on_epoch_end(0, logs)
    return logs


def _detections(instances):
    """pycocotools results of `{image_id: {"masks", "scores", "labels"}}`, written independently
    of `encode_instances`."""
    return [{"image_id": i, "category_id": CATEGORY_IDS[int(lab)], "segmentation": _rle(m), "score": float(s)}
            for i, inst in instances.items() for m, s, lab in zip(inst["masks"], inst["scores"], inst["labels"])]


def _pycocotools_ap(gt_path, dets, img_ids):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
        ev = COCOeval(coco, coco.loadRes(dets), iouType="segm")
        ev.params.imgIds = img_ids
        ev.evaluate(); ev.accumulate(); ev.summarize()
    return ev.stats


def test_perfect_predictions_give_ap_one(tmp_path):
    gt_path, gt, sizes = _write_gt(tmp_path)
    instances = {i: {"masks": np.stack([m for m, _ in gt[i]]), "scores": np.array([0.9, 0.8]),
                     "labels": np.array([lab for _, lab in gt[i]])} for i in gt}
    logs = _run_callback(gt_path, sizes, instances, [(1, 2), (3,)])
    assert logs["val_mask_AP"] == 1.0 and logs["val_mask_AP50"] == 1.0


def test_shifted_masks_match_pycocotools_exactly(tmp_path):
    gt_path, gt, sizes = _write_gt(tmp_path)
    instances = {}
    for i in gt:
        masks = np.stack([np.roll(m, shift=3 * (k + 1), axis=1) for k, (m, _) in enumerate(gt[i])])
        labels = np.array([lab for _, lab in gt[i]])
        scores = np.array([0.9, 0.6])
        instances[i] = {"masks": masks, "scores": scores, "labels": labels}
    logs = _run_callback(gt_path, sizes, instances, [(1, 2), (3,)])
    stats = _pycocotools_ap(gt_path, _detections(instances), [1, 2, 3])
    assert 0 < logs["val_mask_AP"] < 1
    np.testing.assert_allclose(logs["val_mask_AP"], stats[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(logs["val_mask_AP75"], stats[2], rtol=0, atol=1e-12)


def test_images_without_predictions_still_count(tmp_path):
    gt_path, gt, sizes = _write_gt(tmp_path)
    instances = {i: {"masks": np.stack([m for m, _ in gt[i]]), "scores": np.array([0.9, 0.8]),
                     "labels": np.array([lab for _, lab in gt[i]])} for i in gt}
    instances[2] = {"masks": np.zeros((0, 50, 70), np.uint8), "scores": np.zeros(0), "labels": np.zeros(0)}
    logs = _run_callback(gt_path, sizes, instances, [(1, 2), (3,)])
    stats = _pycocotools_ap(gt_path, _detections(instances), [1, 2, 3])  # image 2's misses are counted
    assert 0 < stats[0] < 1
    np.testing.assert_allclose(logs["val_mask_AP"], stats[0], rtol=0, atol=1e-12)


def test_empty_results_give_zero(tmp_path):
    gt_path, _, _ = _write_gt(tmp_path)
    assert coco_mask_map(gt_path, [], [1, 2, 3])["AP"] == 0.0


def test_faster_coco_eval_backend_gives_pycocotools_numbers(tmp_path):
    import_or_skip("faster_coco_eval", "pip install 'keras-solov2[fasteval]'")
    gt_path, gt, sizes = _write_gt(tmp_path)
    dets = []
    for i in gt:
        for k, (m, lab) in enumerate(gt[i]):
            dets.append({"image_id": i, "category_id": CATEGORY_IDS[lab], "score": 0.9 - 0.3 * k,
                         "segmentation": _rle(np.roll(m, shift=3 * (k + 1), axis=1))})
    ours = coco_mask_map(gt_path, dets, [1, 2, 3], backend="faster_coco_eval")
    stats = _pycocotools_ap(gt_path, dets, [1, 2, 3])
    assert 0 < ours["AP"] < 1
    np.testing.assert_allclose([ours[k] for k in ("AP", "AP50", "AP75")], stats[:3], rtol=0, atol=1e-9)


def test_callback_rejects_an_interval_below_one():
    # 0 would divide by zero at the end of the first epoch, after its training.
    for bad in (0, -1, 1.5, True):
        try:
            COCOMaskMAP([], "instances.json", CATEGORY_IDS, every_n_epochs=bad)
        except ValueError as error:
            assert "every_n_epochs must be a positive int" in str(error)
        else:
            raise AssertionError(f"every_n_epochs={bad!r} was accepted")


def test_a_label_without_a_category_id_is_named_before_predicting():
    from keras_solov2.evaluation import predict_coco_results
    from tests.test_model import tiny_model

    model = tiny_model()  # 3 classes
    dataset = [{"images": np.full((1, 64, 64, 3), np.nan, "float32")}]  # never read: the check comes first
    # Before: an IndexError (or KeyError) at the first detection of label 2, after predicting.
    for mapping in ([1, 2], {0: 1, 1: 2}):
        try:
            predict_coco_results(model, dataset, mapping)
        except ValueError as error:
            assert "num_classes=3: labels [2] have no COCO category id" in str(error)
        else:
            raise AssertionError(f"{mapping} was accepted")
