"""COCO mask mAP of a SOLOv2 model on a dataset, with pycocotools (or faster-coco-eval).

Masks are produced at each image's *original* size (mmdet's resize order),
RLE-encoded image by image so that nothing of size `(N, H0, W0)` is kept,
labels are mapped back to the dataset's COCO `category_id`s, and COCOeval
(`iouType="segm"`) runs over *every* image that was fed, with or without
predictions (evaluating only predicted images would inflate AP). Crowd
ground truth is `iscrowd=1` in the COCO file and is treated by COCOeval as
ignore regions.
"""

import contextlib
import copy
import io

import numpy as np
import tensorflow as tf
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _as_coco(coco_gt):
    if isinstance(coco_gt, COCO):
        return coco_gt
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(coco_gt))


def encode_instances(masks, scores, labels, image_id, label_to_category_id):
    """One image's instances → COCO result dicts with compressed RLE.

    Args:
        masks: `(n, H0, W0)` uint8 masks at the original image size.
        scores: `(n,)` floats.
        labels: `(n,)` contiguous labels.
        image_id: the COCO image id.
        label_to_category_id: sequence or dict, contiguous label → COCO
            `category_id` (COCO ids have gaps: never `label + 1`).
    """
    results = []
    for m, s, lab in zip(masks, scores, labels):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        results.append(
            {
                "image_id": int(image_id),
                "category_id": int(label_to_category_id[int(lab)]),
                "segmentation": rle,
                "score": float(s),
            }
        )
    return results


def _check_label_map(label_to_category_id, num_classes):
    """A ValueError, before any prediction, when a label of the model has no category id."""
    if num_classes is None:
        return
    known = label_to_category_id.keys() if isinstance(label_to_category_id, dict) \
        else range(len(label_to_category_id))
    missing = [label for label in range(num_classes) if label not in known]
    if missing:
        raise ValueError(
            f"label_to_category_id maps {len(label_to_category_id)} labels but the model has "
            f"num_classes={num_classes}: labels {missing[:5]} have no COCO category id (a model "
            "trained on other classes than this annotation file's?)."
        )


def predict_coco_results(model, dataset, label_to_category_id, max_batches=None):
    """Runs `model` over `dataset` and returns `(results, image_ids)`.

    Args:
        model: a `SOLOv2`.
        dataset: yields `(x, ...)` or `x` with `x` a dict holding `images`
            `(B, H, W, 3)`, `image_shape` `(B, 2)`, `original_shape` `(B, 2)`
            and `image_id` `(B,)` (the evaluation pipeline of
            `keras_solov2.data`).
        label_to_category_id: contiguous label → COCO category id.
    """
    _check_label_map(label_to_category_id, getattr(model, "num_classes", None))
    # Evaluation batches vary in size (mmdet test padding): one relaxed graph.
    decode = tf.function(lambda images: model.decode(model.inference_outputs(images)), reduce_retracing=True)
    results, image_ids = [], []
    for i, batch in enumerate(dataset):
        if max_batches is not None and i >= max_batches:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        decoded = decode(x["images"])
        per_image = model.paste(decoded, np.asarray(x["image_shape"]), np.asarray(x["original_shape"]))
        for image_id, inst in zip(np.asarray(x["image_id"]), per_image):
            image_ids.append(int(image_id))
            results.extend(
                encode_instances(inst["masks"], inst["scores"], inst["labels"], image_id, label_to_category_id)
            )
    return results, image_ids


def coco_mask_map(coco_gt, results, image_ids, verbose=False, backend="pycocotools"):
    """COCOeval(segm) over `image_ids` → dict of AP, AP50, AP75, APs, APm, APl.

    Images without any prediction count (with zero recall); an empty result
    list gives all zeros rather than pycocotools' error.

    Args:
        coco_gt: ground-truth COCO JSON path or pycocotools `COCO`.
        results: COCO result dicts (`encode_instances`).
        image_ids: every image that was evaluated.
        verbose: print COCOeval's summary.
        backend: `"pycocotools"` (the official code) or `"faster_coco_eval"`
            (the `faster-coco-eval` package, same metric in C++; several
            times faster on large sets; `pip install faster-coco-eval`).
    """
    if backend not in ("pycocotools", "faster_coco_eval"):
        raise ValueError(f"backend must be 'pycocotools' or 'faster_coco_eval', got {backend!r}.")
    coco_gt = _as_coco(coco_gt)
    image_ids = sorted(set(int(i) for i in image_ids))
    unknown = [i for i in image_ids if i not in coco_gt.imgs]
    if unknown:
        raise ValueError(f"image ids {unknown[:5]} are not in the ground-truth COCO file.")
    if not results:
        return {k: 0.0 for k in STAT_NAMES}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if backend == "faster_coco_eval":
            ev = _faster_cocoeval(coco_gt, results)
        else:
            ev = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="segm")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    if verbose:
        print(out.getvalue())
    # COCOeval reports -1 where a size class has no ground truth.
    return {k: float(max(v, 0.0)) if v >= 0 else -1.0 for k, v in zip(STAT_NAMES, ev.stats[:6])}


def _faster_cocoeval(coco_gt, results):
    try:
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        raise ImportError(
            "backend='faster_coco_eval' needs the faster-coco-eval package: pip install faster-coco-eval"
        ) from None
    gt = FasterCOCO()
    gt.dataset = copy.deepcopy(coco_gt.dataset)
    gt.createIndex()
    # Its loadRes rewrites the result dicts in place: give it copies.
    return COCOeval_faster(gt, gt.loadRes(copy.deepcopy(results)), iouType="segm")


def evaluate_coco(model, dataset, coco_gt, label_to_category_id, max_batches=None, verbose=False,
                  backend="pycocotools"):
    """COCO mask mAP of `model` on `dataset` against `coco_gt` (path or COCO);
    `backend` as in `coco_mask_map`."""
    results, image_ids = predict_coco_results(model, dataset, label_to_category_id, max_batches)
    return coco_mask_map(coco_gt, results, image_ids, verbose=verbose, backend=backend)
