"""mmdetection SOLOv2 checkpoints ↔ Keras `SOLOv2` weights.

Every tensor of mmdet's state dict maps onto exactly one Keras variable:

| mmdet (PyTorch, NCHW)                       | Keras (NHWC)                               |
|---------------------------------------------|--------------------------------------------|
| conv `weight (O, I, kh, kw)`                | `Conv2D.kernel (kh, kw, I, O)`             |
| conv `bias (O,)`                            | `Conv2D.bias (O,)`                         |
| BN `weight / bias`                          | `BatchNormalization.gamma / beta`          |
| BN `running_mean / running_var`             | `moving_mean / moving_variance`            |
| GN `weight / bias`                          | `GroupNormalization.gamma / beta`          |
| BN `num_batches_tracked` (int64 scalar)     | ignored (written back as 0 by the inverse) |

Anything unmapped, missing or of the wrong shape is an error that lists the
tensors: a conversion is never partial. The architecture (ResNet depth and
blocks per stage, FPN width, head width and depth, E, number of classes) is
read off the tensor shapes; GroupNorm groups cannot be, so they default to
mmdet's 32 (`norm_groups=` overrides).

Example (a state dict of numpy arrays, as the `.pth` reader returns):
>>> from keras_solov2.models import SOLOv2
>>> model = SOLOv2.from_architecture("solov2_light_r18", num_classes=3)
>>> state_dict = model_to_state_dict(model)
>>> state_dict["mask_head.conv_cls.weight"].shape
(3, 256, 3, 3)
>>> infer_config(state_dict)["architecture"]
'solov2_light_r18'
"""

import pickle
import re
from pathlib import Path

import numpy as np

_STAGE_KEY = re.compile(r"^backbone\.layer(\d)\.(\d+)\.")
_STACKED_KEY = re.compile(r"^mask_head\.(kernel|cls)_convs\.(\d+)\.")
_BLOCKS = {
    # (bottleneck?, blocks per stage) -> backbone name
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
}
# Constructor arguments that the weights determine (the rest is training or
# test-time configuration).
SHAPE_FIELDS = (
    "backbone", "fpn_channels", "feat_channels", "stacked_convs",
    "mask_feat_channels", "mask_out_channels",
)


# --------------------------------------------------------------------- reading
def load_checkpoint(path):
    """Reads an mmdetection checkpoint without executing any pickled code.

    Uses `torch.load(path, map_location="cpu", weights_only=True)`. Python
    objects in the checkpoint's `meta` that the safe unpickler does not know
    (numpy scalars, mmengine log buffers, ...) become inert placeholders: they
    are never called, and the tensors are unaffected. torch is the `convert`
    extra (`pip install 'keras-solov2[convert]'`).

    Args:
        path: a `.pth` file: `{"meta": ..., "state_dict": ...}` (mmdet's
            released checkpoints) or a bare state dict.

    Returns:
        `(state_dict, meta)`: `{name: np.ndarray}` in torch layouts, and the
        `meta` dict (`{}` when absent).

    Raises:
        FileNotFoundError: no such file.
        ImportError: torch is not installed.
        ValueError: the file is truncated, corrupt or not a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist.")
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"Reading {path.name} needs PyTorch (CPU is enough): "
            "pip install 'keras-solov2[convert]' (or pip install torch). Without torch, "
            "pass a dict of numpy arrays to keras_solov2.convert.convert()."
        ) from None
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "Unsupported global" not in str(e):
                raise
            obj = _load_with_placeholders(torch, path)
    except Exception as e:
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt? "
            f"{path.stat().st_size:,} bytes): {type(e).__name__}: {_first_line(e)}"
        ) from e
    meta = obj.get("meta", {}) if isinstance(obj, dict) else {}
    return to_numpy_state_dict(obj, source=str(path)), meta if isinstance(meta, dict) else {}


def load_state_dict(path):
    """`load_checkpoint(path)[0]`: a checkpoint's tensors as numpy arrays."""
    return load_checkpoint(path)[0]


def _first_line(e):
    text = str(e)
    # torch's safe unpickler leads with advice to retry with weights_only=False
    # (arbitrary code execution): report its actual finding instead.
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


class _Placeholder:
    """Stands in for a pickled global the safe unpickler does not allow."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _load_with_placeholders(torch, path):
    from torch import serialization

    if not hasattr(serialization, "get_unsafe_globals_in_checkpoint"):  # torch < 2.5
        raise pickle.UnpicklingError(
            "the checkpoint holds Python objects besides tensors, which this torch "
            "version cannot skip safely; upgrade torch (>= 2.5) or re-save the state dict alone"
        )
    names = serialization.get_unsafe_globals_in_checkpoint(str(path))
    stubs = [(type(name.rsplit(".", 1)[-1], (_Placeholder,), {}), name) for name in names]
    with serialization.safe_globals(stubs):
        return torch.load(str(path), map_location="cpu", weights_only=True)


def to_numpy_state_dict(obj, source="state dict"):
    """A `{name: np.ndarray}` state dict from a checkpoint object.

    Accepts `{"state_dict": {...}, "meta": ...}`, a bare `{name: tensor}`
    dict, and numpy or torch values (bfloat16 tensors become float32). A
    `module.` prefix (DataParallel) is removed.
    """
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{source}: expected a state dict (name -> tensor), got {type(obj).__name__}.")
    out = {}
    for k, v in obj.items():
        if hasattr(v, "detach"):  # torch.Tensor
            v = v.detach().cpu()
            try:
                v = v.numpy()
            except TypeError:  # bfloat16 / float8: no numpy dtype
                v = v.float().numpy()
        if not isinstance(v, (np.ndarray, np.generic, int, float)):
            raise ValueError(f"{source}: {k!r} is a {type(v).__name__}, not a tensor.")
        out[str(k)] = np.asarray(v)
    if all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


def class_names_from_meta(meta, num_classes):
    """Class names stored by mmdet (3.x `dataset_meta.classes`, 2.x `CLASSES`), if any."""
    names = None
    if isinstance(meta.get("dataset_meta"), dict):
        names = meta["dataset_meta"].get("classes")
    if names is None:
        names = meta.get("CLASSES")
    if isinstance(names, (list, tuple)) and len(names) == num_classes and all(isinstance(n, str) for n in names):
        return list(names)
    return None


# ---------------------------------------------------------- architecture
def infer_config(state_dict, norm_groups=32):
    """The architecture of an mmdet SOLOv2 state dict, read off its shapes.

    Args:
        state_dict: `{name: array}` in mmdet's keys and torch layouts.
        norm_groups: GroupNorm groups of the head and mask branch. They
            leave no trace in the tensors: mmdet's configs use 32.

    Returns:
        A dict: `backbone` (`"resnet18" | "resnet34" | "resnet50" |
        "resnet101"`: block type and depth family), `stage_blocks` (blocks per
        stage, e.g. `[3, 4, 6, 3]`), `num_classes`, `fpn_channels`,
        `feat_channels`, `stacked_convs`, `mask_feat_channels`,
        `mask_out_channels` (E), `norm_groups`, and `architecture`: the name
        in `keras_solov2.models.ARCHITECTURES` with exactly these shapes, or
        `None` (e.g. for the tiny test models).

    Raises:
        ValueError: not an mmdet ResNet SOLOv2 checkpoint, a variant this
            model cannot express (DCN, ResNet-D stem, dynamic kernels larger
            than 1×1), or channels not divisible by `norm_groups`.
    """
    from keras_solov2.models.architectures import ARCHITECTURES

    sd = state_dict
    dcn = sorted(k for k in sd if "conv_offset" in k or ".dcn." in k)
    if dcn:
        raise ValueError(
            f"This checkpoint uses deformable convolutions ({len(dcn)} tensors such as {dcn[0]!r}): "
            "SOLOv2 DCN variants are out of scope (Keras has no deformable convolution)."
        )
    if any(k.startswith("backbone.stem.") for k in sd):
        raise ValueError("This checkpoint has a ResNet-D deep stem (backbone.stem.*), which is not supported.")
    required = [
        "backbone.conv1.weight", "backbone.layer1.0.conv1.weight",
        "neck.lateral_convs.0.conv.weight", "mask_head.conv_cls.weight", "mask_head.conv_kernel.weight",
        "mask_head.mask_feature_head.convs_all_levels.0.conv0.conv.weight",
        "mask_head.mask_feature_head.conv_pred.conv.weight",
    ]
    absent = [k for k in required if k not in sd]
    if absent:
        raise ValueError(
            f"Not an mmdetection ResNet-FPN SOLOv2 state dict: no {absent}. "
            f"First keys: {sorted(sd)[:5]}"
        )
    blocks = [0, 0, 0, 0]
    for k in sd:
        m = _STAGE_KEY.match(k)
        if m and 1 <= int(m.group(1)) <= 4:
            s = int(m.group(1)) - 1
            blocks[s] = max(blocks[s], int(m.group(2)) + 1)
    if not all(blocks):
        raise ValueError(f"backbone.layer1..4 incomplete (blocks per stage {blocks}).")
    bottleneck = "backbone.layer1.0.conv3.weight" in sd
    backbone = _BLOCKS.get((bottleneck, tuple(blocks)), "resnet50" if bottleneck else "resnet18")

    stacked = {"kernel": set(), "cls": set()}
    for k in sd:
        m = _STACKED_KEY.match(k)
        if m:
            stacked[m.group(1)].add(int(m.group(2)))
    if stacked["kernel"] != stacked["cls"] or stacked["kernel"] != set(range(len(stacked["kernel"]))):
        raise ValueError(
            f"kernel_convs {sorted(stacked['kernel'])} and cls_convs {sorted(stacked['cls'])} "
            "must be the same consecutive indices."
        )
    conv_kernel = sd["mask_head.conv_kernel.weight"].shape
    conv_pred = sd["mask_head.mask_feature_head.conv_pred.conv.weight"].shape
    if conv_kernel[0] != conv_pred[0]:
        raise ValueError(
            f"conv_kernel predicts {conv_kernel[0]} weights per cell but the mask features have "
            f"{conv_pred[0]} channels: dynamic kernels larger than 1x1 are not supported."
        )
    config = dict(
        backbone=backbone,
        stage_blocks=blocks,
        num_classes=int(sd["mask_head.conv_cls.weight"].shape[0]),
        fpn_channels=int(sd["neck.lateral_convs.0.conv.weight"].shape[0]),
        feat_channels=int(sd["mask_head.conv_cls.weight"].shape[1]),
        stacked_convs=len(stacked["kernel"]),
        mask_feat_channels=int(sd["mask_head.mask_feature_head.convs_all_levels.0.conv0.conv.weight"].shape[0]),
        mask_out_channels=int(conv_kernel[0]),
        norm_groups=int(norm_groups),
    )
    gn_channels = {config["mask_feat_channels"], config["mask_out_channels"]}
    if config["stacked_convs"]:
        gn_channels.add(config["feat_channels"])
    bad = sorted(c for c in gn_channels if c % config["norm_groups"])
    if bad:
        raise ValueError(f"GroupNorm with {norm_groups} groups cannot normalise {bad} channels; pass norm_groups=.")
    config["architecture"] = None
    from keras_solov2.models.backbone import RESNET_ARCHS

    if blocks == RESNET_ARCHS[backbone][1]:
        for name, arch in ARCHITECTURES.items():
            if all(arch[f] == config[f] for f in SHAPE_FIELDS):
                config["architecture"] = name
                break
    return config


def build_model(config, **overrides):
    """A randomly initialised `SOLOv2` of an `infer_config` result.

    A recognised architecture starts from its full `ARCHITECTURES` entry (so
    light models keep their training `scale_ranges`); otherwise the inferred
    shapes are used with the standard head settings. `overrides` win.
    """
    from keras_solov2.models.architectures import ARCHITECTURES
    from keras_solov2.models.backbone import RESNET_ARCHS, build_resnet_backbone
    from keras_solov2.models.solov2 import SOLOv2

    config = dict(config)
    arch = config.pop("architecture", None)
    blocks = config.pop("stage_blocks")
    kwargs = dict(ARCHITECTURES[arch]) if arch else {}
    kwargs.update(config)
    if blocks != RESNET_ARCHS[config["backbone"]][1]:
        kwargs["backbone"] = build_resnet_backbone(config["backbone"], stackwise_num_blocks=blocks)
    kwargs.update(overrides)
    return SOLOv2(**kwargs)


# ---------------------------------------------------------- weight mapping
def weight_map(model):
    """Every Keras variable of `model` with its mmdet key, in mmdet's order.

    Returns:
        A list of `(mmdet key, keras variable, kind)` with kind `"conv"`
        (`(kh, kw, I, O)` ↔ `(O, I, kh, kw)`), `"vector"` or `"bn_counter"`
        (mmdet's `num_batches_tracked`; its variable is `None`).

    Raises:
        ValueError: the model's backbone is not keras-hub's `ResNetBackbone`
            as built by `keras_solov2.models.backbone.build_resnet_backbone`.
    """
    pairs = []

    def conv(key, layer, bias=False):
        pairs.append((f"{key}.weight", layer.kernel, "conv"))
        if bias:
            pairs.append((f"{key}.bias", layer.bias, "vector"))

    def bn(key, layer):
        for suffix, var in (("weight", layer.gamma), ("bias", layer.beta),
                            ("running_mean", layer.moving_mean), ("running_var", layer.moving_variance)):
            pairs.append((f"{key}.{suffix}", var, "vector"))
        pairs.append((f"{key}.num_batches_tracked", None, "bn_counter"))

    def conv_gn(key, block):
        conv(f"{key}.conv", block.conv)
        pairs.append((f"{key}.gn.weight", block.gn.gamma, "vector"))
        pairs.append((f"{key}.gn.bias", block.gn.beta, "vector"))

    bb = model.backbone
    names = {layer.name for layer in getattr(bb, "layers", [])}
    if "conv1_conv" not in names or not hasattr(bb, "stackwise_num_blocks"):
        raise ValueError(
            f"The converter maps mmdet's ResNet onto keras-hub's ResNetBackbone; {bb.name!r} "
            "is not one (no conv1_conv layer)."
        )
    conv("backbone.conv1", bb.get_layer("conv1_conv"))
    bn("backbone.bn1", bb.get_layer("conv1_bn"))
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
    for i, block in enumerate(head.cls_convs):
        conv_gn(f"mask_head.cls_convs.{i}", block)
    for i, block in enumerate(head.kernel_convs):
        conv_gn(f"mask_head.kernel_convs.{i}", block)
    conv("mask_head.conv_cls", head.conv_cls, bias=True)
    conv("mask_head.conv_kernel", head.conv_kernel, bias=True)
    mfh = model.mask_feature_head
    for level, convs in enumerate(mfh.convs_all_levels):
        for j, block in enumerate(convs):
            conv_gn(f"mask_head.mask_feature_head.convs_all_levels.{level}.conv{j}", block)
    conv_gn("mask_head.mask_feature_head.conv_pred", mfh.conv_pred)
    return pairs


def _listing(title, items, limit=40):
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}):\n    " + "\n    ".join(items[:limit]) + more


def load_into_model(model, state_dict):
    """Assigns every tensor of an mmdet state dict to `model`'s variables.

    Checks everything before assigning anything: a mismatch leaves `model`
    untouched.

    Args:
        model: a built `SOLOv2` with a keras-hub ResNet backbone.
        state_dict: `{mmdet key: array}` in torch layouts;
            `num_batches_tracked` entries are ignored.

    Returns:
        `model`.

    Raises:
        ValueError: listing the checkpoint tensors the model has no place for,
            the model weights the checkpoint lacks, and shape mismatches
            (in torch layout on both sides).
    """
    pairs = [(k, v, kind) for k, v, kind in weight_map(model) if kind != "bn_counter"]
    tensors = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
    mapped = {k for k, _, _ in pairs}
    missing = sorted(mapped - set(tensors))
    unmapped = sorted(set(tensors) - mapped)
    wrong, values = [], []
    for key, var, kind in pairs:
        if key not in tensors:
            continue
        value = np.asarray(tensors[key])
        if kind == "conv" and value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        if tuple(value.shape) != tuple(var.shape):
            expected = tuple(var.shape)
            if kind == "conv" and len(expected) == 4:
                expected = (expected[3], expected[2], expected[0], expected[1])
            wrong.append(f"{key}: checkpoint {tuple(tensors[key].shape)} vs model {expected}")
        elif not np.issubdtype(value.dtype, np.floating):
            wrong.append(f"{key}: dtype {value.dtype} is not floating point")
        values.append((var, value))
    if missing or unmapped or wrong:
        parts = []
        if missing:
            parts.append(_listing("missing from the checkpoint", missing))
        if unmapped:
            parts.append(_listing("in the checkpoint but not in the model", unmapped))
        if wrong:
            parts.append(_listing("shape mismatches", wrong))
        raise ValueError("The checkpoint does not match the model:\n  " + "\n  ".join(parts))
    for var, value in values:
        var.assign(value.astype(var.dtype))
    return model


def model_to_state_dict(model, num_batches_tracked=True):
    """The inverse of `load_into_model`: an mmdet-keyed state dict of numpy arrays.

    Args:
        model: a `SOLOv2` with a keras-hub ResNet backbone.
        num_batches_tracked: include mmdet's BN counters (int64 zeros, shape
            `()`), so that the key set equals `model.state_dict()` of mmdet's
            model and loads with `strict=True`.

    Returns:
        `{key: np.ndarray}` in mmdet's key order and torch layouts; conv
        weights `(O, I, kh, kw)`. Values are copies of the Keras variables,
        bit for bit.
    """
    import keras

    out = {}
    for key, var, kind in weight_map(model):
        if kind == "bn_counter":
            if num_batches_tracked:
                out[key] = np.zeros((), np.int64)
            continue
        value = np.array(keras.ops.convert_to_numpy(var))
        out[key] = value.transpose(3, 2, 0, 1) if kind == "conv" else value
    return out


def convert(checkpoint, architecture=None, norm_groups=None, class_names=None, **overrides):
    """A Keras `SOLOv2` holding an mmdetection SOLOv2 checkpoint's weights.

    Args:
        checkpoint: path of a `.pth` file, or an already loaded state dict
            (`{name: np.ndarray | torch.Tensor}`, optionally wrapped in
            `{"state_dict": ...}`).
        architecture: optional name in `keras_solov2.models.ARCHITECTURES`;
            the checkpoint must then have exactly its shapes. By default the
            architecture is inferred (`infer_config`).
        norm_groups: GroupNorm groups (default 32, mmdet's; not inferable).
        class_names: optional `num_classes` names; by default those stored in
            the checkpoint's `meta`, if any.
        **overrides: any other `SOLOv2` argument (test_cfg such as
            `score_thr`, `max_candidates`, ...).

    Returns:
        A `SOLOv2` whose forward pass equals mmdet's for the same weights.

    Raises:
        ValueError: unreadable file, unsupported variant, or a checkpoint that
            does not match the architecture (every offending tensor listed).
    """
    meta = {}
    if isinstance(checkpoint, dict):
        sd = to_numpy_state_dict(checkpoint)
        if isinstance(checkpoint.get("meta"), dict):
            meta = checkpoint["meta"]
    else:
        sd, meta = load_checkpoint(checkpoint)
    config = infer_config(sd, norm_groups=32 if norm_groups is None else norm_groups)
    if architecture is not None:
        from keras_solov2.models.architectures import ARCHITECTURES

        if architecture not in ARCHITECTURES:
            raise ValueError(f"Unknown architecture {architecture!r}; expected one of {sorted(ARCHITECTURES)}.")
        expected = dict(ARCHITECTURES[architecture])
        diff = [f"{f}: checkpoint {config[f]!r} vs {architecture} {expected[f]!r}"
                for f in SHAPE_FIELDS if config[f] != expected[f]]
        from keras_solov2.models.backbone import RESNET_ARCHS

        standard = RESNET_ARCHS[expected["backbone"]][1]
        if config["stage_blocks"] != standard:
            diff.append(f"blocks per stage: checkpoint {config['stage_blocks']} vs {architecture} {standard}")
        if diff:
            raise ValueError(f"The checkpoint is not a {architecture}:\n  " + "\n  ".join(diff))
        config["architecture"] = architecture
    if class_names is None:
        class_names = class_names_from_meta(meta, config["num_classes"])
    model = build_model(config, class_names=class_names, **overrides)
    return load_into_model(model, sd)
