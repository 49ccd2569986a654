"""SOLOv2 inference post-processing, static-shape and batched.

Steps exactly as mmdetection's `SOLOV2Head.predict_by_feat`:
points-NMS (2×2 window: the cell and its up, left and up-left neighbours) →
`score_thr` → dynamic 1×1 conv + sigmoid → `mask_thr` → drop masks whose
area ≤ the level's stride → maskness rescoring → Matrix NMS → bilinear ×4 to
the padded size → crop to the valid size → bilinear to the original size →
`> mask_thr`.

The one departure: at most `max_candidates` (cell, class) candidates above
`score_thr` (the highest scored) get masks, so memory is bounded. mmdet
computes all of them; with `max_candidates` ≥ the number above `score_thr`
(the usual case for trained weights) the results are identical. The number
of candidates is dynamic inside the graph (no retracing); the outputs are
padded to the static `max_per_img`.
"""

import numpy as np
from keras import ops

from keras_solov2.gather import take_rows


def points_nms(scores):
    """Keeps a score only where it is the max of its 2×2 up-left window.

    Args:
        scores: `(B, S, S, C)` probabilities.

    Returns:
        `(B, S, S, C)` with non-maxima set to 0 (mmdet's
        `max_pool2d(s, 2, 1, 1)[:, :, :-1, :-1] == s`).
    """
    padded = ops.pad(scores, [[0, 0], [1, 0], [1, 0], [0, 0]], constant_values=-1.0)
    local_max = ops.max_pool(padded, 2, strides=1, padding="valid")
    return ops.where(ops.equal(local_max, scores), scores, 0.0)


def decode_predictions(
    cls_logits,
    kernels,
    mask_features,
    matrix_nms,
    dynamic_conv,
    strides=(8, 8, 16, 32, 32),
    score_thr=0.1,
    mask_thr=0.5,
    max_candidates=1000,
):
    """Head outputs → up to `max_per_img` instances per image, at stride 4.

    Args:
        cls_logits: list over levels of `(B, S, S, C)` logits.
        kernels: list over levels of `(B, S, S, E)` kernels, or a function
            of `(B, K)` flat cell indices (levels in order, `row * S + col`)
            returning those cells' `(B, K, E)` kernels, so that only the
            candidates' kernels are computed (`SOLOv2InstanceHead.kernels_at`).
        mask_features: `(B, h, w, E)`, h = padded height / 4.
        matrix_nms: a `MatrixNMS` layer (holds `nms_pre`, `max_per_img`, ...).
        dynamic_conv: a `DynamicMaskConv` layer.
        strides: per-level stride; masks with area ≤ stride are dropped.
        score_thr, mask_thr: floats, as mmdet's test_cfg.
        max_candidates: int, static cap on candidates given masks.

    Returns:
        Dict: `soft_masks` `(B, P, h, w)` float32 mask probabilities at
        stride 4, `scores` `(B, P)`, `labels` `(B, P)` int32 (-1 = none),
        `num_detections` `(B,)` int32, with P = `max_per_img`; detections are
        sorted by score and padding entries are zero.
    """
    num_classes = cls_logits[0].shape[-1]
    batch = ops.shape(mask_features)[0]
    scores, cell_strides = [], []
    for logits, stride in zip(cls_logits, strides):
        s = points_nms(ops.sigmoid(ops.cast(logits, "float32")))
        cells = s.shape[1] * s.shape[2]
        scores.append(ops.reshape(s, (batch, cells * num_classes)))
        cell_strides.append(np.full((cells,), stride, "float32"))
    scores = ops.concatenate(scores, axis=1)
    cell_strides = np.concatenate(cell_strides)
    if callable(kernels):
        kernels_at = kernels
    else:
        flat_kernels = ops.concatenate(
            [ops.reshape(k, (batch, k.shape[1] * k.shape[2], -1)) for k in kernels], axis=1
        )
        kernels_at = lambda cell: take_rows(flat_kernels, cell)  # noqa: E731

    # Only the candidates above score_thr get masks (at most max_candidates):
    # a dynamic count, so the cost follows what the image holds.
    count = ops.max(ops.sum(ops.cast(scores > score_thr, "int32"), axis=1))
    k = ops.clip(count, 1, min(int(max_candidates), scores.shape[1]))
    cand_scores, cand = ops.top_k(scores, k=k, sorted=True)
    valid = cand_scores > score_thr
    cell = cand // num_classes
    labels = cand % num_classes
    cand_kernels = kernels_at(cell)
    # The dot products run in the layer's compute dtype; probabilities in float32.
    mask_probs = ops.sigmoid(
        ops.cast(dynamic_conv(mask_features, cand_kernels), "float32")
    )  # (B, K, h, w)
    masks = mask_probs > mask_thr
    masks_f = ops.cast(masks, "float32")
    area = ops.sum(masks_f, axis=(2, 3))
    valid = ops.logical_and(valid, area > ops.take(cell_strides, cell))
    maskness = ops.sum(mask_probs * masks_f, axis=(2, 3)) / ops.maximum(area, 1.0)
    cand_scores = ops.where(valid, cand_scores * maskness, 0.0)

    nms = matrix_nms(masks, labels, cand_scores, mask_area=area, valid=valid)
    keep = nms["indices"]
    soft = take_rows(mask_probs, ops.maximum(keep, 0))
    soft = soft * ops.cast(keep >= 0, "float32")[:, :, None, None]
    return {
        "soft_masks": soft,
        "scores": nms["scores"],
        "labels": nms["labels"],
        "num_detections": nms["num_detections"],
    }


def paste_masks(soft_masks, image_shape, original_shape, mask_thr=0.5, mask_stride=4):
    """Stride-4 mask probabilities → binary masks at the original image size.

    mmdet's order: bilinear ×`mask_stride` to the padded size, crop to the
    valid (resized, unpadded) size, bilinear to the original size, threshold.

    Args:
        soft_masks: `(P, h, w)` probabilities of one image.
        image_shape: `(h_valid, w_valid)` pixels of the resized image before
            padding.
        original_shape: `(H0, W0)` pixels of the original image.

    Returns:
        `(P, H0, W0)` uint8 masks.
    """
    num, h, w = soft_masks.shape
    if num == 0:
        return np.zeros((0, int(original_shape[0]), int(original_shape[1])), np.uint8)
    x = ops.transpose(ops.convert_to_tensor(soft_masks, "float32"), (1, 2, 0))[None]
    x = ops.image.resize(x, (h * mask_stride, w * mask_stride), interpolation="bilinear")
    x = x[:, : int(image_shape[0]), : int(image_shape[1]), :]
    x = ops.image.resize(
        x, (int(original_shape[0]), int(original_shape[1])), interpolation="bilinear"
    )
    return ops.cast(ops.transpose(x[0], (2, 0, 1)) > mask_thr, "uint8")
