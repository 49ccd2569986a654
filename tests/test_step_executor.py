"""compile(step_executor="sequential"): the CPU train step runs its ops one at a time."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_solov2.step_executor import sequential_function_calls
from tests.test_model import tiny_model
from tests.test_training import assert_same_update, synthetic_batch


def _reference_typed_graph():
    # TensorFlow's single-threaded executor refuses reference-typed edges
    # (the default executor runs them): which executor ran a call shows in
    # whether this fails.
    @tf.function
    def f():
        ref = tf.raw_ops.TemporaryVariable(shape=[1], dtype=tf.float32, var_name="probe")
        return tf.raw_ops.DestroyTemporaryVariable(ref=ref, var_name="probe")

    return f


def test_sequential_calls_run_the_single_threaded_executor_and_restore_the_default():
    f = _reference_typed_graph()
    f()  # the default executor
    with pytest.raises(Exception, match="Single-threaded executor does not support reference-typed edges"):
        with sequential_function_calls():
            _reference_typed_graph()()
    f()  # options restored after the block, also when it raised
    g = tf.function(lambda x: tf.reduce_sum(x * x))
    with sequential_function_calls():
        assert float(g(tf.ones((2, 3)))) == 6.0


@pytest.mark.parametrize("kwargs, message", [
    ({"step_executor": "fast"}, r"step_executor must be one of 'parallel', 'sequential', got 'fast'"),
    # The micro-batch loop runs far slower on that executor.
    ({"step_executor": "sequential", "micro_batch_size": 1}, r"one at a time on the CPU alone, but .*tf.while_loop"),
    ({"step_executor": "sequential", "jit_compile": True}, r"one at a time on the CPU alone, but under jit_compile"),
    ({"step_executor": "sequential", "steps_per_execution": 4}, r"but steps_per_execution=4 runs the steps in a "),
])
def test_compile_names_a_step_executor_that_cannot_run(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().compile(**kwargs)


def test_fit_trains_the_same_with_either_executor(tmp_path):
    """fit's train function under `"sequential"` runs on the single-threaded
    executor and gives the default executor's losses and update; the
    setting survives a `.keras` file."""
    images, y = synthetic_batch(n=4)
    ds = tf.data.Dataset.from_tensor_slices((images, y)).batch(2)
    models = {"sequential": tiny_model(), "parallel": tiny_model()}
    models["parallel"].set_weights(models["sequential"].get_weights())
    before = [np.asarray(v) for v in models["sequential"].trainable_variables]
    logs = {}
    for executor, model in models.items():
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), step_executor=executor)
        logs[executor] = model.fit(ds, epochs=2, verbose=0).history
    assert getattr(models["sequential"].train_function, "runs_sequentially", False)
    assert not getattr(models["parallel"].train_function, "runs_sequentially", False)
    for key in ("loss", "loss_cls", "loss_mask"):
        np.testing.assert_allclose(logs["sequential"][key], logs["parallel"][key], rtol=1e-5, err_msg=key)
    assert_same_update(models["sequential"], models["parallel"], before)
    models["sequential"].save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.step_executor == "sequential"
    loaded.fit(ds, epochs=1, verbose=0)
    assert getattr(loaded.train_function, "runs_sequentially", False)


def test_without_the_executor_option_the_step_runs_as_before_with_one_warning(monkeypatch):
    from keras_solov2 import step_executor

    def missing():  # another TensorFlow, without the eager context's call options
        raise AttributeError("'Context' object has no attribute 'function_call_options'")

    monkeypatch.setattr(step_executor, "_eager_context", missing)
    monkeypatch.setattr(step_executor, "_warned", [])
    f = _reference_typed_graph()
    with pytest.warns(UserWarning, match=r"no per-call executor option .*step_executor='parallel'"):
        with sequential_function_calls():
            f()  # the default executor ran it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        with sequential_function_calls():
            f()
