import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_solov2.backward_stages import BackwardStages
from tests.test_model import tiny_model
from tests.test_training import synthetic_batch


def _ancestors(tensor):
    seen, todo = set(), [tensor.op]
    while todo:
        op = todo.pop()
        for parent in list(op.control_inputs) + [t.op for t in op.inputs]:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


def _two_branches(run, x, w1, w2, w3):
    """h feeds two later stages (a sum of gradients); w2 is read by two stages."""
    h = run(lambda x: tf.tanh(tf.matmul(x, w1)), x)
    a = run(lambda h: tf.sin(tf.matmul(h, w2)), h)
    return run(lambda h, a: tf.reduce_sum(a * w3) + tf.reduce_sum(h * h) * tf.reduce_sum(w2), h, a)


def test_stages_give_the_gradients_of_one_tape_and_differentiate_in_reverse():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(4, 3)))
    w1, w2, w3 = (tf.Variable(rng.normal(size=s)) for s in ((3, 5), (5, 2), (2,)))

    @tf.function
    def staged():
        stages = BackwardStages()
        loss = _two_branches(stages.run, x, w1, w2, w3)
        return stages.gradients(loss, [w1, w2, w3])

    @tf.function
    def one_tape():
        with tf.GradientTape() as tape:
            loss = _two_branches(lambda fn, *args: fn(*args), x, w1, w2, w3)
        return tape.gradient(loss, [w1, w2, w3])

    for got, want in zip(staged(), one_tape()):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12)
    # The first stage's backward pass (w1's gradient) waits for the last
    # stage's (w3's), which one tape leaves free to run at the same time.
    for fn, waits in ((staged, True), (one_tape, False)):
        g1, _, g3 = fn.get_concrete_function().structured_outputs
        g3 = g3.op.inputs[0]  # inside the function's output Identity
        assert (g3.op in _ancestors(g1)) == waits


def test_a_tensor_passed_on_unchanged_and_used_twice_gets_its_gradient_once():
    w, v = tf.Variable(2.0), tf.Variable(5.0)
    stages = BackwardStages()
    t = stages.run(lambda x: w * x, tf.constant(3.0))
    same = stages.run(lambda t: t, t)
    z = stages.run(lambda a, b: v * a * b, t, same)  # v·(3w)²
    assert [float(g) for g in stages.gradients(z, [w, v])] == [180.0, 36.0]


def test_gradients_of_variables_no_stage_reads_are_none():
    w, unused = tf.Variable(2.0), tf.Variable(1.0)
    stages = BackwardStages()
    y = stages.run(lambda x: w * x, tf.constant(3.0))
    assert stages.gradients(y, [w, unused])[1] is None
    with pytest.raises(ValueError, match="no stage was run"):
        BackwardStages().gradients(y, [w])


@pytest.mark.parametrize("kwargs", [{}, {"with_cp": True}, {"frozen_stages": -1, "norm_eval": False}],
                         ids=["default", "with_cp", "batch_norm_training"])
def test_train_step_gradients_equal_one_tape_over_the_forward_pass(kwargs):
    """`SOLOv2._gradients` (the staged backward pass `train_step` uses) gives
    the gradients of one tape over `call(training=True)` and the loss."""
    images, y = synthetic_batch(n=2)
    model = tiny_model(**kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    images = tf.constant(images)
    y = {k: tf.constant(v) for k, v in y.items()}
    variables = model.trainable_variables

    @tf.function
    def staged():
        return model._gradients(images, y, variables)

    @tf.function
    def one_tape():
        with tf.GradientTape() as tape:
            loss_dict = model._replica_loss(images, y, training=True)
        return loss_dict, tape.gradient(loss_dict["loss"], variables)

    (got_loss, got), (want_loss, want) = staged(), one_tape()
    np.testing.assert_allclose(float(got_loss["loss"]), float(want_loss["loss"]), rtol=1e-6)
    assert all(g is not None for g in want)
    for v, a, b in zip(variables, got, want):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5 * np.abs(b).max() + 1e-9, err_msg=v.path)


def _step_gradients(model, images, y, step_executor):
    """The traced `_gradients` of `model` on one batch: the gradient tensors."""
    model.compile(optimizer=keras.optimizers.SGD(0.01), step_executor=step_executor)
    batch = (tf.constant(images), {k: tf.constant(v) for k, v in y.items()})
    fn = tf.function(lambda images, y: model._gradients(images, y, model.trainable_variables)[1])
    return [t.op.inputs[0] for t in fn.get_concrete_function(*batch).graph.outputs]  # inside the output Identities


@pytest.mark.parametrize("dtype, executor, staged", [
    ("float32", "parallel", True),
    ("mixed_bfloat16", "parallel", False),
    ("float32", "sequential", False),
])
def test_the_trunk_differentiates_after_the_head_in_float32_with_the_default_executor(dtype, executor, staged):
    """Staged where it lowers the peak (Winograd convs, the default executor):
    the backbone's gradients wait for the category branch's. In bfloat16 and
    under the sequential executor one tape leaves them unordered."""
    images, y = synthetic_batch(n=2)
    model = tiny_model(dtype=dtype)
    grads = dict(zip([v.path for v in model.trainable_variables], _step_gradients(model, images, y, executor)))
    trunk = grads[model.backbone.get_layer("stack3_block0_2_conv").kernel.path]
    head = grads[model.instance_head.conv_cls.kernel.path]
    assert (head.op in _ancestors(trunk)) == staged
