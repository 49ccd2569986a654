"""Straight NumPy transcriptions of mmdetection 3.3's SOLOv2 semantics.

Loops and all, mirroring `SOLOV2Head._get_targets_single`, `loss_by_feat`,
`predict_by_feat` and `mask_matrix_nms` line by line; an independent oracle for
cases the fixtures do not cover (non-square images, empty images, borders).
"""

import numpy as np

NUM_GRIDS = [40, 36, 24, 16, 12]
SCALE_RANGES = [(1, 96), (48, 192), (96, 384), (192, 768), (384, 2048)]
STRIDES = [8, 8, 16, 32, 32]
f32 = np.float32


def cv2_rescale_quarter(mask):
    """cv2.resize(mask_u8, INTER_LINEAR) to round(H/4) x round(W/4), fixed point."""
    h, w = mask.shape
    oh, ow = int(h * 0.25 + 0.5), int(w * 0.25 + 0.5)

    def taps(n_in, n_out):
        out = []
        for d in range(n_out):
            src = (d + 0.5) * (n_in / n_out) - 0.5
            x0 = int(np.floor(src))
            fx = src - x0
            if x0 < 0:
                x0, fx = 0, 0.0
            if x0 >= n_in - 1:
                x0, fx = n_in - 1, 0.0
            ifx = int(round(fx * 2048))
            out.append((x0, min(x0 + 1, n_in - 1), 2048 - ifx, ifx))
        return out

    ty, tx = taps(h, oh), taps(w, ow)
    m = mask.astype(np.int64)
    res = np.zeros((oh, ow), np.uint8)
    for i, (y0, y1, wy0, wy1) in enumerate(ty):
        for j, (x0, x1, wx0, wx1) in enumerate(tx):
            v = (
                wy0 * (wx0 * m[y0, x0] + wx1 * m[y0, x1])
                + wy1 * (wx0 * m[y1, x0] + wx1 * m[y1, x1])
            )
            res[i, j] = (v + (1 << 21)) >> 22
    return res


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], f32)


def targets_single(masks, labels, featmap_hw, num_classes=80, pos_scale=0.2,
                   num_grids=NUM_GRIDS, scale_ranges=SCALE_RANGES):
    """Returns per level (labels (S,S), pos_mask (S*S,), pos_index list, mask_targets list)."""
    boxes = np.array([tight_box(m) if m.any() else np.zeros(4, f32) for m in masks], f32).reshape(-1, 4)
    areas = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(f32)
    up = (featmap_hw[0] * 4, featmap_hw[1] * 4)
    out = []
    for (lo, hi), S in zip(scale_ranges, num_grids):
        lab = np.full((S, S), num_classes, np.int64)
        pos = np.zeros(S * S, bool)
        pos_index, targets = [], []
        for k in range(len(masks)):
            if not (lo <= areas[k] <= hi) or not masks[k].any():
                continue
            m = masks[k]
            hr = f32(f32(0.5) * (boxes[k, 3] - boxes[k, 1])) * f32(pos_scale)
            wr = f32(f32(0.5) * (boxes[k, 2] - boxes[k, 0])) * f32(pos_scale)
            ys, xs = np.indices(m.shape)
            n = f32(m.sum())
            ch = f32((m * ys).sum()) / n
            cw = f32((m * xs).sum()) / n

            def g(v, u):
                return int(np.trunc(f32(f32(v) / f32(u)) / f32(1.0 / S)))

            coord_w, coord_h = g(cw, up[1]), g(ch, up[0])
            top_box = max(0, g(ch - hr, up[0]))
            down_box = min(S - 1, g(ch + hr, up[0]))
            left_box = max(0, g(cw - wr, up[1]))
            right_box = min(S - 1, g(cw + wr, up[1]))
            top, down = max(top_box, coord_h - 1), min(down_box, coord_h + 1)
            left, right = max(coord_w - 1, left_box), min(right_box, coord_w + 1)
            lab[top:down + 1, left:right + 1] = labels[k]
            r = cv2_rescale_quarter(m)
            for i in range(top, down + 1):
                for j in range(left, right + 1):
                    t = np.zeros(featmap_hw, np.uint8)
                    t[: r.shape[0], : r.shape[1]] = r
                    targets.append(t)
                    pos[i * S + j] = True
                    pos_index.append(i * S + j)
        out.append((lab, pos, pos_index, targets))
    return out


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def loss(cls_preds, kernel_preds, mask_feats, gt_masks, gt_labels, num_classes):
    """cls_preds/kernel_preds: lists of (B,S,S,C|E) NHWC; mask_feats (B,h,w,E)."""
    B = mask_feats.shape[0]
    per_img = [targets_single(gt_masks[b], gt_labels[b], mask_feats.shape[1:3], num_classes) for b in range(B)]
    num_pos = sum(int(lvl[1].sum()) for img in per_img for lvl in img)
    dice_sum = 0.0
    for b in range(B):
        for lvl, (lab, pos, pidx, tg) in enumerate(per_img[b]):
            kp = kernel_preds[lvl][b].reshape(-1, kernel_preds[lvl].shape[-1])
            for idx, t in zip(pidx, tg):
                p = sigmoid(mask_feats[b] @ kp[idx])
                t = t.astype(np.float64)
                dice_sum += 3 * (1 - 2 * (p * t).sum() / ((p * p).sum() + 1e-3 + (t * t).sum() + 1e-3))
    loss_mask = dice_sum / num_pos if num_pos else 0.0
    focal = 0.0
    for lvl in range(5):
        for b in range(B):
            x = cls_preds[lvl][b].reshape(-1, num_classes).astype(np.float64)
            lab = per_img[b][lvl][0].reshape(-1)
            t = np.zeros_like(x)
            fg = lab < num_classes
            t[np.nonzero(fg)[0], lab[fg]] = 1
            p = sigmoid(x)
            pt = (1 - p) * t + p * (1 - t)
            w = (0.25 * t + 0.75 * (1 - t)) * pt**2
            bce = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
            focal += (bce * w).sum()
    return focal / (num_pos + 1), loss_mask, num_pos


def matrix_nms(masks, labels, scores, filter_thr=-1, nms_pre=-1, max_num=-1,
               kernel="gaussian", sigma=2.0, mask_area=None):
    if len(labels) == 0:
        return np.zeros(0, f32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    if mask_area is None:
        mask_area = masks.reshape(len(masks), -1).sum(1).astype(f32)
    order = np.argsort(-scores, kind="stable")
    if nms_pre > 0:
        order = order[:nms_pre]
    s, m, a, lab = scores[order], masks[order], mask_area[order], labels[order]
    n = len(s)
    flat = m.reshape(n, -1).astype(f32)
    inter = flat @ flat.T
    iou = np.triu(inter / (a[None, :] + a[:, None] - inter), 1)
    same = np.triu(lab[None, :] == lab[:, None], 1)
    decay_iou = iou * same
    comp = decay_iou.max(0)[:, None]
    if kernel == "gaussian":
        coef = (np.exp(-sigma * decay_iou**2) / np.exp(-sigma * comp**2)).min(0)
    else:
        coef = ((1 - decay_iou) / (1 - comp)).min(0)
    s = (s * coef).astype(f32)
    keep = np.ones(n, bool) if filter_thr <= 0 else s >= filter_thr
    s, lab, idx = s[keep], lab[keep], order[keep]
    o = np.argsort(-s, kind="stable")
    if max_num > 0:
        o = o[:max_num]
    return s[o], lab[o], idx[o]


def resize_bilinear(x, out_h, out_w):
    """torch F.interpolate(mode='bilinear', align_corners=False) of (N, H, W)."""
    n, h, w = x.shape

    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (src - i0).astype(np.float64)

    y0, y1, fy = axis(h, out_h)
    x0, x1, fx = axis(w, out_w)
    rows = x[:, y0] * (1 - fy)[None, :, None] + x[:, y1] * fy[None, :, None]
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx


def predict(cls_preds, kernel_preds, mask_feats, img_shape, ori_shape, num_classes,
            score_thr=0.1, mask_thr=0.5, nms_pre=500, max_per_img=100, filter_thr=0.05,
            kernel="gaussian", sigma=2.0, strides=STRIDES):
    """One image. cls_preds/kernel_preds: lists of (S,S,C|E); mask_feats (h,w,E)."""
    scores, kernels, cell_strides = [], [], []
    for c, k, st in zip(cls_preds, kernel_preds, strides):
        s = sigmoid(c).astype(f32)
        padded = np.pad(s, [(1, 0), (1, 0), (0, 0)], constant_values=-np.inf)
        local = np.maximum.reduce([padded[1:, 1:], padded[:-1, 1:], padded[1:, :-1], padded[:-1, :-1]])
        s = s * (local == s)
        scores.append(s.reshape(-1, num_classes))
        kernels.append(k.reshape(-1, k.shape[-1]))
        cell_strides.append(np.full(s.shape[0] * s.shape[1], st))
    scores, kernels, cell_strides = map(np.concatenate, (scores, kernels, cell_strides))
    cell, lab = np.nonzero(scores > score_thr)
    sc = scores[cell, lab]
    probs = sigmoid(np.einsum("hwe,ke->khw", mask_feats.astype(np.float64), kernels[cell].astype(np.float64)))
    masks = probs > mask_thr
    area = masks.sum((1, 2)).astype(f32)
    keep = area > cell_strides[cell]
    probs, masks, area, sc, lab = probs[keep], masks[keep], area[keep], sc[keep], lab[keep]
    sc = (sc * (probs * masks).sum((1, 2)) / area).astype(f32)
    s, lab, idx = matrix_nms(masks, lab, sc, filter_thr, nms_pre, max_per_img, kernel, sigma, area)
    h, w = mask_feats.shape[:2]
    up = resize_bilinear(probs[idx], h * 4, w * 4)[:, : img_shape[0], : img_shape[1]]
    out = resize_bilinear(up, *ori_shape) > mask_thr
    return s, lab, out
