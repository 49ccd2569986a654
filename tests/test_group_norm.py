"""GroupNorm against a float64 reference and against Keras's GroupNormalization."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_solov2.layers.group_norm import GroupNorm


def reference(x, groups, gamma, beta, eps=1e-5):
    """GroupNorm in float64, straight from its definition (channels last)."""
    x = np.asarray(x, np.float64)
    g = x.reshape(x.shape[0], -1, groups, x.shape[-1] // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
    return y * gamma + beta


def pair(groups, channels, rng, dtype="float32"):
    ours = GroupNorm(groups=groups, epsilon=1e-5, dtype=dtype)
    theirs = keras.layers.GroupNormalization(groups=groups, epsilon=1e-5, dtype=dtype)
    gamma = rng.uniform(0.5, 1.5, channels).astype("float32")
    beta = rng.normal(0, 0.1, channels).astype("float32")
    for layer in (ours, theirs):
        layer.build((None, None, None, channels))
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    return ours, theirs, gamma, beta


@pytest.mark.parametrize("offset", [0.3, 30.0])
def test_matches_float64_reference(offset):
    # A large mean next to a unit spread is where the order of summation
    # shows: Keras's layer is off by ~2e-4 at offset 30, a two-pass over
    # per-channel sums by ~1e-5.
    rng = np.random.default_rng(0)
    ours, _, gamma, beta = pair(32, 512, rng)
    for size in (40, 12):
        x = rng.normal(offset, 1.0, (2, size, size, 512)).astype("float32")
        np.testing.assert_allclose(np.asarray(ours(x)), reference(x, 32, gamma, beta), rtol=0, atol=2e-5)


def test_equals_keras_group_normalization_values_and_gradients():
    rng = np.random.default_rng(1)
    ours, theirs, _, _ = pair(4, 16, rng)
    x = tf.constant(rng.normal(0.5, 2.0, (2, 7, 9, 16)).astype("float32"))
    upstream = tf.constant(rng.normal(0, 1, (2, 7, 9, 16)).astype("float32"))
    grads = []
    for layer in (ours, theirs):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * upstream)
        grads.append((y, *tape.gradient(loss, [x, layer.gamma, layer.beta])))
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_mixed_bfloat16_computes_in_float32_and_returns_bfloat16():
    rng = np.random.default_rng(2)
    ours, _, gamma, beta = pair(8, 64, rng, dtype="mixed_bfloat16")
    x = rng.normal(3.0, 1.0, (1, 10, 10, 64)).astype("float32")
    x_bf16 = tf.cast(x, tf.bfloat16)  # what a bfloat16 conv hands it
    y = ours(x_bf16)
    assert y.dtype == "bfloat16"
    # Statistics of the bfloat16 input, in float32 with float32 γ and β:
    # within bfloat16's rounding of the output (2^-8 relative).
    want = reference(tf.cast(x_bf16, tf.float32), 8, gamma, beta)
    np.testing.assert_allclose(np.asarray(tf.cast(y, tf.float32)), want, rtol=2**-7, atol=2**-7)


def test_dynamic_spatial_shape_other_ranks_and_other_axis():
    rng = np.random.default_rng(3)
    ours, _, gamma, beta = pair(2, 8, rng)
    model = keras.Sequential([keras.Input((None, None, 8)), ours])
    for h, w in ((5, 6), (3, 11)):
        x = rng.normal(0, 1, (2, h, w, 8)).astype("float32")
        np.testing.assert_allclose(np.asarray(model(x)), reference(x, 2, gamma, beta), atol=1e-5)
    sequences = GroupNorm(groups=2, epsilon=1e-5, gamma_initializer=keras.initializers.Constant(gamma),
                          beta_initializer=keras.initializers.Constant(beta))
    seq = rng.normal(0, 1, (3, 20, 8)).astype("float32")
    np.testing.assert_allclose(np.asarray(sequences(seq)), reference(seq, 2, gamma, beta), atol=1e-5)
    # Channels first: Keras's own computation.
    first = GroupNorm(groups=2, axis=1)
    keras_first = keras.layers.GroupNormalization(groups=2, axis=1)
    x = rng.normal(0, 1, (2, 8, 5, 5)).astype("float32")
    np.testing.assert_allclose(np.asarray(first(x)), np.asarray(keras_first(x)), atol=1e-6)


def test_serialises():
    layer = GroupNorm(groups=4, epsilon=1e-5)
    again = keras.layers.deserialize(json.loads(json.dumps(keras.layers.serialize(layer))))
    assert type(again) is GroupNorm
    assert again.get_config() == layer.get_config()
