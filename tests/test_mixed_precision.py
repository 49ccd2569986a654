import keras
import numpy as np
import pytest

import keras_solov2  # noqa: F401
from tests.test_model import tiny_model
from tests.test_training import synthetic_batch


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_without_nan(policy):
    images, y = synthetic_batch(n=2, h=96, w=128)
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = tiny_model(frozen_stages=-1, norm_eval=False)
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
        out = model(images)
        assert out["cls_logits"][0].dtype == policy.split("_")[1]
        history = model.fit(images, y, batch_size=2, epochs=3, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    losses = history.history["loss"]
    assert all(np.isfinite(losses)), losses
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in model.trainable_variables)
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
