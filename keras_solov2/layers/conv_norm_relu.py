"""3×3 conv → GroupNorm → ReLU, the unit of SOLOv2's head towers and mask branch (mmcv `ConvModule`)."""

import keras

from keras_solov2.layers.group_norm import GroupNorm
from keras_solov2.winograd import conv_same


@keras.saving.register_keras_serializable(package="keras_solov2")
class ConvNormReLU(keras.layers.Layer):
    """Conv2D (no bias) → GroupNorm → ReLU, mmcv's `ConvModule` with GN.

    Sub-layer names `conv` and `gn` mirror the mmdet state-dict keys
    (`<name>.conv.weight`, `<name>.gn.weight/bias`).

    Args:
        filters: int, output channels.
        kernel_size: int, 3 (padding 1) or 1.
        norm_groups: int, GroupNorm groups (eps 1e-5 as torch).
        kernel_initializer: initializer of the conv kernel.
        winograd: a 3×3 conv runs by Winograd F(4×4, 3×3) where
            `keras_solov2.winograd.use_winograd` says it pays (float32 on
            CPU); relative error ≈ 2e-5.

    Call arguments:
        inputs: `(B, H, W, C_in)`. (`SOLOv2InstanceHead` runs a layer's conv
            on all pyramid levels at once, with weights cast once, and only
            calls `norm_relu` on the results.)

    Returns:
        `(B, H, W, filters)`, non-negative.

    Example:
    >>> import numpy as np
    >>> y = ConvNormReLU(8, 3, norm_groups=4)(np.random.rand(2, 5, 5, 3).astype("float32"))
    >>> tuple(y.shape), bool(np.min(y) >= 0)
    ((2, 5, 5, 8), True)
    """

    def __init__(
        self,
        filters,
        kernel_size=3,
        norm_groups=32,
        kernel_initializer="he_normal",
        winograd=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.norm_groups = int(norm_groups)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.winograd = bool(winograd)
        self.conv = keras.layers.Conv2D(
            self.filters,
            self.kernel_size,
            padding="same",
            use_bias=False,
            kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
            name="conv",
        )
        self.gn = GroupNorm(
            groups=self.norm_groups, epsilon=1e-5, dtype=self.dtype_policy, name="gn"
        )

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.gn.build(tuple(input_shape[:-1]) + (self.filters,))

    def call(self, inputs):
        kernel = keras.ops.cast(self.conv.kernel, self.compute_dtype)
        return self.norm_relu(conv_same([inputs], kernel, self.winograd)[0])

    def norm_relu(self, conv_output):
        """GroupNorm → ReLU of this layer's conv output computed elsewhere
        (e.g. by `keras_solov2.winograd.conv3x3_same`), `(B, H, W, filters)`."""
        return keras.ops.relu(self.gn(conv_output))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.filters,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "norm_groups": self.norm_groups,
                "winograd": self.winograd,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config
