"""SOLOv2 losses: sigmoid focal loss (categories) and dice loss (masks).

Written directly rather than through `keras.losses.BinaryFocalCrossentropy`:
mmdetection sums the focal loss over cells *and* classes and divides by
`num_pos + 1`, while the Keras loss averages over the class axis; the dice
loss matches mmdet's `DiceLoss(naive_dice=False, eps=1e-3)`, which Keras has
no equivalent of. Both are computed in float32.
"""

from keras import ops


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
    """Element-wise sigmoid focal loss (mmdet `py_sigmoid_focal_loss`).

    Args:
        logits: `(..., C)` class logits.
        targets: `(..., C)` {0, 1} one-hot targets (all zero = background).

    Returns:
        `(..., C)` float32 losses (not reduced).
    """
    logits = ops.cast(logits, "float32")
    targets = ops.cast(targets, "float32")
    prob = ops.sigmoid(logits)
    pt = (1.0 - prob) * targets + prob * (1.0 - targets)
    weight = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * ops.power(pt, gamma)
    # Numerically stable binary cross-entropy with logits.
    bce = ops.maximum(logits, 0.0) - logits * targets + ops.log1p(ops.exp(-ops.abs(logits)))
    return bce * weight


def dice_loss(logits, targets, eps=1e-3):
    """Per-mask dice loss `1 - 2 Σpt / ((Σp² + eps) + (Σt² + eps))`, p = sigmoid.

    Args:
        logits: `(..., h, w)` mask logits.
        targets: `(..., h, w)` {0, 1} targets.

    Returns:
        `(...)` float32 losses, one per mask.
    """
    p = ops.sigmoid(ops.cast(logits, "float32"))
    t = ops.cast(targets, "float32")
    inter = ops.sum(p * t, axis=(-2, -1))
    denom = (ops.sum(p * p, axis=(-2, -1)) + eps) + (ops.sum(t * t, axis=(-2, -1)) + eps)
    return 1.0 - 2.0 * inter / denom
