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
