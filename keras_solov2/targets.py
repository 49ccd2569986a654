"""Ground truth → SOLOv2 grid targets, vectorised and in-graph.

Semantics are exactly mmdetection 3.3's `SOLOV2Head._get_targets_single`
(verified against `../shared/fixtures/mmdet/solov2_targets_img*.npz`):

* scale of an instance = `sqrt(w * h)` of its mask's tight box
  (`[xmin, ymin, xmax + 1, ymax + 1]`); it is assigned to *every* level whose
  inclusive range `[lo, hi]` of `scale_ranges` contains it;
* centre = the mask's centre of mass (`sum(mask * idx) / sum(mask)`, no +0.5);
* positive cells = the centre region `centre ± 0.5 * box_side * pos_scale`,
  clipped to the grid and to ±1 cell around the centre cell (≤ 3×3 cells);
* when regions overlap, the later instance overwrites the earlier label;
* instances with an empty mask or a negative (padding) label are skipped;
* mask targets are the gt masks rescaled by `1 / mask_stride` the way
  `mmcv.imrescale` (cv2 `INTER_LINEAR` on uint8) does, bit for bit.

Shapes are fixed by the input: `M` instance slots per image (label `-1` =
padding) and, per
instance and level, 9 candidate cells of which the valid ones are the
positive (instance, cell) pairs. mmdet counts a cell once per
instance that claims it, so pairs can repeat a cell; that is kept. `M`, `H`
and `W` may be dynamic dimensions: the loss trims unused slots, and a
pipeline that pads per batch gives `train_step` unknown `H`, `W` (one graph
for every size).
"""

import numpy as np
import tensorflow as tf
from keras import ops

# cv2's fixed-point resize uses 11-bit coefficients (INTER_RESIZE_COEF_BITS).
_CV2_COEF_SCALE = 2048


def _cv2_linear_taps(in_size, out_size):
    """Source taps and integer weights of cv2 INTER_LINEAR along one axis."""
    scale = in_size / out_size
    taps0, taps1, w0, w1 = [], [], [], []
    for d in range(out_size):
        src = (d + 0.5) * scale - 0.5
        x0 = int(np.floor(src))
        frac = src - x0
        if x0 < 0:
            x0, frac = 0, 0.0
        if x0 >= in_size - 1:
            x0, frac = in_size - 1, 0.0
        ifrac = int(round(frac * _CV2_COEF_SCALE))
        taps0.append(x0)
        taps1.append(min(x0 + 1, in_size - 1))
        w0.append(_CV2_COEF_SCALE - ifrac)
        w1.append(ifrac)
    return (
        np.array(taps0, "int32"),
        np.array(taps1, "int32"),
        np.array(w0, "float32"),
        np.array(w1, "float32"),
    )


def _cv2_linear_taps_in_graph(in_size, out_size):
    """`_cv2_linear_taps` for sizes known only when the graph runs.

    The same float64 arithmetic (and round-half-to-even, as Python's
    `round`), so both give the same taps and weights for every size.

    Args:
        in_size, out_size: int32 scalars, pixels along the axis before and
            after the rescale.

    Returns:
        `taps0`, `taps1` `(out_size,)` int32 source indices and `w0`, `w1`
        `(out_size,)` float32 integer weights (summing to 2048).
    """
    in_f = ops.cast(in_size, "float64")
    src = (ops.arange(out_size, dtype="float64") + 0.5) * (in_f / ops.cast(out_size, "float64")) - 0.5
    x0 = ops.floor(src)
    frac = src - x0
    frac = ops.where(ops.logical_or(x0 < 0, x0 >= in_f - 1), 0.0, frac)
    x0 = ops.clip(x0, 0.0, in_f - 1)
    ifrac = ops.round(frac * _CV2_COEF_SCALE)
    taps0 = ops.cast(x0, "int32")
    taps1 = ops.minimum(taps0 + 1, ops.cast(in_size, "int32") - 1)
    return taps0, taps1, ops.cast(_CV2_COEF_SCALE - ifrac, "float32"), ops.cast(ifrac, "float32")


def rescale_masks(masks, mask_stride=4):
    """Rescales 0/1 masks by `1 / mask_stride` exactly like `mmcv.imrescale`.

    mmcv calls cv2 `INTER_LINEAR` on uint8 data: fixed-point weights with 11
    fractional bits per axis and round-half-up of the result. For 0/1 input
    the output is 1 iff the integer-weighted sum of the (up to) 4 taps is at
    least half of `2048**2`; every product is an integer below 2**24, so the
    float32 arithmetic below is exact.

    Args:
        masks: `(..., H, W)` masks with values in {0, 1}; `H`, `W` static
            (taps as constants) or dynamic (taps computed in the graph).
        mask_stride: int, the downsampling factor (4 in SOLOv2).

    Returns:
        `(..., round(H / mask_stride), round(W / mask_stride))` uint8 masks.
    """
    taps = []
    for axis in (-2, -1):
        in_size = masks.shape[axis]
        if in_size is None:
            in_size = ops.shape(masks)[axis]
            out_size = ops.cast(ops.floor(ops.cast(in_size, "float64") / mask_stride + 0.5), "int32")
            taps.append(_cv2_linear_taps_in_graph(in_size, out_size))
        else:
            taps.append(_cv2_linear_taps(in_size, int(in_size / mask_stride + 0.5)))
    (y0, y1, wy0, wy1), (x0, x1, wx0, wx1) = taps
    # Gather the taps from the uint8 masks first: only the (H/4, W) row
    # samples are ever widened to float32, never the full masks.
    masks = ops.cast(masks, "uint8")
    rows = (ops.cast(ops.take(masks, y0, axis=-2), "float32") * wy0[:, None]
            + ops.cast(ops.take(masks, y1, axis=-2), "float32") * wy1[:, None])
    full = ops.take(rows, x0, axis=-1) * wx0 + ops.take(rows, x1, axis=-1) * wx1
    half = float(_CV2_COEF_SCALE * _CV2_COEF_SCALE // 2)
    return ops.cast(full >= half, "uint8")


_COUNT_GROUP = 32  # pixels summed in uint8 before widening (at most 32 < 256)


def _count_ones(masks, axis):
    """Ones of 0/1 `(..., H, W)` masks along `axis` (-1: per row, -2: per column), int64.

    Sums 32 pixels at a time in uint8 before widening, so that no widened
    copy of the masks exists: `count_nonzero` (or `keras.ops.sum`, which
    widens uint8 first) made a `(B, M, H, W)` int32 copy and a bool one per
    axis, ≈ 1.1 GB at batch 2, 50 instances, 1344×800, the largest tensors
    of the step's targets; the partial sums are 1/8 of the uint8 masks.
    """
    masks = tf.cast(masks, tf.uint8)
    size = masks.shape[axis]
    if size is None or size % _COUNT_GROUP:
        # Zero rows / columns: the counts along the other axis are unchanged.
        if size is None:
            size = tf.shape(masks)[axis]
        pad = (-size) % _COUNT_GROUP
        paddings = [[0, 0]] * (masks.shape.rank - 2) + ([[0, 0], [0, pad]] if axis == -1 else [[0, pad], [0, 0]])
        masks = tf.pad(masks, paddings)
    shape = tf.shape(masks)
    lead, h, w = shape[:-2], shape[-2], shape[-1]
    if axis == -1:
        grouped = tf.reshape(masks, tf.concat([lead, [h, w // _COUNT_GROUP, _COUNT_GROUP]], 0))
        partial = tf.reduce_sum(grouped, axis=-1)  # (..., H, W/32) uint8
    else:
        grouped = tf.reshape(masks, tf.concat([lead, [h // _COUNT_GROUP, _COUNT_GROUP, w]], 0))
        partial = tf.reduce_sum(grouped, axis=-2)  # (..., H/32, W) uint8
    counts = tf.reduce_sum(tf.cast(partial, tf.int64), axis=axis)
    return counts


def instance_geometry(gt_masks):
    """Tight box size and centre of mass of each mask, as mmdet computes them.

    Args:
        gt_masks: `(..., H, W)` 0/1 masks.

    Returns:
        Dict of `(...)` tensors: `area` int (pixels), `box_h`, `box_w`
        (float32 pixels, `ymax + 1 - ymin`), `scale` (`sqrt(box_w * box_h)`),
        `center_h`, `center_w` (float32 pixels in the padded image).
    """
    h, w = ops.shape(gt_masks)[-2], ops.shape(gt_masks)[-1]  # ints, or scalars if dynamic
    rows = _count_ones(gt_masks, axis=-1)  # (..., H)
    cols = _count_ones(gt_masks, axis=-2)  # (..., W)
    area = ops.sum(rows, axis=-1)
    row_any = ops.cast(rows > 0, "int32")
    col_any = ops.cast(cols > 0, "int32")
    top = ops.argmax(row_any, axis=-1)
    bottom = ops.cast(h, top.dtype) - ops.argmax(ops.flip(row_any, axis=-1), axis=-1)
    left = ops.argmax(col_any, axis=-1)
    right = ops.cast(w, left.dtype) - ops.argmax(ops.flip(col_any, axis=-1), axis=-1)
    nonempty = area > 0
    box_h = ops.where(nonempty, ops.cast(bottom - top, "float32"), 0.0)
    box_w = ops.where(nonempty, ops.cast(right - left, "float32"), 0.0)
    # mmdet: int64 sums divided by a float32 count (the sum is cast to float32).
    idx_h = ops.arange(h, dtype="int64")
    idx_w = ops.arange(w, dtype="int64")
    count = ops.cast(ops.maximum(area, 1), "float32")
    center_h = ops.cast(ops.sum(rows * idx_h, axis=-1), "float32") / count
    center_w = ops.cast(ops.sum(cols * idx_w, axis=-1), "float32") / count
    return {
        "area": area,
        "box_h": box_h,
        "box_w": box_w,
        "scale": ops.sqrt(box_w * box_h),
        "center_h": center_h,
        "center_w": center_w,
    }


def _grid_coord(value, upsampled, num_grid):
    # mmdet: int(trunc(float32(value / upsampled) / float32(1 / S))).
    ratio = value / ops.cast(upsampled, "float32")
    return ops.cast(ratio / np.float32(1.0 / num_grid), "int32")


def center_regions(geometry, image_shape, num_grid, pos_scale):
    """Inclusive `[top, down] × [left, right]` positive cells on an S×S grid.

    Args:
        geometry: output of `instance_geometry`.
        image_shape: `(H, W)` padded image size in pixels (= mask-feature size
            × mask_stride, mmdet's `upsampled_size`).
        num_grid: int, S.
        pos_scale: float, fraction of the box side that is positive.

    Returns:
        `top, down, left, right` int32 tensors shaped like the instances.
    """
    up_h, up_w = image_shape
    ch, cw = geometry["center_h"], geometry["center_w"]
    range_h = 0.5 * geometry["box_h"] * np.float32(pos_scale)
    range_w = 0.5 * geometry["box_w"] * np.float32(pos_scale)
    coord_h = _grid_coord(ch, up_h, num_grid)
    coord_w = _grid_coord(cw, up_w, num_grid)
    top_box = ops.maximum(0, _grid_coord(ch - range_h, up_h, num_grid))
    down_box = ops.minimum(num_grid - 1, _grid_coord(ch + range_h, up_h, num_grid))
    left_box = ops.maximum(0, _grid_coord(cw - range_w, up_w, num_grid))
    right_box = ops.minimum(num_grid - 1, _grid_coord(cw + range_w, up_w, num_grid))
    top = ops.maximum(top_box, coord_h - 1)
    down = ops.minimum(down_box, coord_h + 1)
    left = ops.maximum(coord_w - 1, left_box)
    right = ops.minimum(right_box, coord_w + 1)
    return top, down, left, right


def assign_targets(
    gt_masks,
    gt_labels,
    num_classes,
    num_grids,
    scale_ranges,
    pos_scale=0.2,
):
    """Grid targets for a batch of images with padded instance slots.

    Args:
        gt_masks: `(B, M, H, W)` 0/1 masks at the padded image size.
        gt_labels: `(B, M)` int contiguous labels in `[0, num_classes)`,
            `-1` for padding slots (and anything to ignore, e.g. crowds).
        num_classes: int, background label = `num_classes`.
        num_grids: list of S per level.
        scale_ranges: list of inclusive `(lo, hi)` per level, in pixels of
            the padded image.
        pos_scale: float.

    Returns:
        Dict with
        * `labels`: list per level of `(B, S, S)` int32 (background =
          `num_classes`);
        * `positive`: list per level of `(B, S*S)` bool;
        * `pair_cells`: `(B, M, L, 9)` int32 cell index into the
          concatenation of all levels' grids (`offset_l + row * S + col`;
          0 where the pair is not valid);
        * `pair_valid`: `(B, M, L, 9)` bool, the positive (instance, cell)
          pairs, duplicates across instances included (as mmdet);
        * `num_pos`: () int32, unique positive cells in the batch.
    """
    h, w = ops.shape(gt_masks)[-2], ops.shape(gt_masks)[-1]
    geometry = instance_geometry(gt_masks)
    gt_labels = ops.cast(gt_labels, "int32")
    active = ops.logical_and(gt_labels >= 0, geometry["area"] > 0)
    # The slot count may be dynamic (the loss trims unused slots).
    batch, num_slots = ops.shape(gt_labels)[0], ops.shape(gt_labels)[1]
    slot_rank = ops.arange(1, num_slots + 1, dtype="int32")[None, :]

    labels, positive, pair_cells, pair_valid = [], [], [], []
    offset = 0
    for num_grid, (lo, hi) in zip(num_grids, scale_ranges):
        in_level = ops.logical_and(
            active,
            ops.logical_and(geometry["scale"] >= lo, geometry["scale"] <= hi),
        )
        top, down, left, right = center_regions(geometry, (h, w), num_grid, pos_scale)
        grid = ops.arange(num_grid, dtype="int32")
        row_in = ops.logical_and(
            grid[None, None, :] >= top[..., None], grid[None, None, :] <= down[..., None]
        )
        col_in = ops.logical_and(
            grid[None, None, :] >= left[..., None], grid[None, None, :] <= right[..., None]
        )
        cover = ops.logical_and(row_in[..., :, None], col_in[..., None, :])
        cover = ops.logical_and(cover, in_level[..., None, None])  # (B, M, S, S)
        # The last instance (highest slot) covering a cell wins, as mmdet's
        # in-order overwrite.
        winner = ops.max(
            ops.where(cover, slot_rank[..., None, None], 0), axis=1
        )  # (B, S, S), 0 = none
        winner_label = ops.take_along_axis(
            gt_labels, ops.reshape(ops.maximum(winner - 1, 0), (-1, num_grid * num_grid)), axis=1
        )
        level_labels = ops.where(
            winner > 0, ops.reshape(winner_label, (-1, num_grid, num_grid)), num_classes
        )
        labels.append(level_labels)
        positive.append(ops.reshape(winner > 0, (-1, num_grid * num_grid)))

        step = ops.arange(3, dtype="int32")
        rows = top[..., None] + step  # (B, M, 3)
        cols = left[..., None] + step
        ok = ops.logical_and(
            (rows <= down[..., None])[..., :, None], (cols <= right[..., None])[..., None, :]
        )
        ok = ops.logical_and(ok, in_level[..., None, None])
        # Invalid slots point at cell 0 so that gathers stay in range.
        cells = ops.where(ok, offset + rows[..., :, None] * num_grid + cols[..., None, :], 0)
        pair_cells.append(ops.reshape(cells, (batch, num_slots, 9)))
        pair_valid.append(ops.reshape(ok, (batch, num_slots, 9)))
        offset += num_grid * num_grid

    num_pos = sum(ops.sum(ops.cast(p, "int32")) for p in positive)
    return {
        "labels": labels,
        "positive": positive,
        "pair_cells": ops.stack(pair_cells, axis=2),
        "pair_valid": ops.stack(pair_valid, axis=2),
        "num_pos": num_pos,
    }
