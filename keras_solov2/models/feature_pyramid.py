"""`SOLOv2FeaturePyramid`: mmdet's FPN (P2–P5 laterals and outputs, P6 by max-pool)."""

import keras
from keras import ops

from keras_solov2.winograd import conv_same


@keras.saving.register_keras_serializable(package="keras_solov2")
class SOLOv2FeaturePyramid(keras.layers.Layer):
    """FPN neck as mmdetection's `FPN(num_outs=5, add_extra_convs=False)`.

    Lateral 1×1 convs, a nearest-neighbour top-down pathway, 3×3 output convs
    (all with bias), and P6 = stride-2 max-pool of P5 with a 1×1 window, i.e.
    `P5[:, ::2, ::2]`.

    Args:
        channels: int, output channels of every level (256 in SOLOv2).
        winograd: the 3×3 output convs run by Winograd F(4×4, 3×3) where
            `keras_solov2.winograd.use_winograd` says it pays (float32 on
            CPU); relative error ≈ 2e-5.

    Call arguments:
        inputs: list `[C2, C3, C4, C5]` of `(B, H/s, W/s, C_i)` backbone
            features at strides 4, 8, 16, 32.

    Returns:
        List `[P2, P3, P4, P5, P6]` of `(B, H/s, W/s, channels)`, strides
        4, 8, 16, 32, 64.

    Example:
    >>> import numpy as np
    >>> feats = [np.zeros((1, 64 // s, 64 // s, 8), "float32") for s in (4, 8, 16, 32)]
    >>> [tuple(p.shape) for p in SOLOv2FeaturePyramid(16)(feats)][-1]
    (1, 1, 1, 16)
    """

    def __init__(self, channels=256, winograd=True, **kwargs):
        super().__init__(**kwargs)
        self.channels = int(channels)
        self.winograd = bool(winograd)
        self.lateral_convs = [
            keras.layers.Conv2D(
                self.channels, 1, dtype=self.dtype_policy, name=f"lateral_convs_{i}"
            )
            for i in range(4)
        ]
        self.fpn_convs = [
            keras.layers.Conv2D(
                self.channels,
                3,
                padding="same",
                dtype=self.dtype_policy,
                name=f"fpn_convs_{i}",
            )
            for i in range(4)
        ]

    def build(self, input_shape):
        for conv, shape in zip(self.lateral_convs, input_shape):
            conv.build(shape)
        for conv, shape in zip(self.fpn_convs, input_shape):
            conv.build(tuple(shape[:-1]) + (self.channels,))

    def call(self, inputs):
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            # Exact 2x nearest (inputs are multiples of 32): torch's
            # interpolate(size=..., mode="nearest") repeats each pixel.
            up = ops.repeat(ops.repeat(laterals[i], 2, axis=1), 2, axis=2)
            laterals[i - 1] = laterals[i - 1] + up
        outs = [self._output_conv(conv, x) for conv, x in zip(self.fpn_convs, laterals)]
        outs.append(outs[-1][:, ::2, ::2, :])
        return outs

    def _output_conv(self, conv, x):
        kernel, bias = (ops.cast(v, self.compute_dtype) for v in (conv.kernel, conv.bias))
        return ops.add(conv_same([x], kernel, self.winograd)[0], bias)

    def compute_output_shape(self, input_shape):
        shapes = [tuple(s[:-1]) + (self.channels,) for s in input_shape]
        b, h, w, c = shapes[-1]
        half = lambda d: None if d is None else (d + 1) // 2  # noqa: E731
        return shapes + [(b, half(h), half(w), c)]

    def get_config(self):
        config = super().get_config()
        config.update({"channels": self.channels, "winograd": self.winograd})
        return config
