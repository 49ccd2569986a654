"""Backbones: keras-hub `ResNetBackbone` in torchvision ("pytorch") style.

keras-hub's ResNet puts the stride on the 3×3 conv, pads like torch and uses
BatchNorm eps 1e-5: given mmdetection's weights it reproduces mmdet's ResNet
(see the converter tests), so it is used as is rather than re-implemented.
Only its random initialisation is replaced by mmdet's (`mmdet_resnet_init`),
which matters when training from scratch.
"""

import keras
import keras_hub

RESNET_ARCHS = {
    "resnet18": ("basic_block", [2, 2, 2, 2]),
    "resnet34": ("basic_block", [3, 4, 6, 3]),
    "resnet50": ("bottleneck_block", [3, 4, 6, 3]),
    "resnet101": ("bottleneck_block", [3, 4, 23, 3]),
}


def build_resnet_backbone(name="resnet50", stackwise_num_blocks=None, dtype=None):
    """A keras-hub `ResNetBackbone` (ResNet v1, pytorch style), initialised as mmdet's.

    The random weights are mmdet's from-scratch ResNet init
    (`mmdet_resnet_init`), not keras-hub's defaults.

    Args:
        name: one of `"resnet18"`, `"resnet34"`, `"resnet50"`, `"resnet101"`.
        stackwise_num_blocks: optional override of the blocks per stage
            (tests use `[1, 1, 1, 1]`).
        dtype: optional dtype policy.

    Returns:
        A `keras_hub.models.ResNetBackbone` with `pyramid_outputs` P2–P5.
    """
    if name not in RESNET_ARCHS:
        raise ValueError(
            f"Unknown backbone {name!r}; expected one of {sorted(RESNET_ARCHS)} "
            "or a keras-hub Backbone instance with `pyramid_outputs` P2-P5."
        )
    block_type, blocks = RESNET_ARCHS[name]
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 128, 256, 512],
        stackwise_num_blocks=list(stackwise_num_blocks or blocks),
        stackwise_num_strides=[1, 2, 2, 2],
        block_type=block_type,
        use_pre_activation=False,
        image_shape=(None, None, 3),
        dtype=dtype,
    )
    mmdet_resnet_init(backbone)
    return backbone


def mmdet_resnet_init(backbone):
    """Re-initialise a keras-hub ResNet in place as mmdet 3.3's `ResNet` does
    when it has no checkpoint (`init_cfg=None`).

    Every conv kernel: Kaiming normal, fan-out mode, ReLU gain, i.e.
    `N(0, 2 / (k_h·k_w·C_out))` (keras-hub's default is Glorot uniform).
    Every BatchNorm γ = 1, β = 0, except the last BatchNorm of each residual
    block, whose γ starts at 0 (`zero_init_residual=True`): every block
    starts as the identity. Matching mmdet here keeps from-scratch runs
    comparable with mmdet's (`benchmarks/train_parity.py` starts both from
    the same weights). Seeded by `keras.utils.set_random_seed`.

    Returns:
        The number of residual blocks whose last γ was zeroed.
    """
    kaiming = keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal"
    )
    last_bn = {}
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.Conv2D):
            layer.kernel.assign(kaiming(layer.kernel.shape, layer.kernel.dtype))
        elif isinstance(layer, keras.layers.BatchNormalization):
            # keras-hub names a block's BatchNorms `stack{s}_block{b}_{i}_bn`;
            # i = 0 is the projection shortcut's, the highest i the last of
            # the residual branch.
            block, _, index = layer.name[: -len("_bn")].rpartition("_")
            if "_block" in block and index.isdigit() and index != "0":
                if int(index) > last_bn.get(block, (0, None))[0]:
                    last_bn[block] = (int(index), layer)
    for _, layer in last_bn.values():
        layer.gamma.assign(keras.ops.zeros(layer.gamma.shape, layer.gamma.dtype))
    return len(last_bn)


def pyramid_extractor(backbone):
    """A functional model sharing `backbone`'s layers that returns `[C2, C3, C4, C5]`."""
    outputs = getattr(backbone, "pyramid_outputs", None)
    missing = [k for k in ("P2", "P3", "P4", "P5") if not outputs or k not in outputs]
    if missing:
        raise ValueError(
            f"The backbone {backbone.name!r} has no pyramid_outputs {missing}; "
            "SOLOv2 needs features at strides 4, 8, 16 and 32 (P2-P5)."
        )
    return keras.Model(
        backbone.inputs,
        [outputs[k] for k in ("P2", "P3", "P4", "P5")],
        name="pyramid_extractor",
    )


def frozen_stage_layers(backbone, frozen_stages):
    """Layers of the stem and the first `frozen_stages` stages (mmdet `frozen_stages`)."""
    if frozen_stages < 0:
        return []
    prefixes = ["conv1_", "pool1_"] + [f"stack{i}_" for i in range(frozen_stages)]
    return [
        layer
        for layer in backbone.layers
        if any(layer.name.startswith(p) for p in prefixes)
    ]


def checkpointed_extractor(extractor, frozen_stages):
    """`extractor`'s forward pass with each trainable stage under `keras.remat`.

    The backbone is cut at its pyramid outputs into 4 segments (stem +
    stage 1 → C2, stage 2 → C3, stage 3 → C4, stage 4 → C5). A segment that
    holds trainable layers keeps only its input for the backward pass and
    recomputes its activations there (`keras.remat`: `tf.recompute_grad` on
    TensorFlow); frozen segments have no backward. This is mmdet's ResNet
    `with_cp`, per stage rather than per block: only C2–C5, which the FPN
    keeps anyway, stay alive. The recomputation runs BatchNorm again, so it
    is only valid with BatchNorm in inference mode (`norm_eval=True`).

    Args:
        extractor: the functional model of `pyramid_extractor`.
        frozen_stages: mmdet's `frozen_stages` (segments `< frozen_stages`
            are frozen; -1: none).

    Returns:
        A function `images (B, H, W, 3) → [C2, C3, C4, C5]`, computing what
        `extractor(images, training=False)` does.
    """
    ends = extractor.outputs
    starts = extractor.inputs[:1] + ends[:-1]
    segments = []
    for i, (start, end) in enumerate(zip(starts, ends)):
        model = keras.Model(start, end, name=f"{extractor.name}_segment{i}")
        # training=False explicitly: the caller's training=True would
        # otherwise reach the BatchNorms through Keras's call context.
        segment = lambda x, m=model: m(x, training=False)  # noqa: E731
        segments.append(keras.remat(segment) if i >= frozen_stages else segment)

    def extract(images):
        feats = [images]
        for segment in segments:
            feats.append(segment(feats[-1]))
        return feats[1:]

    return extract
