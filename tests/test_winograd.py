"""Winograd F(4×4, 3×3) convs against float64 direct convolution, values and gradients."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_solov2 import SOLOv2
from keras_solov2.models.backbone import build_resnet_backbone
from keras_solov2.winograd import conv3x3_same, use_winograd

# Sizes: multiples of 4 (no extension), others (extended and cropped), 1×1.
SIZES = [(8, 12), (7, 5), (1, 1), (12, 10)]


def reference_conv_and_grads(maps, kernel, upstream):
    """float64 direct conv (TensorFlow's Conv2D) and the gradients of Σ y·upstream."""
    maps64 = [tf.constant(x, tf.float64) for x in maps]
    kernel64 = tf.constant(kernel, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch([kernel64] + maps64)
        ys = [tf.nn.conv2d(x, kernel64, 1, "SAME") for x in maps64]
        loss = sum(tf.reduce_sum(y * u) for y, u in zip(ys, upstream))
    grads = tape.gradient(loss, [kernel64] + maps64)
    return [y.numpy() for y in ys], [g.numpy() for g in grads]


def test_values_and_gradients_match_a_float64_direct_conv():
    rng = np.random.default_rng(0)
    maps = [rng.normal(size=(2, h, w, 5)).astype("float32") for h, w in SIZES]
    kernel = rng.normal(size=(3, 3, 5, 6)).astype("float32")
    upstream = [rng.normal(size=(2, h, w, 6)) for h, w in SIZES]
    want, want_grads = reference_conv_and_grads(maps, kernel, upstream)

    inputs = [tf.constant(x) for x in maps]
    kernel_var = tf.Variable(kernel)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        ys = conv3x3_same(inputs, kernel_var)
        loss = sum(tf.reduce_sum(y * tf.constant(u, tf.float32)) for y, u in zip(ys, upstream))
    grads = tape.gradient(loss, [kernel_var] + inputs)

    for y, w, (h, wd) in zip(ys, want, SIZES):
        assert tuple(y.shape) == (2, h, wd, 6)
        np.testing.assert_allclose(y.numpy(), w, atol=1e-4 * np.abs(w).max())
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), w, atol=1e-4 * np.abs(w).max())


def test_graph_mode_with_a_dynamic_batch():
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(3, 3, 4, 3)).astype("float32")
    spec = [tf.TensorSpec((None, 8, 8, 4)), tf.TensorSpec((None, 4, 4, 4))]
    fn = tf.function(lambda a, b: conv3x3_same([a, b], kernel), input_signature=spec)
    for batch in (1, 3):
        maps = [rng.normal(size=(batch, s, s, 4)).astype("float32") for s in (8, 4)]
        want, _ = reference_conv_and_grads(maps, kernel, [np.zeros((batch, s, s, 3)) for s in (8, 4)])
        for y, w in zip(fn(*maps), want):
            np.testing.assert_allclose(y.numpy(), w, atol=1e-4 * np.abs(w).max())


def test_a_map_of_unknown_size_values_and_gradients():
    """`predict` relaxes H and W after two sizes: one graph, tiling computed in it."""
    rng = np.random.default_rng(4)
    kernel = tf.constant(rng.normal(size=(3, 3, 4, 3)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec((None, None, None, 4)), tf.TensorSpec((None, None, None, 3))])
    def fn(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = conv3x3_same([x], kernel)[0]
            loss = tf.reduce_sum(y * upstream)
        return (y,) + tuple(tape.gradient(loss, [kernel, x]))

    for h, w in [(9, 14), (8, 8), (1, 3)]:
        x = rng.normal(size=(2, h, w, 4)).astype("float32")
        upstream = rng.normal(size=(2, h, w, 3))
        want, want_grads = reference_conv_and_grads([x], kernel.numpy(), [upstream])
        y, d_kernel, d_x = fn(x, upstream.astype("float32"))
        for got, ref in zip([y, d_kernel, d_x], want + want_grads):
            np.testing.assert_allclose(got.numpy(), ref, atol=1e-4 * np.abs(ref).max())
    with pytest.raises(ValueError, match="one at a time"):
        tf.function(lambda x: conv3x3_same([x, x], kernel)).get_concrete_function(tf.TensorSpec((1, None, 8, 4)))


def test_used_for_float32_on_cpu_only():
    assert use_winograd("float32")
    assert not use_winograd("bfloat16")
    assert not use_winograd("float16")


def tiny_solov2(**kwargs):
    """ResNet-18 layout with one block per stage, narrow FPN and head (standard grids)."""
    backbone = build_resnet_backbone("resnet18", stackwise_num_blocks=[1, 1, 1, 1], dtype=kwargs.get("dtype"))
    return SOLOv2(
        backbone=backbone, num_classes=3, fpn_channels=16, feat_channels=32, stacked_convs=2,
        mask_feat_channels=16, mask_out_channels=16, norm_groups=8, **kwargs,
    )


def test_head_outputs_and_gradients_equal_direct_convs():
    keras.utils.set_random_seed(0)
    images = np.random.default_rng(2).uniform(0, 255, (2, 64, 96, 3)).astype("float32")
    models = [tiny_solov2(winograd=w) for w in (True, False)]
    models[1].set_weights(models[0].get_weights())
    assert models[0].instance_head.uses_winograd() and not models[1].instance_head.uses_winograd()
    results = []
    for model in models:
        head = model.instance_head
        with tf.GradientTape() as tape:
            out = model(images)
            loss = sum(tf.reduce_sum(tf.sin(x)) for x in out["cls_logits"] + out["kernels"])
        weights = [conv.conv.kernel for conv in head.cls_convs + head.kernel_convs] + [head.conv_cls.kernel]
        results.append((out, tape.gradient(loss, weights)))
    (out_w, grads_w), (out_d, grads_d) = results
    for key in ("cls_logits", "kernels"):
        for a, b in zip(out_w[key], out_d[key]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * np.abs(np.asarray(b)).max() + 1e-6)
    # A branch's first-layer gradient passes two GroupNorms, which amplify
    # the conv's rounding where a group's variance is small: measured up to
    # 6e-4 of the gradient's scale over 16 random inits (1e-6 in most).
    for a, b in zip(grads_w, grads_d):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-3 * np.abs(np.asarray(b)).max())


def test_setting_round_trips_and_bfloat16_uses_direct_convs():
    model = tiny_solov2(winograd=False)
    assert SOLOv2.from_config(model.get_config()).winograd is False
    assert tiny_solov2().get_config()["winograd"] is True
    mixed = tiny_solov2(dtype="mixed_bfloat16")
    assert not mixed.instance_head.uses_winograd()


@pytest.mark.parametrize("winograd", [True, False])
@pytest.mark.parametrize("needed_levels", [[], [2]])
def test_inference_outputs_run_every_tower_if_one_is_needed(needed_levels, winograd):
    """With Winograd, `inference_outputs` runs the kernel towers of all levels
    together (one group); with direct convs, each level's on its own."""
    model = tiny_solov2(winograd=winograd)
    head = model.instance_head
    images = np.random.default_rng(3).uniform(0, 255, (1, 64, 96, 3)).astype("float32")
    dense = model(images, dense_kernels=False)["kernel_feats"]
    if needed_levels:
        # Class logits ≈ 0 (score 0.5 > score_thr) on the needed levels, -20 on the others.
        head.conv_cls.bias.assign(np.zeros(head.conv_cls.bias.shape, "float32"))
        branches = head.category_branches
        head.category_branches = lambda feats, weights: [
            logits if level in needed_levels else keras.ops.full_like(logits, -20.0)
            for level, logits in enumerate(branches(feats, weights))]
    lazy = model.inference_outputs(images)
    for level, (got, want) in enumerate(zip(lazy["kernel_feats"], dense)):
        if level in needed_levels or (needed_levels and winograd):  # Winograd: all levels, one group
            assert np.any(np.asarray(want))
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
        else:
            assert not np.any(np.asarray(got))
    keras.backend.clear_session()
