"""`CoordConv`: appends normalised x, y coordinate channels (mmdet `generate_coordinate`)."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_solov2")
class CoordConv(keras.layers.Layer):
    """Appends normalised `[x, y]` coordinate channels (the input half of CoordConv).

    SOLOv2 makes its kernel branch position-aware by concatenating two channels
    to the features: `x = linspace(-1, 1, W)` along the columns and
    `y = linspace(-1, 1, H)` along the rows, *after* the feature channels (the
    order mmdetection's `generate_coordinate` + `torch.cat` produce, which the
    converted weights depend on). The convolution that follows is an ordinary
    `Conv2D` of the head.

    Call arguments:
        inputs: `(B, H, W, C)` features.

    Returns:
        `(B, H, W, C + 2)`: the features, then x, then y.

    Example:
    >>> import numpy as np
    >>> y = CoordConv()(np.zeros((1, 2, 3, 4), "float32"))
    >>> tuple(y.shape), [float(v) for v in y[0, 0, :, 4]]
    ((1, 2, 3, 6), [-1.0, 0.0, 1.0])
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # Keras names the layer and the rank it got; otherwise a map without
        # its batch axis fails inside the concatenation.
        self.input_spec = keras.InputSpec(ndim=4)

    def call(self, inputs):
        shape = ops.shape(inputs)
        inputs = ops.cast(inputs, self.compute_dtype)
        zeros = ops.zeros_like(inputs[..., :1])  # (B, H, W, 1), any H, W
        x = ops.cast(_linspace(shape[2]), self.compute_dtype)[None, None, :, None] + zeros
        y = ops.cast(_linspace(shape[1]), self.compute_dtype)[None, :, None, None] + zeros
        return ops.concatenate([inputs, x, y], axis=-1)

    def compute_output_shape(self, input_shape):
        channels = None if input_shape[-1] is None else input_shape[-1] + 2
        return tuple(input_shape[:-1]) + (channels,)


def _linspace(num):
    """`torch.linspace(-1, 1, num)` in float32, also for a tensor `num`.

    torch fills the first half as `-1 + i * step` and the second half as
    `1 - (num - 1 - i) * step`; the same here keeps the last bit equal.
    """
    i = ops.cast(ops.arange(num), "float32")
    n = ops.cast(num, "float32")
    step = 2.0 / ops.maximum(n - 1.0, 1.0)
    return ops.where(i < n / 2.0, -1.0 + i * step, 1.0 - (n - 1.0 - i) * step)
