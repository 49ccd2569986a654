import json

import keras
import numpy as np
import pytest

import keras_solov2  # noqa: F401
from keras_solov2 import CoordConv, DynamicMaskConv, SOLOv2
from keras_solov2.models import ARCHITECTURES
from keras_solov2.models.backbone import build_resnet_backbone
from keras_solov2.models.solov2 import PIXEL_MEAN, PIXEL_STD

# torchvision ResNet parameters without the fc layer (BN gamma/beta included,
# running statistics excluded).
RESNET_PARAMS = {"resnet18": 11_176_512, "resnet34": 21_284_672,
                 "resnet50": 23_508_032, "resnet101": 42_500_160}
RESNET_OUT = {"resnet18": [64, 128, 256, 512], "resnet34": [64, 128, 256, 512],
              "resnet50": [256, 512, 1024, 2048], "resnet101": [256, 512, 1024, 2048]}


def mmdet_param_count(backbone, fpn_channels, feat_channels, stacked_convs,
                      mask_feat_channels, mask_out_channels, num_classes=80, **_):
    """Hand count of mmdet's SOLOv2 parameters (no BN running statistics)."""
    f, h, e, m, c = fpn_channels, feat_channels, mask_out_channels, mask_feat_channels, num_classes
    conv_gn = lambda i, o, k=3: i * o * k * k + 2 * o  # noqa: E731
    n = RESNET_PARAMS[backbone]
    n += sum(ci * f + f for ci in RESNET_OUT[backbone]) + 4 * (9 * f * f + f)
    n += conv_gn(f + 2, h) + conv_gn(f, h) + 2 * (stacked_convs - 1) * conv_gn(h, h)
    n += 9 * h * e + e + 9 * h * c + c
    n += 3 * conv_gn(f, m) + conv_gn(f + 2, m) + 3 * conv_gn(m, m) + conv_gn(m, e, 1)
    return n


def _count(model):
    return sum(int(np.prod(v.shape)) for v in model.weights if "moving_" not in v.path)


def test_r50_matches_mmdet_count():
    arch = ARCHITECTURES["solov2_r50"]
    assert mmdet_param_count(**arch) == 46_592_912  # the count mmdet reports
    assert _count(SOLOv2.from_architecture("solov2_r50")) == 46_592_912


@pytest.mark.parametrize("name", ["solov2_r101", "solov2_light_r18", "solov2_light_r34", "solov2_light_r50"])
def test_every_architecture_builds_with_mmdet_count(name):
    model = SOLOv2.from_architecture(name)
    assert _count(model) == mmdet_param_count(**ARCHITECTURES[name])


# mmdet 3.3 `SOLOv2(...).init_weights()` with no checkpoint, solov2-light R18,
# measured with the peer venv: `(layer, std)` by hand from the rules
# (Kaiming normal fan-out: sqrt(2 / (k*k*C_out))), 0 / 1 the BN γ.
def test_random_init_is_mmdets():
    keras.utils.set_random_seed(0)
    model = SOLOv2.from_architecture("solov2_light_r18", num_classes=1)
    layers = {layer.name: layer for layer in model.backbone.layers}

    def std(name):
        return float(np.std(np.asarray(layers[name].kernel)))

    # mmdet: backbone.layer1.0.conv1 0.0591, layer3.0.conv1 0.0295, layer4.1.conv2 0.0208
    assert std("stack0_block0_1_conv") == pytest.approx((2 / (9 * 64)) ** 0.5, rel=0.03)
    assert std("stack2_block0_1_conv") == pytest.approx((2 / (9 * 256)) ** 0.5, rel=0.03)
    assert std("stack3_block1_2_conv") == pytest.approx((2 / (9 * 512)) ** 0.5, rel=0.03)
    # zero_init_residual: the last BN of every block starts at γ = 0, the rest at 1.
    gammas = {name: np.asarray(layer.gamma) for name, layer in layers.items()
              if isinstance(layer, keras.layers.BatchNormalization)}
    assert len(gammas) == 1 + 8 * 2 + 3  # stem, 8 blocks x 2, 3 projection shortcuts
    for name, gamma in gammas.items():
        expected = 0.0 if name.endswith("_2_bn") else 1.0
        assert np.all(gamma == expected), name
    # Head: Normal(0.01) convs (mmdet 0.0100), except the mask feature
    # branch's 1x1 conv_pred at Kaiming fan-out (mmdet 0.1253 for 128 outputs).
    conv_pred = model.mask_feature_head.conv_pred.conv.kernel
    assert float(np.std(np.asarray(conv_pred))) == pytest.approx((2 / 128) ** 0.5, rel=0.05)
    kernel_conv = model.instance_head.kernel_convs[0].conv.kernel
    assert float(np.std(np.asarray(kernel_conv))) == pytest.approx(0.01, rel=0.03)


def tiny_model(**kwargs):
    """ResNet-18 layout with one block per stage and narrow FPN/head."""
    args = dict(
        backbone=build_resnet_backbone("resnet18", stackwise_num_blocks=[1, 1, 1, 1], dtype=kwargs.get("dtype")),
        num_classes=3, fpn_channels=32, feat_channels=32, stacked_convs=2,
        mask_feat_channels=16, mask_out_channels=32, norm_groups=8,
    )
    args.update(kwargs)
    return SOLOv2(**args)


def test_forward_shapes_and_layout():
    model = tiny_model()
    out = model(np.zeros((2, 128, 160, 3), "float32"))
    assert [tuple(c.shape) for c in out["cls_logits"]] == [(2, s, s, 3) for s in (40, 36, 24, 16, 12)]
    assert [tuple(k.shape) for k in out["kernels"]] == [(2, s, s, 32) for s in (40, 36, 24, 16, 12)]
    assert tuple(out["mask_features"].shape) == (2, 32, 40, 32)
    # Class logits start at the prior (p = 0.01) plus a small random term.
    assert abs(float(np.mean(out["cls_logits"][2])) + np.log(99)) < 0.5


def test_frozen_stages_and_norm_eval():
    model = tiny_model()
    frozen = {layer.name for layer in model.backbone.layers if not layer.trainable}
    assert "conv1_conv" in frozen and any(n.startswith("stack0_") for n in frozen)
    assert not any(n.startswith("stack1_") for n in frozen)
    bn = model.backbone.get_layer("stack2_block0_1_bn")
    before = np.array(bn.moving_mean)
    images = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype("float32")
    model(images, training=True)
    np.testing.assert_array_equal(np.array(bn.moving_mean), before)  # norm_eval
    scratch = tiny_model(frozen_stages=-1, norm_eval=False)
    assert all(layer.trainable for layer in scratch.backbone.layers)
    bn = scratch.backbone.get_layer("stack2_block0_1_bn")
    before = np.array(bn.moving_mean)
    scratch(images, training=True)
    assert not np.array_equal(np.array(bn.moving_mean), before)


def test_layers_serialise():
    for layer in (CoordConv(), DynamicMaskConv()):
        cfg = json.loads(json.dumps(keras.layers.serialize(layer)))
        assert keras.layers.deserialize(cfg).get_config() == layer.get_config()


def test_every_layer_round_trips_through_a_keras_file(tmp_path):
    """Each public layer inside a functional model: saved, reloaded, same outputs."""
    from keras_solov2 import MatrixNMS
    from keras_solov2.layers.conv_norm_relu import ConvNormReLU
    from keras_solov2.models.feature_pyramid import SOLOv2FeaturePyramid
    from keras_solov2.models.instance_head import SOLOv2InstanceHead
    from keras_solov2.models.mask_feature_head import SOLOv2MaskFeatureHead

    rng = np.random.default_rng(0)
    c2_c5 = [keras.Input((32 // s, 48 // s, c)) for s, c in ((1, 8), (2, 16), (4, 16), (8, 16))]
    pyramid = SOLOv2FeaturePyramid(16, name="fpn")(c2_c5)
    cls, kernels = SOLOv2InstanceHead(3, num_grids=[8, 6, 4, 3, 2], feat_channels=16, stacked_convs=2,
                                      kernel_out_channels=8, norm_groups=4, name="head")(pyramid)
    feats = SOLOv2MaskFeatureHead(feat_channels=8, out_channels=8, norm_groups=4, name="mask")(pyramid[:4])
    unit = ConvNormReLU(8, 3, 4, "glorot_uniform", name="unit")(CoordConv(name="coord")(feats))
    logits = DynamicMaskConv(name="dyn")(unit, keras.ops.reshape(kernels[0], (-1, 64, 8)))
    model = keras.Model(c2_c5, cls + kernels + [feats, logits])
    inputs = [rng.normal(0, 1, (1,) + tuple(t.shape[1:])).astype("float32") for t in c2_c5]
    model.save(tmp_path / "layers.keras")
    loaded = keras.saving.load_model(tmp_path / "layers.keras", safe_mode=True)
    for a, b in zip(model(inputs), loaded(inputs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # MatrixNMS has no weights; its config is what a .keras file keeps.
    nms = MatrixNMS(kernel="linear", sigma=3.0, filter_thr=0.1, nms_pre=7, max_per_img=5)
    again = keras.layers.deserialize(json.loads(json.dumps(keras.layers.serialize(nms))))
    assert again.get_config() == nms.get_config()
    masks = rng.random((6, 8, 8)) > 0.5
    args = (masks, np.zeros(6, "int32"), np.linspace(0.9, 0.4, 6).astype("float32"))
    for k in ("indices", "scores"):
        np.testing.assert_array_equal(np.asarray(nms(*args)[k]), np.asarray(again(*args)[k]))


def test_keras_file_round_trip(tmp_path):
    model = tiny_model(class_names=["a", "b", "c"], score_thr=0.05)
    images = np.random.default_rng(0).uniform(0, 255, (1, 64, 96, 3)).astype("float32")
    # Perturb every weight so the comparison is not between initialisations.
    for v in model.weights:
        v.assign(np.asarray(v) + np.random.default_rng(1).normal(0, 0.01, v.shape).astype(v.dtype))
    before = model(images)
    path = tmp_path / "tiny.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, SOLOv2)
    assert json.loads(json.dumps(loaded.get_config())) == json.loads(json.dumps(model.get_config()))
    after = loaded(images)
    for a, b in zip(keras.tree.flatten(before), keras.tree.flatten(after)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_predict_pads_and_returns_input_size():
    model = tiny_model(max_per_img=10)
    out = model.predict(np.zeros((2, 70, 90, 3), "float32"), verbose=0)
    assert out["masks"].shape == (2, 10, 70, 90) and out["masks"].dtype == np.uint8
    assert out["scores"].shape == (2, 10) and out["num_detections"].shape == (2,)


def test_the_pipeline_pads_with_the_pixel_the_model_normalises_to_zero():
    # Two definitions, since data code never imports model code: padding must stay background.
    from keras_solov2.data import transforms

    assert transforms.PIXEL_MEAN == PIXEL_MEAN


def test_summary_after_predict_names_every_layer():
    # Keras's summary asks each built layer for its output shape from the
    # shapes it was built with; a two-input layer must have recorded both.
    model = tiny_model(max_per_img=10)
    model.predict(np.zeros((1, 64, 96, 3), "float32"), verbose=0)
    lines = []
    model.summary(print_fn=lambda line, **_: lines.append(line))
    text = "\n".join(lines)
    assert "dynamic_conv (DynamicMaskConv)" in text and "(1, None, 16, 24)" in text
    assert f"Total params: {model.count_params():,}" in text


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="Unknown backbone"):
        SOLOv2(backbone="vgg16")
    with pytest.raises(ValueError, match="Unknown architecture"):
        SOLOv2.from_architecture("solov2_r18")
    with pytest.raises(ValueError, match="5 levels"):
        tiny_model(num_grids=[40, 36, 24])


@pytest.mark.parametrize("field, value, message", [
    ("num_classes", 0, "num_classes must be a positive int, got 0"),
    ("max_per_img", 0, "max_per_img must be a positive int, got 0"),
    ("max_per_img", -1, "max_per_img must be a positive int, got -1"),  # crashed inside TF
    ("max_candidates", 0, "max_candidates must be a positive int"),
    ("max_pos_pairs", 2.5, "max_pos_pairs must be a positive int"),
    ("score_thr", 1.5, r"score_thr must be a number in \[0.0, 1.0\]"),  # silently nothing detected
    ("mask_thr", -0.1, r"mask_thr must be a number in \[0.0, 1.0\]"),
    ("pos_scale", 2, r"pos_scale must be a number in \[0.0, 1.0\]"),
])
def test_bad_hyper_parameters_are_named_before_anything_is_built(field, value, message):
    with pytest.raises(ValueError, match=message):
        SOLOv2(backbone="resnet50", **{field: value})


def test_coord_conv_and_dynamic_conv_name_bad_shapes():
    with pytest.raises(ValueError, match="coord_conv.*expected ndim=4, found ndim=3"):
        CoordConv()(np.zeros((2, 3, 4), "float32"))
    with pytest.raises(ValueError, match=r"mask_features have E=3 channels but the kernels E=4"):
        DynamicMaskConv()(np.zeros((1, 4, 5, 3), "float32"), np.zeros((1, 2, 4), "float32"))
    with pytest.raises(ValueError, match=r"mask_features must be \(B, h, w, E\) and kernels \(B, K, E\)"):
        DynamicMaskConv()(np.zeros((4, 5, 3), "float32"), np.zeros((1, 2, 3), "float32"))


@pytest.mark.parametrize("field, value, message", [
    ("weight_decay", -1e-4, "weight_decay must be >= 0"),
    ("grad_clip_norm", 0, r"grad_clip_norm must be > 0 or None"),  # every gradient scaled to 0
    ("global_batch_size", 0, "global_batch_size must be a positive int or None, got 0"),  # LR 0
    ("steps_per_epoch", 0, "steps_per_epoch must be a positive int or None, got 0"),
])
def test_bad_compile_arguments_are_named(field, value, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model.compile(**{field: value})


def test_predict_rejects_images_that_are_not_rgb_batches_or_not_finite():
    model = tiny_model(max_per_img=5)
    with pytest.raises(ValueError, match=r"shape \(B, H, W, 3\), got shape \(32, 64, 3\) \(a single image"):
        model.predict(np.zeros((64, 64, 3), "float32"), verbose=0)
    with pytest.raises(ValueError, match=r"got shape \(1, 64, 64, 1\)"):  # was broadcast to 3 channels
        model.predict(np.zeros((1, 64, 64, 1), "float32"), verbose=0)
    broken = np.zeros((1, 64, 64, 3), "float32")
    broken[0, 10, 20, 1] = np.nan  # the fused backbone kernels would read it as 0
    with pytest.raises(Exception, match="images contain NaN or inf pixels"):
        model.predict(broken, verbose=0)


def test_saves_are_atomic(tmp_path, monkeypatch):
    model = tiny_model()
    path = tmp_path / "ckpt.keras"
    model.save(path)
    good = path.read_bytes()

    def crash(self, filepath, overwrite=True, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(keras.Model, "save", crash)
    monkeypatch.setattr(keras.Model, "save_weights", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save(path)
    with pytest.raises(KeyboardInterrupt):
        model.save_weights(tmp_path / "w.weights.h5")
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.keras"]  # no temp files left
    monkeypatch.undo()
    with pytest.raises(FileExistsError):
        model.save(path, overwrite=False)
    model.save_weights(tmp_path / "w.weights.h5")
    assert keras.saving.load_model(path).count_params() == model.count_params()


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_predict_several_sizes_one_graph(dtype):
    model = tiny_model(max_per_img=5, dtype=dtype)
    for h, w in [(64, 96), (70, 90), (128, 64), (96, 96)]:
        out = model.predict(np.zeros((1, h, w, 3), "float32"), verbose=0)
        assert out["masks"].shape == (1, 5, h, w)
    # Keras relaxes the input shape after the second size: at most 2 traces.
    assert len(model.predict_function._list_all_concrete_functions()) <= 2


def test_inference_outputs_skip_only_unneeded_kernel_branches():
    model = tiny_model(max_per_img=20)
    images = np.random.default_rng(0).uniform(0, 255, (2, 96, 128, 3)).astype("float32")
    dense = model(images)
    # Random init: every score is ~0.01 < score_thr, so no kernel is ever read.
    lazy = model.inference_outputs(images)
    assert "kernels" not in lazy
    assert [tuple(k.shape) for k in lazy["kernel_feats"]] == [(2, s, s, 32) for s in (40, 36, 24, 16, 12)]
    assert all(not np.any(np.asarray(k)) for k in lazy["kernel_feats"])
    for a, b in zip(lazy["cls_logits"], dense["cls_logits"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(np.max(model.decode(lazy)["num_detections"])) == 0
    # Class-logit bias 0 (scores ~0.5): candidates on every level, every tower runs.
    bias = model.instance_head.conv_cls.bias
    bias.assign(np.zeros(bias.shape, "float32"))
    dense, lazy = model(images), model.inference_outputs(images)
    assert all(np.any(np.asarray(k)) for k in lazy["kernel_feats"])
    d_lazy, d_dense = model.decode(lazy), model.decode(dense)
    assert int(np.min(d_dense["num_detections"])) > 0
    for key in ("labels", "num_detections"):
        np.testing.assert_array_equal(np.asarray(d_lazy[key]), np.asarray(d_dense[key]))
    # The candidates' kernels come from a gather + matmul, not the conv: same up to summation order.
    for key in ("scores", "soft_masks"):
        np.testing.assert_allclose(np.asarray(d_lazy[key]), np.asarray(d_dense[key]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_kernels_at_cells_equal_the_dense_kernel_conv(dtype):
    # Direct convs: the dense reference is then the conv `kernels_at` stands for.
    model = tiny_model(dtype=dtype, winograd=False)
    head = model.instance_head
    # Larger final-conv weights than the init's (std 0.01), so the comparison is not one of near-zeros.
    rng = np.random.default_rng(2)
    head.conv_kernel.kernel.assign(rng.normal(0, 0.1, head.conv_kernel.kernel.shape).astype("float32"))
    head.conv_kernel.bias.assign(rng.normal(0, 0.1, head.conv_kernel.bias.shape).astype("float32"))
    images = rng.uniform(0, 255, (2, 64, 96, 3)).astype("float32")
    x = (images - np.array(PIXEL_MEAN, "float32")) / np.array(PIXEL_STD, "float32")
    pyramid = model.neck(model.feature_extractor(keras.ops.cast(x, model.compute_dtype)))
    feats = head.level_features(pyramid)
    dense = np.concatenate(
        [np.asarray(keras.ops.cast(k, "float32")).reshape(2, -1, 32) for k in head.kernel_branches(feats)], axis=1
    )
    towers = head.kernel_towers(feats)
    # Corners and edges of every level (zero padding), interior cells, repeats; different per image.
    offsets = np.cumsum([0] + [s * s for s in head.num_grids])
    cells = []
    for off, s in zip(offsets, head.num_grids):
        cells += [off, off + s - 1, off + s * (s - 1), off + s * s - 1, off + s + 1, off + s // 2 * s + s // 2]
    cells = np.array([cells, cells[::-1]], "int32")
    got = np.asarray(keras.ops.cast(head.kernels_at(towers, cells), "float32"))
    want = np.take_along_axis(dense, cells[:, :, None], axis=1)
    assert np.abs(want).max() > 0.1
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(got, want, **tol)
