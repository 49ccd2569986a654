"""The mmdet → Keras converter, proven against mmdetection's own forward pass.

Oracles: `../shared/fixtures/mmdet/tiny/` (two tiny mmdet SOLOv2 models with
mmdet's activations and predictions), the real R50 key list, an independent
transcription of mmdet's state-dict layout (`mmdet_layout.py`) and a plain
`torch.nn.functional` ResNet for multi-block stages, which the tiny models
(one block per stage) do not exercise.
"""

import json
import pickle
import sys

import numpy as np
import pytest

import keras_solov2  # noqa: F401
from keras_solov2 import SOLOv2
from keras_solov2.cli import main as cli_main
from keras_solov2.convert import (
    convert,
    convert_main,
    infer_config,
    load_checkpoint,
    load_into_model,
    load_state_dict,
    model_to_state_dict,
)
from keras_solov2.models.architectures import ARCHITECTURES
from tests.convert.mmdet_layout import random_state_dict, read_keys_file, solov2_layout
from tests.optional import import_or_skip

MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])
TOL = 1e-4  # max abs, every activation
STAGES = (
    [f"backbone_c{i}" for i in range(2, 6)] + [f"fpn_p{i}" for i in range(2, 7)]
    + [f"kernel_preds_l{i}" for i in range(5)] + [f"cls_preds_l{i}" for i in range(5)] + ["mask_feats"]
)


def tiny_fixture(fixtures_dir, name):
    """`(npz, state dict)` of a tiny mmdet model."""
    z = np.load(fixtures_dir / "tiny" / f"solov2_tiny_{name}_forward.npz")
    sd = {k[len("state_dict/"):]: z[k] for k in z.files if k.startswith("state_dict/")}
    return z, sd


def fixture_image(z):
    """The fixture's BGR CHW uint8 image as the model's RGB NHWC float batch."""
    return z["input_uint8_bgr_chw"][::-1].transpose(1, 2, 0)[None].astype("float32")


def _nchw(t):
    return np.asarray(t).transpose(0, 3, 1, 2)


def stage_diffs(model, z):
    """Max abs difference to mmdet's activation at every stage (`STAGES`)."""
    image = fixture_image(z)
    normalised = ((image - MEAN) / STD).astype("float32")
    np.testing.assert_allclose(_nchw(normalised), z["input_normalized_rgb_nchw"], atol=1e-6)
    ours = {}
    feats = model.feature_extractor(normalised)
    ours.update({f"backbone_c{i + 2}": f for i, f in enumerate(feats)})
    ours.update({f"fpn_p{i + 2}": p for i, p in enumerate(model.neck(feats))})
    out = model(image)
    for lvl in range(5):
        ours[f"kernel_preds_l{lvl}"] = out["kernels"][lvl]
        ours[f"cls_preds_l{lvl}"] = out["cls_logits"][lvl]
    ours["mask_feats"] = out["mask_features"]
    diffs = {}
    for k in STAGES:
        assert _nchw(ours[k]).shape == z[k].shape, k
        diffs[k] = float(np.abs(_nchw(ours[k]) - z[k]).max())
    return diffs, out


@pytest.mark.parametrize("name", ["r18", "r50"])
def test_tiny_models_reproduce_mmdet_forward_and_predictions(fixtures_dir, name):
    z, sd = tiny_fixture(fixtures_dir, name)
    meta = json.loads(str(z["meta_json"]))
    assert meta["stage_blocks"] == [1, 1, 1, 1]
    model = convert(sd, norm_groups=8, max_candidates=5000)
    assert (model.num_classes, model.stacked_convs, model.mask_out_channels, model.fpn_channels) == (3, 2, 32, 32)
    diffs, out = stage_diffs(model, z)
    too_far = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not too_far, f"stages beyond {TOL}: {too_far}"

    res = model.postprocess(out, [(128, 160)], [(128, 160)])[0]
    np.testing.assert_array_equal(np.asarray(res["labels"]), z["pred_labels"])
    np.testing.assert_allclose(np.asarray(res["scores"]), z["pred_scores"], rtol=0, atol=1e-4)
    masks = np.asarray(res["masks"]).astype(bool)
    assert masks.shape == z["pred_masks"].shape
    for a, b in zip(masks, z["pred_masks"]):
        assert (a & b).sum() / (a | b).sum() > 0.99


@pytest.mark.parametrize("name", ["r18", "r50"])
def test_bfloat16_inference_stays_close_to_mmdet(fixtures_dir, name, tmp_path):
    """The bfloat16 inference path (`dtype="mixed_bfloat16"`): same detections
    as mmdet's float32 model, scores within 2e-3, masks IoU > 0.99."""
    z, sd = tiny_fixture(fixtures_dir, name)
    model = convert(sd, norm_groups=8, max_candidates=5000, dtype="mixed_bfloat16")
    model.save_to_preset(tmp_path / "bf16")
    model = SOLOv2.from_preset(tmp_path / "bf16")
    assert model.backbone.compute_dtype == "bfloat16" and model.dynamic_conv.compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in model.weights)
    out = model(fixture_image(z))
    assert out["cls_logits"][0].dtype == "bfloat16"
    res = model.postprocess(out, [(128, 160)], [(128, 160)])[0]
    np.testing.assert_array_equal(np.asarray(res["labels"]), z["pred_labels"])
    np.testing.assert_allclose(np.asarray(res["scores"]), z["pred_scores"], rtol=0, atol=2e-3)
    for a, b in zip(np.asarray(res["masks"]).astype(bool), z["pred_masks"]):
        assert (a & b).sum() / (a | b).sum() > 0.99
    # And the float32 model, loaded from the same preset with another policy, is exact again.
    exact = SOLOv2.from_preset(tmp_path / "bf16", dtype="float32")
    assert exact.backbone.compute_dtype == "float32"
    diffs, _ = stage_diffs(exact, z)
    assert max(diffs.values()) <= TOL


def test_layout_matches_r50_keys_file(fixtures_dir):
    """The independent layout transcription reproduces mmdet's real R50 key list exactly."""
    rows = read_keys_file(fixtures_dir / "solov2_r50_state_dict_keys.txt")
    assert len(rows) == 386
    assert solov2_layout(50) == rows


def test_tiny_fixture_layouts_match_transcription(fixtures_dir):
    for name, depth in (("r18", 18), ("r50", 50)):
        _, sd = tiny_fixture(fixtures_dir, name)
        rows = solov2_layout(depth, stage_blocks=[1, 1, 1, 1], num_classes=3, fpn_channels=32, feat_channels=32,
                             stacked_convs=2, mask_feat_channels=16, mask_out_channels=32)
        assert {k: tuple(v.shape) for k, v in sd.items()} == {k: s for k, s, _ in rows}


def test_r50_checkpoint_layout_round_trips_bit_identical(fixtures_dir):
    """Random values under the real R50 keys: every tensor lands in one weight and comes back unchanged."""
    rows = read_keys_file(fixtures_dir / "solov2_r50_state_dict_keys.txt")
    sd = random_state_dict(rows, seed=0)
    model = convert({"meta": {}, "state_dict": sd})
    assert infer_config(sd)["architecture"] == "solov2_r50"
    assert model.count_params() == 46_592_912 + 2 * sum(s[0] for k, s, _ in rows if k.endswith("running_mean"))
    back = model_to_state_dict(model)
    assert list(back) == [k for k, _, _ in rows]  # mmdet's keys, in mmdet's order
    for key, shape, dtype in rows:
        assert back[key].shape == shape and back[key].dtype == np.dtype(dtype), key
        assert back[key].tobytes() == sd[key].tobytes(), key
    # Values are distinct per tensor, so a swapped pair would have shown above;
    # spot-check the layout transform on one conv.
    kernel = np.asarray(model.instance_head.conv_kernel.kernel)
    np.testing.assert_array_equal(kernel[1, 2, 5, 7], sd["mask_head.conv_kernel.weight"][7, 5, 1, 2])


@pytest.mark.parametrize("architecture", ["solov2_light_r18", "solov2_light_r34", "solov2_light_r50", "solov2_r101"])
def test_every_preset_architecture_is_inferred_and_round_trips(architecture):
    a = ARCHITECTURES[architecture]
    depth = int(a["backbone"].removeprefix("resnet"))
    rows = solov2_layout(depth, fpn_channels=a["fpn_channels"], feat_channels=a["feat_channels"],
                         stacked_convs=a["stacked_convs"], mask_feat_channels=a["mask_feat_channels"],
                         mask_out_channels=a["mask_out_channels"])
    sd = random_state_dict(rows, seed=1)
    config = infer_config(sd)
    assert config["architecture"] == architecture
    model = convert(sd, architecture=architecture)
    assert model.scale_ranges == a["scale_ranges"] and model.norm_groups == 32
    back = model_to_state_dict(model)
    assert list(back) == [k for k, _, _ in rows]
    assert all(back[k].tobytes() == sd[k].tobytes() for k in sd)


def _torch_resnet(torch, sd, x, bottleneck, blocks):
    """mmdet's ResNet (style='pytorch', eval mode) in plain torch.nn.functional."""
    F = torch.nn.functional

    def t(k):
        return torch.from_numpy(sd[k])

    def bn(y, k):
        return F.batch_norm(y, t(f"{k}.running_mean"), t(f"{k}.running_var"), t(f"{k}.weight"), t(f"{k}.bias"),
                            False, 0.0, 1e-5)

    def conv(y, k, stride=1):
        w = t(f"{k}.weight")
        return F.conv2d(y, w, stride=stride, padding=w.shape[-1] // 2)

    x = F.relu(bn(F.conv2d(x, t("backbone.conv1.weight"), stride=2, padding=3), "backbone.bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    outs = []
    for i, n in enumerate(blocks):
        for j in range(n):
            p, stride = f"backbone.layer{i + 1}.{j}", 2 if i > 0 and j == 0 else 1
            if bottleneck:
                y = F.relu(bn(conv(x, f"{p}.conv1"), f"{p}.bn1"))
                y = F.relu(bn(conv(y, f"{p}.conv2", stride), f"{p}.bn2"))
                y = bn(conv(y, f"{p}.conv3"), f"{p}.bn3")
            else:
                y = F.relu(bn(conv(x, f"{p}.conv1", stride), f"{p}.bn1"))
                y = bn(conv(y, f"{p}.conv2"), f"{p}.bn2")
            shortcut = x
            if f"{p}.downsample.0.weight" in sd:
                shortcut = bn(conv(x, f"{p}.downsample.0", stride), f"{p}.downsample.1")
            x = F.relu(y + shortcut)
        outs.append(x.numpy())
    return outs


@pytest.mark.parametrize("depth", [18, 50])
def test_multi_block_stages_match_a_torch_resnet(depth):
    """Blocks after the first (identity shortcuts) map correctly: 2 blocks per stage vs plain torch."""
    torch = import_or_skip("torch", "pip install 'keras-solov2[convert]'")
    bottleneck, blocks = depth >= 50, [2, 2, 2, 2]
    rows = solov2_layout(depth, stage_blocks=blocks, num_classes=3, fpn_channels=32, feat_channels=32,
                         stacked_convs=1, mask_feat_channels=16, mask_out_channels=16)
    sd = random_state_dict(rows, seed=2)
    rng = np.random.default_rng(3)
    for k, shape, _ in rows:  # He-scaled convs and mild BN so activations stay O(1) through the stages
        if len(shape) == 4:
            sd[k] = (sd[k] * np.sqrt(1.0 / np.prod(shape[1:]))).astype(np.float32)
        elif k.endswith(".weight") and "bn" in k or "downsample.1.weight" in k:
            sd[k] = rng.uniform(0.5, 1.0, shape).astype(np.float32)
        elif k.endswith((".bias", "running_mean")) and k.startswith("backbone"):
            sd[k] = (0.1 * sd[k]).astype(np.float32)
    model = convert(sd, norm_groups=8)
    image = np.random.default_rng(4).uniform(-2, 2, (1, 64, 96, 3)).astype(np.float32)
    ours = model.feature_extractor(image)
    ref = _torch_resnet(torch, sd, torch.from_numpy(image.transpose(0, 3, 1, 2).copy()), bottleneck, blocks)
    for i, (a, b) in enumerate(zip(ours, ref)):
        a = _nchw(a)
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(b).max()), f"C{i + 2}"


def test_mismatches_are_listed_and_nothing_is_assigned(fixtures_dir):
    _, sd = tiny_fixture(fixtures_dir, "r18")
    model = convert(sd, norm_groups=8)
    before = model.neck.fpn_convs[1].kernel.numpy()
    bad = dict(sd)
    del bad["neck.fpn_convs.0.conv.bias"]
    bad["extra.weight"] = np.zeros(3, np.float32)
    bad["mask_head.conv_cls.bias"] = np.zeros(4, np.float32)
    bad["neck.fpn_convs.1.conv.weight"] = np.zeros((32, 32, 3, 3), np.float32)
    bad["mask_head.conv_kernel.weight"] = np.zeros((32, 32, 1, 3), np.float32)
    with pytest.raises(ValueError) as err:
        load_into_model(model, bad)
    text = str(err.value)
    assert "missing from the checkpoint (1):\n    neck.fpn_convs.0.conv.bias" in text
    assert "in the checkpoint but not in the model (1):\n    extra.weight" in text
    assert "mask_head.conv_cls.bias: checkpoint (4,) vs model (3,)" in text
    assert "mask_head.conv_kernel.weight: checkpoint (32, 32, 1, 3) vs model (32, 32, 3, 3)" in text
    np.testing.assert_array_equal(np.asarray(model.neck.fpn_convs[1].kernel), before)


def test_unsupported_or_inconsistent_checkpoints_fail_clearly(fixtures_dir):
    _, sd = tiny_fixture(fixtures_dir, "r50")
    with pytest.raises(ValueError, match="deformable convolutions"):
        convert(dict(sd, **{"backbone.layer4.0.conv2.conv_offset.weight": np.zeros((18, 512, 3, 3), np.float32)}))
    with pytest.raises(ValueError, match=r"GroupNorm with 12 groups cannot normalise \[16, 32\] channels"):
        convert(sd, norm_groups=12)
    with pytest.raises(ValueError, match="not a solov2_light_r50:\n  fpn_channels: checkpoint 32 vs solov2_light_r50 256"):
        convert(sd, norm_groups=8, architecture="solov2_light_r50")
    with pytest.raises(ValueError, match="Not an mmdetection ResNet-FPN SOLOv2 state dict"):
        convert({"conv.weight": np.zeros((1, 1, 1, 1), np.float32)})


def _torch_state_dict(torch, sd):
    return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}


class _NotATensor:
    """A stand-in for objects such as mmengine's HistoryBuffer in a checkpoint's meta."""

    def __init__(self):
        self.history = [1.0, 2.0]


def test_pth_files_load_safely_and_corrupt_ones_fail_clearly(fixtures_dir, tmp_path):
    torch = import_or_skip("torch", "pip install 'keras-solov2[convert]'")
    z, sd = tiny_fixture(fixtures_dir, "r18")
    # A released-checkpoint-like wrapper whose meta holds objects the safe unpickler refuses.
    path = tmp_path / "solov2_tiny.pth"
    meta = {"epoch": 36, "CLASSES": ("cat", "dog", "bird"), "seed": np.int64(7), "hub": _NotATensor()}
    torch.save({"meta": meta, "state_dict": _torch_state_dict(torch, sd)}, path)
    loaded, loaded_meta = load_checkpoint(path)
    assert set(loaded) == set(sd) and all(np.array_equal(loaded[k], sd[k]) for k in sd)
    assert loaded_meta["CLASSES"] == ("cat", "dog", "bird") and loaded_meta["epoch"] == 36
    assert not isinstance(loaded_meta["hub"], _NotATensor)  # an inert placeholder, never our class
    model = convert(path, norm_groups=8)
    assert model.class_names == ["cat", "dog", "bird"]
    np.testing.assert_allclose(_nchw(model(fixture_image(z))["mask_features"]), z["mask_feats"], atol=TOL)
    # A bare state dict, saved in bfloat16.
    bare = tmp_path / "bare_bf16.pth"
    torch.save({k: v.to(torch.bfloat16) if v.is_floating_point() else v
                for k, v in _torch_state_dict(torch, sd).items()}, bare)
    bf16 = load_state_dict(bare)
    assert bf16["mask_head.conv_cls.bias"].dtype == np.float32
    np.testing.assert_array_equal(bf16["mask_head.conv_cls.bias"], sd["mask_head.conv_cls.bias"])  # bf16-exact
    # Truncated, garbage, missing.
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated.pth is not a readable PyTorch checkpoint"):
        load_state_dict(truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(pickle.dumps("hello") + b"\x00" * 100)
    with pytest.raises(ValueError, match="garbage.pth"):
        convert(garbage)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_state_dict(tmp_path / "nothere.pth")
    # Not a pickle at all: the unpickler's finding, not torch's advice to
    # retry with weights_only=False.
    text = tmp_path / "text.pth"
    text.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="text.pth is not a readable PyTorch checkpoint") as error:
        load_state_dict(text)
    assert "weights_only" not in str(error.value) and "Unsupported operand" in str(error.value)


def test_missing_torch_is_explained(tmp_path, monkeypatch):
    path = tmp_path / "x.pth"
    path.write_bytes(b"PK")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install 'keras-solov2\[convert\]'"):
        load_state_dict(path)


def test_convert_command(fixtures_dir, tmp_path, capsys):
    torch = import_or_skip("torch", "pip install 'keras-solov2[convert]'")
    z, sd = tiny_fixture(fixtures_dir, "r50")
    pth = tmp_path / "tiny_r50.pth"
    torch.save({"state_dict": _torch_state_dict(torch, sd)}, pth)
    assert convert_main([str(pth), str(tmp_path / "preset"), "--norm-groups", "8"]) == 0
    assert "3 classes" in capsys.readouterr().out
    model = SOLOv2.from_preset(tmp_path / "preset")
    np.testing.assert_allclose(_nchw(model(fixture_image(z))["kernels"][2]), z["kernel_preds_l2"], atol=TOL)
    assert convert_main([str(pth), str(tmp_path / "tiny.keras"), "--norm-groups", "8"]) == 0
    assert (tmp_path / "tiny.keras").is_file()
    # As every keras-solov2 command: one line naming the file, exit 1 (before: "error: …", exit 2).
    for run_convert in (convert_main, lambda argv: cli_main(["convert"] + argv)):
        with pytest.raises(SystemExit) as exit_info:
            run_convert([str(tmp_path / "nothere.pth"), str(tmp_path / "x")])
        assert exit_info.value.code == 1
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"keras-solov2 convert: error: checkpoint {tmp_path / 'nothere.pth'} does not exist.")
