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

    def call(self, inputs):
        shape = ops.shape(inputs)
        h, w = shape[1], shape[2]
        dtype = self.compute_dtype
        x = ops.linspace(-1.0, 1.0, w, dtype="float32")
        y = ops.linspace(-1.0, 1.0, h, dtype="float32")
        xx = ops.broadcast_to(x[None, :], (h, w))
        yy = ops.broadcast_to(y[:, None], (h, w))
        coords = ops.cast(ops.stack([xx, yy], axis=-1), dtype)
        coords = ops.broadcast_to(coords[None], (shape[0], h, w, 2))
        return ops.concatenate([ops.cast(inputs, dtype), coords], axis=-1)

    def compute_output_shape(self, input_shape):
        channels = None if input_shape[-1] is None else input_shape[-1] + 2
        return tuple(input_shape[:-1]) + (channels,)
