import collections

import keras
import numpy as np
import pytest

import keras_solov2  # noqa: F401
from tests.test_model import tiny_model
from tests.test_training import _train_step_graph, synthetic_batch


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


def test_head_weights_are_cast_once_per_step():
    """Under mixed precision each head weight is cast to bfloat16 once per
    training step, not once per pyramid level: TensorFlow computes such
    casts at the start of the step and keeps them until the backward pass."""
    images, y = synthetic_batch(n=2, h=96, w=128)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = tiny_model()
        model.compile(optimizer=keras.optimizers.SGD(0.01))
        graph = _train_step_graph(model, images, y)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    head = model.instance_head
    names = {id(v.value.handle): v.path for v in head.weights}
    captured = {internal.name: names.get(id(external)) for external, internal in graph.captures}
    casts = collections.Counter()
    for op in graph.get_operations():
        read = op.inputs[0].op if op.type == "Cast" and op.inputs else None
        if read is not None and read.type == "ReadVariableOp" and op.outputs[0].dtype == "bfloat16":
            casts[captured.get(read.inputs[0].name)] += 1
    kernels = [v.path for v in head.weights if v.path.endswith("/kernel")]
    assert len(kernels) == 2 * head.stacked_convs + 2
    assert {k: casts[k] for k in kernels} == {k: 1 for k in kernels}


# Large, as the float32 XLA step's test (tests/test_large.py): XLA is off by
# default, and compiling the step takes half a minute.
@pytest.mark.large
def test_bfloat16_xla_train_step_compiles_and_matches_the_default_step():
    """`mixed_bfloat16` with `compile(jit_compile=True)` (BatchNorm folded,
    norm_eval): XLA's gradient of a bfloat16 bilinear resize used to be an
    internal error; the resizes now interpolate in float32. Same init, same
    batches: the first step's losses agree to bfloat16 rounding."""
    images, y = synthetic_batch(n=2, h=96, w=128)
    histories = {}
    for jit in (False, True):
        keras.utils.set_random_seed(0)
        model = tiny_model(dtype="mixed_bfloat16")
        model.compile(jit_compile=jit)
        histories[jit] = model.fit(images, y, batch_size=2, epochs=2, verbose=0).history
    for key in ("loss", "loss_cls", "loss_mask"):
        assert np.all(np.isfinite(histories[True][key])), histories[True]
        np.testing.assert_allclose(histories[True][key][0], histories[False][key][0], rtol=5e-3, err_msg=key)
