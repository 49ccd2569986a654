"""`SOLOv2MaskFeatureHead`: the unified stride-4 mask features (mmdet `MaskFeatModule`)."""

import keras
from keras import ops

from keras_solov2.layers.conv_norm_relu import ConvNormReLU
from keras_solov2.layers.coord_conv import CoordConv
from keras_solov2.layers.resize import resize_bilinear


@keras.saving.register_keras_serializable(package="keras_solov2")
class SOLOv2MaskFeatureHead(keras.layers.Layer):
    """Unified mask-feature branch (mmdetection `MaskFeatModule`).

    P2 → conv; P3, P4, P5 → i × (3×3 conv-GN-ReLU → bilinear ×2 upsample,
    align_corners=False), with `[x, y]` coordinates appended to P5 only; the
    four stride-4 maps are summed and a 1×1 conv-GN-ReLU gives E channels.

    Args:
        feat_channels: int, hidden width (128 in SOLOv2).
        out_channels: int, E (256 standard, 128 light).
        norm_groups: int, GroupNorm groups.
        winograd: 3×3 convs by Winograd F(4×4, 3×3) where it pays (see
            `ConvNormReLU`).

    Call arguments:
        inputs: list `[P2, P3, P4, P5]` of `(B, H/s, W/s, C_fpn)`.

    Returns:
        `(B, H/4, W/4, E)` mask features (non-negative).

    Example:
    >>> import numpy as np
    >>> head = SOLOv2MaskFeatureHead(feat_channels=8, out_channels=16, norm_groups=4)
    >>> pyramid = [np.zeros((1, 64 // s, 64 // s, 16), "float32") for s in (4, 8, 16, 32)]
    >>> tuple(head(pyramid).shape)
    (1, 16, 16, 16)
    """

    def __init__(self, feat_channels=128, out_channels=256, norm_groups=32, winograd=True, **kwargs):
        super().__init__(**kwargs)
        self.feat_channels = int(feat_channels)
        self.out_channels = int(out_channels)
        self.norm_groups = int(norm_groups)
        self.winograd = bool(winograd)
        init = keras.initializers.RandomNormal(stddev=0.01)
        self.coord = CoordConv(dtype=self.dtype_policy, name="coord")
        self.convs_all_levels = []
        for level in range(4):
            convs = [
                ConvNormReLU(
                    self.feat_channels, 3, self.norm_groups, init, winograd=self.winograd,
                    dtype=self.dtype_policy, name=f"convs_all_levels_{level}_conv{j}",
                )
                for j in range(max(level, 1))
            ]
            self.convs_all_levels.append(convs)
        # mmdet's MaskFeatModule leaves this 1×1 ConvModule at mmcv's own
        # Kaiming (fan-out) init instead of Normal(0.01) (measured on
        # mmdet 3.3's `init_weights`).
        self.conv_pred = ConvNormReLU(
            self.out_channels, 1, self.norm_groups,
            keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal"),
            dtype=self.dtype_policy, name="conv_pred",
        )

    def build(self, input_shape):
        in_channels = input_shape[0][-1]
        for level, convs in enumerate(self.convs_all_levels):
            channels = in_channels + 2 if level == 3 else in_channels
            for conv in convs:
                conv.build((None, None, None, channels))
                channels = self.feat_channels
        self.conv_pred.build((None, None, None, self.feat_channels))

    def call(self, inputs):
        total = None
        for level, (feat, convs) in enumerate(zip(inputs, self.convs_all_levels)):
            if level == 3:
                feat = self.coord(feat)
            for conv in convs:
                feat = conv(feat)
                if level > 0:
                    # Bilinear x2, align_corners=False (half-pixel centres);
                    # sizes from the tensor so unknown H, W work too.
                    shape = ops.shape(feat)
                    feat = resize_bilinear(feat, (shape[1] * 2, shape[2] * 2))
            total = feat if total is None else total + feat
        return self.conv_pred(total)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0][:-1]) + (self.out_channels,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "feat_channels": self.feat_channels,
                "out_channels": self.out_channels,
                "norm_groups": self.norm_groups,
                "winograd": self.winograd,
            }
        )
        return config
