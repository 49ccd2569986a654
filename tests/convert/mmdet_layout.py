"""mmdetection 3.3's SOLOv2 state-dict layout, transcribed from its modules.

Written from mmdet's `ResNet` (BasicBlock / Bottleneck, `style='pytorch'`),
`FPN` (`start_level=0`, `num_outs=5`, no extra convs) and `SOLOV2Head` /
`MaskFeatModule` definitions, independently of the converter, so that tests
can produce checkpoints of any architecture with mmdet's exact keys, order
and shapes. `test_layout_matches_r50_keys_file` checks it against the real
R50 key list.
"""

import numpy as np

DEPTHS = {18: (False, [2, 2, 2, 2]), 34: (False, [3, 4, 6, 3]), 50: (True, [3, 4, 6, 3]), 101: (True, [3, 4, 23, 3])}


def solov2_layout(depth=50, stage_blocks=None, num_classes=80, fpn_channels=256, feat_channels=512,
                  stacked_convs=4, mask_feat_channels=128, mask_out_channels=256):
    """`[(key, shape, dtype)]` of mmdet's `SOLOv2.state_dict()`, in order."""
    rows = []

    def conv(key, out_c, in_c, k, bias=False):
        rows.append((f"{key}.weight", (out_c, in_c, k, k), "float32"))
        if bias:
            rows.append((f"{key}.bias", (out_c,), "float32"))

    def bn(key, c):
        for s in ("weight", "bias", "running_mean", "running_var"):
            rows.append((f"{key}.{s}", (c,), "float32"))
        rows.append((f"{key}.num_batches_tracked", (), "int64"))

    def gn(key, c):
        rows.append((f"{key}.weight", (c,), "float32"))
        rows.append((f"{key}.bias", (c,), "float32"))

    bottleneck, blocks = DEPTHS[depth]
    blocks = stage_blocks or blocks
    expansion = 4 if bottleneck else 1
    conv("backbone.conv1", 64, 3, 7)
    bn("backbone.bn1", 64)
    inplanes, stage_out = 64, []
    for i, (n, planes) in enumerate(zip(blocks, [64, 128, 256, 512])):
        stride = 1 if i == 0 else 2
        for j in range(n):
            p = f"backbone.layer{i + 1}.{j}"
            if bottleneck:
                conv(f"{p}.conv1", planes, inplanes, 1)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1)
                bn(f"{p}.bn3", planes * 4)
            else:
                conv(f"{p}.conv1", planes, inplanes, 3)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
            if j == 0 and (stride != 1 or inplanes != planes * expansion):
                conv(f"{p}.downsample.0", planes * expansion, inplanes, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
        stage_out.append(inplanes)
    for i, c in enumerate(stage_out):
        conv(f"neck.lateral_convs.{i}.conv", fpn_channels, c, 1, bias=True)
    for i in range(4):
        conv(f"neck.fpn_convs.{i}.conv", fpn_channels, fpn_channels, 3, bias=True)
    for i in range(stacked_convs):
        conv(f"mask_head.cls_convs.{i}.conv", feat_channels, fpn_channels if i == 0 else feat_channels, 3)
        gn(f"mask_head.cls_convs.{i}.gn", feat_channels)
    for i in range(stacked_convs):
        conv(f"mask_head.kernel_convs.{i}.conv", feat_channels, fpn_channels + 2 if i == 0 else feat_channels, 3)
        gn(f"mask_head.kernel_convs.{i}.gn", feat_channels)
    conv("mask_head.conv_cls", num_classes, feat_channels, 3, bias=True)
    conv("mask_head.conv_kernel", mask_out_channels, feat_channels, 3, bias=True)
    mfh = "mask_head.mask_feature_head"
    for level in range(4):
        for j in range(max(level, 1)):
            in_c = mask_feat_channels if j else (fpn_channels + 2 if level == 3 else fpn_channels)
            conv(f"{mfh}.convs_all_levels.{level}.conv{j}.conv", mask_feat_channels, in_c, 3)
            gn(f"{mfh}.convs_all_levels.{level}.conv{j}.gn", mask_feat_channels)
    conv(f"{mfh}.conv_pred.conv", mask_out_channels, mask_feat_channels, 1)
    gn(f"{mfh}.conv_pred.gn", mask_out_channels)
    return rows


def random_state_dict(rows, seed=0):
    """Distinct random values for every float tensor (variances positive), int64 zeros otherwise."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape, dtype in rows:
        if dtype != "float32":
            sd[key] = np.zeros(shape, np.int64)
        elif key.endswith("running_var"):
            sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            sd[key] = rng.standard_normal(shape).astype(np.float32)
    return sd


def read_keys_file(path):
    """`[(key, shape, dtype)]` of `solov2_r50_state_dict_keys.txt`."""
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype, _ = line.split("\t")
        dims = shape.strip("()").replace(" ", "")
        rows.append((key, tuple(int(d) for d in dims.split(",") if d), dtype))
    return rows
