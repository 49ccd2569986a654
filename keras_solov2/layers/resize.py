"""Bilinear resize (half-pixel centres = torch `align_corners=False`) for static or dynamic sizes."""

from keras import ops


def resize_bilinear(images, size):
    """`(B, H, W, C)` → `(B, size[0], size[1], C)`, no antialiasing.

    Interpolated in float32 and returned in the input's dtype. TensorFlow's
    bilinear resize answers in float32 for a bfloat16 input anyway, and
    XLA's gradient of that mixed op is an internal error ("floating point
    types of different precisions") under `jit_compile=True`.

    `keras.ops.image.resize` needs Python ints; under `predict`'s relaxed
    shapes the target size is a tensor, which only `tf.image.resize` takes.
    """
    x = ops.cast(images, "float32")
    if all(isinstance(s, int) for s in size):
        out = ops.image.resize(x, size, interpolation="bilinear")
    else:
        import tensorflow as tf

        out = tf.image.resize(x, tf.stack(size), method="bilinear")
    return ops.cast(out, images.dtype)
