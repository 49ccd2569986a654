"""BatchNorm folded into the conv before it: values, gradients and weight sharing."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_solov2.models.backbone import build_resnet_backbone, pyramid_extractor
from keras_solov2.models.batch_norm_folding import fold_batch_norms
from tests.test_model import tiny_model


def randomise_batch_norms(model, rng):
    # Fresh BatchNorms are the identity (μ=0, σ²=1, γ=1, β=0), which would
    # hide a wrong fold.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.2, c))
            layer.moving_variance.assign(rng.uniform(0.3, 3.0, c))
            layer.gamma.assign(rng.uniform(0.5, 1.5, c))
            layer.beta.assign(rng.normal(0, 0.2, c))


@pytest.fixture(scope="module")
def extractor():
    keras.utils.set_random_seed(0)
    model = pyramid_extractor(build_resnet_backbone("resnet18", stackwise_num_blocks=[1, 1, 1, 1]))
    randomise_batch_norms(model, np.random.default_rng(0))
    return model


def test_single_conv_batch_norm_against_numpy():
    # conv 3×3 stride 2 'same' with bias, then BatchNorm, by hand in float64.
    rng = np.random.default_rng(1)
    inputs = keras.Input((6, 6, 3))
    conv = keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=True)
    bn = keras.layers.BatchNormalization(epsilon=1e-3)
    model = keras.Model(inputs, bn(conv(inputs)))
    randomise_batch_norms(model, rng)
    conv.bias.assign(rng.normal(0, 1, 4))
    folded, n = fold_batch_norms(model)
    assert n == 1
    x = rng.normal(0, 1, (2, 6, 6, 3)).astype("float32")

    k, b = np.asarray(conv.kernel, np.float64), np.asarray(conv.bias, np.float64)
    pad = np.pad(x.astype(np.float64), [(0, 0), (0, 1), (0, 1), (0, 0)])  # TF 'same', stride 2, even size
    y = np.zeros((2, 3, 3, 4))
    for i in range(3):
        for j in range(3):
            patch = pad[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, :]
            y[:, i, j] = np.einsum("bhwc,hwco->bo", patch, k) + b
    mean, var = np.asarray(bn.moving_mean), np.asarray(bn.moving_variance)
    gamma, beta = np.asarray(bn.gamma), np.asarray(bn.beta)
    expected = (y - mean) / np.sqrt(var + 1e-3) * gamma + beta
    np.testing.assert_allclose(np.asarray(folded(x)), expected, rtol=1e-5, atol=1e-5)
    # the folded model has no BatchNormalization left
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)


def test_resnet_pyramid_equals_inference_mode_values_and_gradients(extractor):
    folded, n = fold_batch_norms(extractor)
    # ResNet-18 with one block per stage: stem 1 + 4 blocks × 2 + 3 projections
    assert n == 12
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    x = tf.constant(np.random.default_rng(2).normal(0, 1, (2, 64, 96, 3)).astype("float32"))
    trainable = list(extractor.trainable_variables)
    results = []
    for model in (lambda t: extractor(t, training=False), folded):
        with tf.GradientTape() as tape:
            tape.watch(x)
            feats = model(x)
            loss = sum(tf.reduce_sum(f * tf.cos(f)) for f in feats)
        grads = tape.gradient(loss, [x] + trainable)
        results.append((feats, grads))
    (fa, ga), (fb, gb) = results
    for a, b in zip(fa, fb):
        scale = np.abs(np.asarray(a)).max()
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=2e-5 * scale)
    assert len(ga) == len(gb) and all(g is not None for g in gb)  # γ, β and W all get gradients
    for a, b, v in zip(ga, gb, [x] + trainable):
        scale = np.abs(np.asarray(a)).max()
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-4 * scale, err_msg=v.name if v is not x else "x")


def test_folded_model_shares_the_variables(extractor):
    folded, _ = fold_batch_norms(extractor)
    assert {id(v) for v in folded.weights} == {id(v) for v in extractor.weights}
    x = np.random.default_rng(3).normal(0, 1, (1, 32, 32, 3)).astype("float32")
    before = [np.asarray(f) for f in folded(x)]
    bn = next(layer for layer in extractor.layers if isinstance(layer, keras.layers.BatchNormalization))
    saved = np.asarray(bn.beta)
    bn.beta.assign(saved + 1.0)
    try:
        after = [np.asarray(f) for f in folded(x)]
        expected = [np.asarray(f) for f in extractor(x, training=False)]
    finally:
        bn.beta.assign(saved)
    assert not np.allclose(after[-1], before[-1])  # not frozen into constants
    for a, b in zip(after, expected):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * np.abs(b).max())


def test_bfloat16_close_to_float32(extractor):
    model = pyramid_extractor(
        build_resnet_backbone("resnet18", stackwise_num_blocks=[1, 1, 1, 1], dtype="mixed_bfloat16")
    )
    model.set_weights(extractor.get_weights())
    folded, _ = fold_batch_norms(model)
    x = np.random.default_rng(4).normal(0, 1, (1, 64, 64, 3)).astype("float32")
    for a, b in zip(folded(x), extractor(x, training=False)):
        assert a.dtype == "bfloat16"
        a, b = np.asarray(tf.cast(a, "float32")), np.asarray(b)
        # bfloat16 keeps 8 bits: a few 2^-8 relative after 9 layers
        assert np.abs(a - b).max() <= 0.05 * np.abs(b).max()
        assert np.abs(a - b).mean() <= 0.01 * np.abs(b).mean()


def test_solov2_tracks_the_backbone_once():
    model = tiny_model()
    ids = [id(v) for v in model.weights]
    assert len(ids) == len(set(ids))
    backbone_bns = [
        layer for layer in model.feature_extractor.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    names = {v.path for v in model.weights}
    assert all(v.path in names for layer in backbone_bns for v in layer.weights)
    assert not any("folded" in p for p in names)
