"""Small hand-made instance sets for generality tests (no files needed)."""

import numpy as np


def non_square_instances(h=160, w=224):
    """Instances on a non-square image: two-level, border, L-shape, empty mask.

    Returns:
        masks `(n, h, w)` uint8, labels `(n,)` int.
    """
    yy, xx = np.mgrid[:h, :w]
    masks = []
    m = np.zeros((h, w), np.uint8)
    m[20:90, 30:100] = 1  # 70x70: scale 70 -> levels 0 and 1
    masks.append(m)
    m = ((yy - 100) ** 2 / 30**2 + (xx - 150) ** 2 / 45**2 <= 1).astype(np.uint8)
    masks.append(m)  # ellipse
    m = np.zeros((h, w), np.uint8)
    m[120:h, 190:w] = 1  # touches the bottom-right border
    masks.append(m)
    m = np.zeros((h, w), np.uint8)
    m[10:60, 150:160] = 1
    m[50:60, 150:210] = 1  # L-shape: centre of mass far from box centre
    masks.append(m)
    masks.append(np.zeros((h, w), np.uint8))  # empty mask: skipped
    m = np.zeros((h, w), np.uint8)
    m[0:4, 0:5] = 1  # tiny, at the top-left corner
    masks.append(m)
    m = np.zeros((h, w), np.uint8)
    m[5:155, 8:220] = 1  # large: scale ~178 -> levels 1 and 2
    masks.append(m)
    return np.stack(masks), np.array([0, 1, 2, 1, 2, 0, 2])
