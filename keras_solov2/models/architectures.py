"""Named SOLOv2 architectures, as mmdetection 3.3's `configs/solov2/` files.

Each entry is the `SOLOv2` keyword arguments of one mmdet config family:
`solov2_r50_fpn_*` / `solov2_r101_fpn_*` (standard) and
`solov2-light_r{18,34,50}_fpn_*` (light: 2 stacked convs of 256 channels,
E = 128, smaller scale ranges).
"""

STANDARD_HEAD = dict(
    num_grids=[40, 36, 24, 16, 12],
    scale_ranges=[[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]],
    strides=[8, 8, 16, 32, 32],
    pos_scale=0.2,
    fpn_channels=256,
    feat_channels=512,
    stacked_convs=4,
    mask_feat_channels=128,
    mask_out_channels=256,
    norm_groups=32,
)

LIGHT_HEAD = dict(
    STANDARD_HEAD,
    feat_channels=256,
    stacked_convs=2,
    mask_out_channels=128,
    scale_ranges=[[1, 56], [28, 112], [56, 224], [112, 448], [224, 896]],
)

ARCHITECTURES = {
    "solov2_r50": dict(STANDARD_HEAD, backbone="resnet50"),
    "solov2_r101": dict(STANDARD_HEAD, backbone="resnet101"),
    "solov2_light_r18": dict(LIGHT_HEAD, backbone="resnet18"),
    "solov2_light_r34": dict(LIGHT_HEAD, backbone="resnet34"),
    "solov2_light_r50": dict(LIGHT_HEAD, backbone="resnet50"),
}
