"""`SOLOv2InstanceHead`: the category and kernel branches over the S×S grids."""

import math

import keras
import numpy as np
from keras import ops

from keras_solov2.gather import take_rows
from keras_solov2.layers.conv_norm_relu import ConvNormReLU
from keras_solov2.layers.coord_conv import CoordConv
from keras_solov2.layers.resize import resize_bilinear
from keras_solov2.winograd import conv_same, use_winograd


@keras.saving.register_keras_serializable(package="keras_solov2")
class SOLOv2InstanceHead(keras.layers.Layer):
    """SOLOv2 kernel and category branches, shared across the 5 levels.

    Per level (mmdetection `SOLOV2Head.forward`): P2 is downsampled ×0.5 and
    P6 upsampled to P5's size (`resize_feats`); `[x, y]` coordinates are
    appended (`CoordConv`); the result is resized bilinearly
    (align_corners=False) to S×S; the kernel branch takes all channels, the
    category branch the feature channels only. Each branch is
    `stacked_convs` × (3×3 conv → GroupNorm → ReLU), then a 3×3 conv with
    bias to `kernel_out_channels` (E) kernel weights or `num_classes` logits.

    Args:
        num_classes: int, C.
        num_grids: list of S per level, e.g. `[40, 36, 24, 16, 12]`.
        feat_channels: int, tower width (512 standard, 256 light).
        stacked_convs: int, tower depth (4 standard, 2 light).
        kernel_out_channels: int, E (= mask feature channels).
        norm_groups: int, GroupNorm groups.
        prior_prob: float, initial foreground probability of the class
            logits (bias `-log((1 - p) / p)`).
        winograd: run the branches' 3×3 convs, all levels of a layer in one
            go, by Winograd F(4×4, 3×3) where `keras_solov2.winograd.
            use_winograd` says it pays (float32 on CPU): ≈ 2× faster (a
            512→512 layer, 5 levels, batch 2: 77 → 37 ms), relative
            error ≈ 2e-5. `False`: direct convs, one level at a time.

    Call arguments:
        inputs: list `[P2, ..., P6]` of `(B, H/s, W/s, C_fpn)`.
        dense_kernels: `False` returns the kernel towers `(B, S, S, F)`
            (F = `feat_channels`) in place of the kernels, for `kernels_at`
            to evaluate the final conv at a few cells only.

    Returns:
        `(cls_logits, kernels)`: lists over levels of `(B, S, S, C)` logits
        and `(B, S, S, E)` kernels; grid index = `row * S + col`.

    Example:
    >>> import numpy as np
    >>> head = SOLOv2InstanceHead(num_classes=3, num_grids=[8, 6, 4, 3, 2], feat_channels=16,
    ...                           stacked_convs=1, kernel_out_channels=8, norm_groups=4)
    >>> pyramid = [np.zeros((1, 64 // s, 64 // s, 16), "float32") for s in (4, 8, 16, 32, 64)]
    >>> cls_logits, kernels = head(pyramid)
    >>> [tuple(c.shape) for c in cls_logits][:2], tuple(kernels[-1].shape)
    ([(1, 8, 8, 3), (1, 6, 6, 3)], (1, 2, 2, 8))
    """

    def __init__(
        self,
        num_classes,
        num_grids=(40, 36, 24, 16, 12),
        feat_channels=512,
        stacked_convs=4,
        kernel_out_channels=256,
        norm_groups=32,
        prior_prob=0.01,
        winograd=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.num_grids = [int(s) for s in num_grids]
        self.feat_channels = int(feat_channels)
        self.stacked_convs = int(stacked_convs)
        self.kernel_out_channels = int(kernel_out_channels)
        self.norm_groups = int(norm_groups)
        self.prior_prob = float(prior_prob)
        self.winograd = bool(winograd)
        init = keras.initializers.RandomNormal(stddev=0.01)
        self.coord = CoordConv(dtype=self.dtype_policy, name="coord")
        self.kernel_convs = [
            ConvNormReLU(
                self.feat_channels, 3, self.norm_groups, init, winograd=self.winograd,
                dtype=self.dtype_policy, name=f"kernel_convs_{i}",
            )
            for i in range(self.stacked_convs)
        ]
        self.cls_convs = [
            ConvNormReLU(
                self.feat_channels, 3, self.norm_groups, init, winograd=self.winograd,
                dtype=self.dtype_policy, name=f"cls_convs_{i}",
            )
            for i in range(self.stacked_convs)
        ]
        self.conv_kernel = keras.layers.Conv2D(
            self.kernel_out_channels, 3, padding="same", kernel_initializer=init,
            dtype=self.dtype_policy, name="conv_kernel",
        )
        bias = -math.log((1 - self.prior_prob) / self.prior_prob)
        self.conv_cls = keras.layers.Conv2D(
            self.num_classes, 3, padding="same", kernel_initializer=init,
            bias_initializer=keras.initializers.Constant(bias),
            dtype=self.dtype_policy, name="conv_cls",
        )

    def build(self, input_shape):
        in_channels = input_shape[0][-1]
        shape = (None, None, None, in_channels + 2)
        for conv in self.kernel_convs:
            conv.build(shape)
            shape = (None, None, None, self.feat_channels)
        shape = (None, None, None, in_channels)
        for conv in self.cls_convs:
            conv.build(shape)
            shape = (None, None, None, self.feat_channels)
        self.conv_kernel.build(shape)
        self.conv_cls.build(shape)

    def resize_feats(self, inputs):
        p2, p3, p4, p5, p6 = inputs
        # Bilinear x0.5 (align_corners=False) of an even-sized map is exactly
        # the 2x2 average.
        p2 = ops.average_pool(p2, 2, strides=2, padding="valid")
        p5_hw = ops.shape(p5)[1:3]
        p6 = resize_bilinear(p6, (p5_hw[0], p5_hw[1]))
        return [p2, p3, p4, p5, p6]

    def level_features(self, inputs):
        """`[P2..P6]` → per level `(B, S, S, C_fpn + 2)`: resized, with coordinates."""
        feats = []
        for feat, num_grid in zip(self.resize_feats(inputs), self.num_grids):
            feat = self.coord(feat)
            feats.append(resize_bilinear(feat, (int(num_grid), int(num_grid))))
        return feats

    def uses_winograd(self):
        """Whether the branches' convs run by Winograd F(4×4, 3×3) here."""
        return self.winograd and use_winograd(self.compute_dtype)

    def branch_weights(self, final_kernel_conv=True):
        """Both branches' conv weights in the compute dtype, each read and cast once.

        The branches run on all 5 levels. Under mixed precision each call of
        a layer casts its float32 weights anew, and TensorFlow runs those
        casts (they read only variables) at the start of a training step and
        keeps them for the backward pass: 5 copies of every weight, 0.2 GB
        of a 1.2 GB tensor peak (R50, batch 2, 512², mixed_bfloat16,
        `with_cp`). Passed to `category_branches` / `kernel_branches`, one copy.

        Args:
            final_kernel_conv: `False` leaves out `conv_kernel` (when
                `kernels_at` evaluates it, it reads its own copy).

        Returns:
            dict: layer name → conv kernel `(3, 3, C_in, C_out)`, and
            `"<name>/bias"` → `(C_out,)` for `conv_cls` and `conv_kernel`.
        """
        weights = {}
        for conv in self.kernel_convs + self.cls_convs:
            weights[conv.name] = ops.cast(conv.conv.kernel, self.compute_dtype)
        for conv in (self.conv_kernel, self.conv_cls) if final_kernel_conv else (self.conv_cls,):
            weights[conv.name] = ops.cast(conv.kernel, self.compute_dtype)
            weights[conv.name + "/bias"] = ops.cast(conv.bias, self.compute_dtype)
        return weights

    def category_branches(self, feats, weights=None):
        """Levels' `(B, S, S, C_fpn + 2)` features → `(B, S, S, C)` logits each.

        `weights`: `branch_weights()`, read once for all levels (default: read here).
        """
        weights = self.branch_weights() if weights is None else weights
        x = [f[..., :-2] for f in feats]
        for conv in self.cls_convs:
            x = [conv.norm_relu(y) for y in conv_same(x, weights[conv.name], self.winograd)]
        return self._output_convs(self.conv_cls, x, weights)

    def kernel_branches(self, feats, weights=None):
        """Levels' `(B, S, S, C_fpn + 2)` features → `(B, S, S, E)` kernels each.

        `weights`: `branch_weights()`, read once for all levels (default: read here).
        """
        weights = self.branch_weights() if weights is None else weights
        return self._output_convs(self.conv_kernel, self.kernel_towers(feats, weights), weights)

    def kernel_towers(self, feats, weights=None):
        """The kernel branch without its final conv: `(B, S, S, F)` per level, F = `feat_channels`.

        `weights`: `branch_weights()`, read once for all levels (default: read here).
        """
        weights = self.branch_weights() if weights is None else weights
        x = list(feats)
        for conv in self.kernel_convs:
            x = [conv.norm_relu(y) for y in conv_same(x, weights[conv.name], self.winograd)]
        return x

    def kernels_at(self, towers, cells):
        """The final kernel conv evaluated at the given grid cells only.

        At inference only the kernels of candidate cells (those passing
        `score_thr`) are read, typically a few hundred of the 3,872 cells of
        the standard grids, and in training only those of the loss's positive
        (instance, cell) pairs: the 3×3 conv to E channels is then a gather of
        each cell's 3×3 neighbourhood (zeros outside the grid, as the conv's
        "same" padding) and one `(K, 9F) @ (9F, E)` product, ≈ 1.2 instead
        of 9.1 GFLOP at 500 cells. The GroupNorm towers before it need whole
        maps and stay dense.

        Args:
            towers: list over levels of `kernel_towers` outputs `(B, S, S, F)`.
            cells: `(B, K)` int, flat cell index over all levels (levels in
                order, `row * S + col` within a level), as the candidates of
                `keras_solov2.postprocess.decode_predictions`.

        Returns:
            `(B, K, E)` kernels: `kernel_branches` outputs at those cells, up to
            summation order.
        """
        batch = ops.shape(towers[0])[0]
        channels = towers[0].shape[-1]
        padded = [
            ops.reshape(ops.pad(t, [[0, 0], [1, 1], [1, 1], [0, 0]]), (batch, -1, channels)) for t in towers
        ]
        neighbours = ops.take(self._neighbour_table([t.shape[1] for t in towers]), cells, axis=0)  # (B, K, 9)
        num = ops.shape(cells)[1]
        patches = take_rows(ops.concatenate(padded, axis=1), ops.reshape(neighbours, (batch, -1)))
        patches = ops.reshape(patches, (batch, num, 9 * channels))
        kernel = ops.reshape(
            ops.cast(self.conv_kernel.kernel, self.compute_dtype), (9 * channels, self.kernel_out_channels)
        )
        return ops.add(ops.matmul(patches, kernel), ops.cast(self.conv_kernel.bias, self.compute_dtype))

    @staticmethod
    def _neighbour_table(grids):
        """`(sum S², 9)` int32: each cell's 3×3 neighbours (row-major, as a
        3×3 kernel's taps) as rows of the levels' zero-padded `(S + 2)²` maps,
        concatenated."""
        tables, offset = [], 0
        for s in grids:
            rows, cols = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
            taps = [
                offset + (rows + dy + 1) * (s + 2) + (cols + dx + 1)
                for dy in (-1, 0, 1)
                for dx in (-1, 0, 1)
            ]
            tables.append(np.stack(taps, axis=-1).reshape(s * s, 9))
            offset += (s + 2) ** 2
        return np.concatenate(tables).astype("int32")

    def _output_convs(self, conv, maps, weights):
        """`conv` (3×3, same padding, bias) of every level's map, with the weights of `branch_weights`."""
        return [ops.add(y, weights[conv.name + "/bias"]) for y in conv_same(maps, weights[conv.name], self.winograd)]

    def call(self, inputs, dense_kernels=True):
        feats = self.level_features(inputs)
        weights = self.branch_weights(final_kernel_conv=dense_kernels)
        cls_logits = self.category_branches(feats, weights)
        branch = self.kernel_branches if dense_kernels else self.kernel_towers
        return cls_logits, branch(feats, weights)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "num_grids": self.num_grids,
                "feat_channels": self.feat_channels,
                "stacked_convs": self.stacked_convs,
                "kernel_out_channels": self.kernel_out_channels,
                "norm_groups": self.norm_groups,
                "prior_prob": self.prior_prob,
                "winograd": self.winograd,
            }
        )
        return config
