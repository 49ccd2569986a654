"""mmdetection 3.3 SOLOv2 checkpoint ↔ Keras `SOLOv2` weights.

Every tensor of mmdet's state dict maps onto one Keras variable (conv weights
`(O, I, kh, kw)` → `(kh, kw, I, O)`; BatchNorm `weight/bias/running_mean/
running_var` → `gamma/beta/moving_mean/moving_variance`; GroupNorm
`weight/bias` → `gamma/beta`); `num_batches_tracked` is ignored. Anything
unmapped, missing or of the wrong shape is an error that lists the tensors —
a conversion is never partial.
"""

import re
from pathlib import Path

import numpy as np

_STAGE_KEY = re.compile(r"^backbone\.layer(\d)\.(\d+)\.")


def load_state_dict(path):
    """A checkpoint's tensors as numpy arrays (`{"meta", "state_dict"}` or bare).

    Reads with `torch.load(..., map_location="cpu", weights_only=True)`: a
    pickle cannot run code. torch is the `convert` extra.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist.")
    try:
        import torch
    except ImportError:
        raise ImportError(
            "Reading .pth checkpoints needs PyTorch: pip install 'keras-solov2[convert]'."
        ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e
    return to_numpy_state_dict(obj, source=str(path))


def to_numpy_state_dict(obj, source="state dict"):
    """Unwraps `{"state_dict": ...}` and converts tensors to numpy."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{source}: expected a state dict (name -> tensor), got {type(obj).__name__}.")
    out = {}
    for k, v in obj.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        out[k] = np.asarray(v)
    return out


def infer_config(state_dict, norm_groups=32):
    """SOLOv2 constructor arguments read off the tensor shapes.

    Depth and blocks per stage come from the `backbone.layer*` keys, widths
    from the FPN/head shapes, classes from `conv_cls`. GroupNorm groups cannot
    be inferred (mmdet: 32); pass `norm_groups` when they differ.
    """
    from keras_solov2.models.backbone import build_resnet_backbone

    sd = state_dict
    blocks = [0, 0, 0, 0]
    for k in sd:
        m = _STAGE_KEY.match(k)
        if m:
            blocks[int(m.group(1)) - 1] = max(blocks[int(m.group(1)) - 1], int(m.group(2)) + 1)
    if not all(blocks):
        raise ValueError("state dict has no backbone.layer1..4 tensors: not an mmdet ResNet SOLOv2 checkpoint.")
    bottleneck = "backbone.layer1.0.conv3.weight" in sd
    name = {True: {(3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101"},
            False: {(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet34"}}[bottleneck].get(tuple(blocks))
    backbone = build_resnet_backbone(
        name or ("resnet50" if bottleneck else "resnet18"), stackwise_num_blocks=blocks
    )
    stacked = len({k.split(".")[2] for k in sd if k.startswith("mask_head.kernel_convs.")})
    return dict(
        backbone=backbone,
        num_classes=int(sd["mask_head.conv_cls.weight"].shape[0]),
        fpn_channels=int(sd["neck.lateral_convs.0.conv.weight"].shape[0]),
        feat_channels=int(sd["mask_head.conv_cls.weight"].shape[1]),
        stacked_convs=stacked,
        mask_feat_channels=int(sd["mask_head.mask_feature_head.convs_all_levels.0.conv0.conv.weight"].shape[0]),
        mask_out_channels=int(sd["mask_head.conv_kernel.weight"].shape[0]),
        norm_groups=norm_groups,
    )


def weight_map(model):
    """`[(mmdet key, keras variable, is_conv_kernel)]` for every tensor of `model`."""
    pairs = []

    def conv(key, layer, bias=False):
        pairs.append((f"{key}.weight", layer.kernel, True))
        if bias:
            pairs.append((f"{key}.bias", layer.bias, False))

    def bn(key, layer):
        for suffix, var in (("weight", layer.gamma), ("bias", layer.beta),
                            ("running_mean", layer.moving_mean), ("running_var", layer.moving_variance)):
            pairs.append((f"{key}.{suffix}", var, False))

    def conv_gn(key, block):
        conv(f"{key}.conv", block.conv)
        pairs.append((f"{key}.gn.weight", block.gn.gamma, False))
        pairs.append((f"{key}.gn.bias", block.gn.beta, False))

    bb = model.backbone
    conv("backbone.conv1", bb.get_layer("conv1_conv"))
    bn("backbone.bn1", bb.get_layer("conv1_bn"))
    names = {layer.name for layer in bb.layers}
    for s, num_blocks in enumerate(bb.stackwise_num_blocks):
        for b in range(num_blocks):
            prefix, key = f"stack{s}_block{b}", f"backbone.layer{s + 1}.{b}"
            for k in (1, 2, 3):
                if f"{prefix}_{k}_conv" in names:
                    conv(f"{key}.conv{k}", bb.get_layer(f"{prefix}_{k}_conv"))
                    bn(f"{key}.bn{k}", bb.get_layer(f"{prefix}_{k}_bn"))
            if f"{prefix}_0_conv" in names:
                conv(f"{key}.downsample.0", bb.get_layer(f"{prefix}_0_conv"))
                bn(f"{key}.downsample.1", bb.get_layer(f"{prefix}_0_bn"))
    for i, layer in enumerate(model.neck.lateral_convs):
        conv(f"neck.lateral_convs.{i}.conv", layer, bias=True)
    for i, layer in enumerate(model.neck.fpn_convs):
        conv(f"neck.fpn_convs.{i}.conv", layer, bias=True)
    head = model.instance_head
    for i, block in enumerate(head.kernel_convs):
        conv_gn(f"mask_head.kernel_convs.{i}", block)
    for i, block in enumerate(head.cls_convs):
        conv_gn(f"mask_head.cls_convs.{i}", block)
    conv("mask_head.conv_kernel", head.conv_kernel, bias=True)
    conv("mask_head.conv_cls", head.conv_cls, bias=True)
    mfh = model.mask_feature_head
    for level, convs in enumerate(mfh.convs_all_levels):
        for j, block in enumerate(convs):
            conv_gn(f"mask_head.mask_feature_head.convs_all_levels.{level}.conv{j}", block)
    conv_gn("mask_head.mask_feature_head.conv_pred", mfh.conv_pred)
    return pairs


def load_into_model(model, state_dict):
    """Assigns every tensor of `state_dict` to `model`; raises listing any mismatch."""
    pairs = weight_map(model)
    tensors = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    mapped = {k for k, _, _ in pairs}
    missing = sorted(mapped - set(tensors))
    unmapped = sorted(set(tensors) - mapped)
    wrong = []
    for key, var, is_conv in pairs:
        if key in tensors:
            value = tensors[key].transpose(2, 3, 1, 0) if is_conv and tensors[key].ndim == 4 else tensors[key]
            if tuple(value.shape) != tuple(var.shape):
                wrong.append(f"{key}: checkpoint {tuple(tensors[key].shape)} vs model {tuple(var.shape)}")
    if missing or unmapped or wrong:
        lines = []
        if missing:
            lines.append(f"missing from the checkpoint ({len(missing)}): {missing[:20]}")
        if unmapped:
            lines.append(f"not mapped to the model ({len(unmapped)}): {unmapped[:20]}")
        if wrong:
            lines.append(f"shape mismatches ({len(wrong)}): {wrong[:20]}")
        raise ValueError("checkpoint does not match the model:\n  " + "\n  ".join(lines))
    for key, var, is_conv in pairs:
        value = tensors[key]
        if is_conv:
            value = value.transpose(2, 3, 1, 0)
        var.assign(value.astype(var.dtype))
    return model


def model_to_state_dict(model):
    """The inverse mapping: Keras weights → an mmdet-keyed dict of numpy arrays."""
    out = {}
    for key, var, is_conv in weight_map(model):
        value = np.asarray(var)
        out[key] = value.transpose(3, 2, 0, 1) if is_conv else value
    return out


def convert(checkpoint, norm_groups=32, **overrides):
    """A `SOLOv2` holding an mmdet checkpoint's weights.

    Args:
        checkpoint: path of a `.pth` file or an already loaded state dict.
        norm_groups: GroupNorm groups of the head (mmdet: 32).
        **overrides: other `SOLOv2` arguments (test_cfg, class_names, ...).
    """
    from keras_solov2.models.solov2 import SOLOv2

    sd = checkpoint if isinstance(checkpoint, dict) else load_state_dict(checkpoint)
    sd = to_numpy_state_dict(sd)
    model = SOLOv2(**dict(infer_config(sd, norm_groups), **overrides))
    return load_into_model(model, sd)
