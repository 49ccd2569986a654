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
