"""Real-size configurations (deselected by default; run with `python -m pytest -m large`)."""

import keras
import numpy as np
import pytest

import keras_solov2  # noqa: F401
from keras_solov2 import SOLOv2
from tests.test_training import synthetic_batch

pytestmark = pytest.mark.large


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_r50_predicts_at_coco_test_size(dtype):
    model = SOLOv2.from_architecture("solov2_r50", dtype=dtype)
    out = model.predict(np.full((1, 800, 1333, 3), 114.0, "float32"), verbose=0)
    assert out["masks"].shape == (1, 100, 800, 1333) and out["masks"].dtype == np.uint8
    assert int(out["num_detections"][0]) == 0  # random init: nothing above score_thr


def test_r50_trains_at_512_without_nan():
    images, y = synthetic_batch(n=2, h=512, w=512, max_instances=4)
    model = SOLOv2.from_architecture("solov2_r50", num_classes=3)
    model.compile(global_batch_size=2, steps_per_epoch=2)
    history = model.fit(images, y, batch_size=2, epochs=2, verbose=0)
    assert all(np.isfinite(history.history["loss"]))
    assert history.history["loss"][1] < history.history["loss"][0] * 1.5
    assert isinstance(model.optimizer, keras.optimizers.SGD)


def test_xla_train_step_matches_the_default_step_and_predict_still_runs():
    """compile(jit_compile=True): the XLA-compiled train step gives the losses
    and weights of the default step (same init, same batches); predict, whose
    candidate count is dynamic, runs without XLA. (About a minute: the XLA compile.)"""
    from tests.test_model import tiny_model

    images, y = synthetic_batch(n=2)
    runs = {}
    for jit in (False, True):
        keras.utils.set_random_seed(0)
        model = tiny_model(frozen_stages=-1, norm_eval=False)
        model.compile(jit_compile=jit)
        assert model.jit_compile is jit
        history = model.fit(images, y, batch_size=2, epochs=3, verbose=0)
        runs[jit] = (history.history, model.get_weights(), model)
    for key in ("loss", "loss_cls", "loss_mask"):
        np.testing.assert_allclose(runs[True][0][key], runs[False][0][key], rtol=2e-3, err_msg=key)
    for a, b in zip(runs[True][1], runs[False][1]):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-4)
    out = runs[True][2].predict(images[:1], verbose=0)
    assert out["masks"].shape[0] == 1


def test_xla_micro_batched_step_matches_the_one_pass_step():
    """compile(jit_compile=True, micro_batch_size=1) on a static batch of 2:
    the XLA-compiled loop over micro-batches (fixed shapes) gives the one-pass
    XLA step's loss and weights. (About a minute: two XLA compiles.)"""
    import tensorflow as tf

    from tests.test_model import tiny_model

    images, y = synthetic_batch(n=2)
    ds = tf.data.Dataset.from_tensor_slices((images, y)).batch(2, drop_remainder=True)
    runs = {}
    for size in (None, 1):
        keras.utils.set_random_seed(0)
        model = tiny_model()
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), jit_compile=True, micro_batch_size=size)
        history = model.fit(ds, epochs=2, verbose=0)
        runs[size] = (history.history, model.get_weights())
    for key in ("loss", "loss_cls", "loss_mask"):
        np.testing.assert_allclose(runs[1][0][key], runs[None][0][key], rtol=1e-5, err_msg=key)
    for a, b in zip(runs[1][1], runs[None][1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    images, y = synthetic_batch(n=3)
    ragged_end = tf.data.Dataset.from_tensor_slices((images, y)).batch(2)  # batch size None
    with pytest.raises(ValueError, match=r"batch size \(None\) must be static and a multiple of micro_batch_size"):
        model.fit(ragged_end, epochs=1, verbose=0)
