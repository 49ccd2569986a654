"""`DynamicMaskConv`: mask features × per-instance predicted kernels → mask logits."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_solov2")
class DynamicMaskConv(keras.layers.Layer):
    """1×1 dynamic convolution: one predicted kernel per instance → mask logits.

    SOLOv2 (and every mmdetection SOLOv2 config) uses `dynamic_conv_size=1`, so
    the dynamic convolution of the unified mask features with an instance's
    kernel is a dot product over the E channels at every pixel, done here as one
    batched matmul for all instances of all images.

    Call arguments:
        mask_features: `(B, h, w, E)` unified mask features (stride 4).
        kernels: `(B, K, E)` per-instance kernels, gathered from the head's
            `kernels` outputs at the chosen grid cells.

    Returns:
        `(B, K, h, w)` mask logits (apply a sigmoid for probabilities).

    Example:
    >>> import numpy as np
    >>> feats = np.ones((1, 4, 5, 3), "float32")
    >>> kernels = np.array([[[1.0, 2.0, 3.0]]], "float32")
    >>> logits = DynamicMaskConv()(feats, kernels)
    >>> tuple(logits.shape), float(logits[0, 0, 0, 0])
    ((1, 1, 4, 5), 6.0)
    """

    def build(self, mask_features_shape, kernels_shape):
        # Both shapes named, so that Keras records them for
        # `compute_output_shape` (e.g. in `model.summary()`).
        _check_shapes(mask_features_shape, kernels_shape, self.name)

    def call(self, mask_features, kernels):
        _check_shapes(mask_features.shape, kernels.shape, self.name)
        return ops.einsum("bhwe,bke->bkhw", mask_features, kernels)

    def compute_output_shape(self, mask_features_shape, kernels_shape):
        b, h, w, _ = mask_features_shape
        return (b, kernels_shape[1], h, w)


def _check_shapes(features_shape, kernels_shape, name):
    """A ValueError naming the layer when the ranks or the E axes disagree."""
    if len(features_shape) != 4 or len(kernels_shape) != 3:
        raise ValueError(
            f"{name}: mask_features must be (B, h, w, E) and kernels (B, K, E), got shapes "
            f"{tuple(features_shape)} and {tuple(kernels_shape)}."
        )
    if None not in (features_shape[-1], kernels_shape[-1]) and features_shape[-1] != kernels_shape[-1]:
        raise ValueError(
            f"{name}: mask_features have E={features_shape[-1]} channels but the kernels "
            f"E={kernels_shape[-1]} (shapes {tuple(features_shape)} and {tuple(kernels_shape)})."
        )
