"""Bilinear resize (half-pixel centres = torch `align_corners=False`) for static or dynamic sizes."""

from keras import ops


def resize_bilinear(images, size):
    """`(B, H, W, C)` → `(B, size[0], size[1], C)`, no antialiasing.

    `keras.ops.image.resize` needs Python ints; under `predict`'s relaxed
    shapes the target size is a tensor, which only `tf.image.resize` takes.
    """
    if all(isinstance(s, int) for s in size):
        return ops.image.resize(images, size, interpolation="bilinear")
    import tensorflow as tf

    # (tf.image.resize answers in float32 for every input dtype but float16)
    return tf.cast(tf.image.resize(images, tf.stack(size), method="bilinear"), images.dtype)
