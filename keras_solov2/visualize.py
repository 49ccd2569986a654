"""Pictures: prediction overlays and grid-assignment maps (PIL, no matplotlib)."""

import numpy as np
from PIL import Image, ImageDraw

from keras_solov2 import targets

_PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 190],
     [0, 128, 128], [230, 190, 255], [170, 110, 40], [128, 0, 0], [170, 255, 195]],
    np.float32,
)


def draw_instances(image, masks, labels, scores, class_names=None, alpha=0.5):
    """Overlays instance masks with `class score` captions.

    Args:
        image: `(H, W, 3)` uint8 RGB.
        masks: `(n, H, W)` {0,1}.
        labels: `(n,)` contiguous labels.
        scores: `(n,)` floats.
        class_names: optional list of names indexed by label.

    Returns:
        A `PIL.Image`.
    """
    out = np.asarray(image, np.float32).copy()
    for k, m in enumerate(masks):
        m = m.astype(bool)
        out[m] = (1 - alpha) * out[m] + alpha * _PALETTE[k % len(_PALETTE)]
    pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for k, (m, lab, s) in enumerate(zip(masks, labels, scores)):
        ys, xs = np.nonzero(m)
        if len(ys) == 0:
            continue
        name = class_names[int(lab)] if class_names else str(int(lab))
        colour = tuple(int(c) for c in _PALETTE[k % len(_PALETTE)])
        draw.rectangle([xs.min(), ys.min(), xs.max(), ys.max()], outline=colour)
        draw.text((int(xs.min()) + 2, int(ys.min()) + 1), f"{name} {float(s):.2f}", fill=(255, 255, 255))
    return pil


def visualize_assignment(model, image, gt_masks, gt_labels, cell_px=8):
    """Which grid cells each ground-truth instance is positive on, per level.

    Helps tune `num_grids` / `scale_ranges`: an instance missing from every
    level is never learned; one on two levels is learned twice.

    Args:
        model: a `SOLOv2` (its `num_grids`, `scale_ranges`, `pos_scale`).
        image: `(H, W, 3)` uint8, padded to the size the masks have.
        gt_masks: `(n, H, W)` {0,1}; gt_labels: `(n,)`.
        cell_px: drawn size of a grid cell.

    Returns:
        A `PIL.Image`: the image with the instances on the left, then one
        S×S grid per level with each positive cell coloured by instance.
    """
    gt_masks = np.asarray(gt_masks, np.uint8)
    t = targets.assign_targets(gt_masks[None], np.asarray(gt_labels)[None], model.num_classes,
                                model.num_grids, model.scale_ranges, model.pos_scale)
    cells = np.asarray(t["pair_cells"])[0]
    valid = np.asarray(t["pair_valid"])[0]
    overlay = draw_instances(image, gt_masks, gt_labels, np.ones(len(gt_masks)), model.class_names)
    panels = [overlay]
    offset = 0
    for lvl, s in enumerate(model.num_grids):
        grid = np.full((s * cell_px, s * cell_px, 3), 40, np.uint8)
        grid[::cell_px, :] = 70
        grid[:, ::cell_px] = 70
        for k in range(len(gt_masks)):
            for c in cells[k, lvl][valid[k, lvl]] - offset:
                r, q = divmod(int(c), s)
                grid[r * cell_px + 1:(r + 1) * cell_px, q * cell_px + 1:(q + 1) * cell_px] = _PALETTE[k % len(_PALETTE)]
        pil = Image.fromarray(grid)
        ImageDraw.Draw(pil).text((2, 2), f"L{lvl} S={s} pos={int(np.asarray(t['positive'][lvl]).sum())}",
                                 fill=(255, 255, 255))
        panels.append(pil)
        offset += s * s
    height = max(p.height for p in panels)
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 4 * len(panels), height), (0, 0, 0))
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + 4
    return canvas
