import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_solov2  # noqa: F401
from keras_solov2 import SOLOv2
from tests.test_model import tiny_model


def synthetic_batch(n=4, h=128, w=160, max_instances=4, seed=0):
    """Flat-coloured rectangles/ellipses on a textured background; class = shape/colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    images = rng.uniform(90, 140, (n, h, w, 3)).astype("float32")
    masks = np.zeros((n, max_instances, h, w), np.uint8)
    labels = -np.ones((n, max_instances), np.int32)
    colours = [(230, 40, 40), (40, 200, 60), (50, 60, 230)]
    for i in range(n):
        for k in range(rng.integers(2, max_instances + 1)):
            c = int(rng.integers(0, 3))
            cy, cx = rng.integers(24, h - 24), rng.integers(24, w - 24)
            ry, rx = rng.integers(10, 22), rng.integers(10, 22)
            if c == 1:
                m = (yy - cy) ** 2 / ry**2 + (xx - cx) ** 2 / rx**2 <= 1
            else:
                m = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
            masks[i, :k] &= ~m[None]  # later instances occlude earlier ones
            masks[i, k] = m
            labels[i, k] = c
            images[i][m] = colours[c]
    return images, {"gt_masks": masks, "gt_labels": labels}


def test_overfits_four_images():
    keras.utils.set_random_seed(0)
    images, y = synthetic_batch()
    model = tiny_model(frozen_stages=-1, norm_eval=False)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), weight_decay=0.0)
    start = model.evaluate(images, y, verbose=0, return_dict=True)
    ds = tf.data.Dataset.from_tensors((images, y)).repeat(60)
    history = model.fit(ds, epochs=1, verbose=0)
    end = model.evaluate(images, y, verbose=0, return_dict=True)
    assert set(history.history) >= {"loss", "loss_cls", "loss_mask"}
    assert np.isfinite(end["loss"])
    assert end["loss"] < start["loss"] / 5, (start, end)


def test_a_keras_file_keeps_the_compile_settings_and_the_optimizer_state(tmp_path):
    # A `ModelCheckpoint("best.keras")` a user resumes from: the loaded model is
    # compiled as saved and its next step is the saved model's next step.
    images, y = synthetic_batch(n=2)
    model = tiny_model()
    model.compile(global_batch_size=2, steps_per_epoch=3, weight_decay=5e-4, grad_clip_norm=10.0,
                  micro_batch_size=1)
    model.fit(images, y, batch_size=2, epochs=2, verbose=0, shuffle=False)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.compiled
    assert (loaded.weight_decay, loaded.grad_clip_norm, loaded.micro_batch_size) == (5e-4, 10.0, 1)
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 2
    # Still in the warm-up: the schedule continues from step 2, not from 0.
    assert float(loaded.optimizer.learning_rate) == float(model.optimizer.learning_rate)
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables) > 2
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    model.fit(images, y, batch_size=2, epochs=1, verbose=0, shuffle=False)
    loaded.fit(images, y, batch_size=2, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.trainable_variables, loaded.trainable_variables):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert not keras.saving.load_model(tmp_path / "m.keras", compile=False).compiled


def test_keras_loss_arguments_and_sample_weights_are_errors():
    model = tiny_model()
    for kwargs in ({"loss": "mse"}, {"metrics": ["accuracy"]}):
        with pytest.raises(ValueError, match=f"takes no {next(iter(kwargs))}: the model computes"):
            model.compile(**kwargs)
    with pytest.warns(UserWarning, match="steps_per_epoch set the default SGD's"):
        model.compile(optimizer=keras.optimizers.SGD(0.01), steps_per_epoch=10)
    with pytest.warns(UserWarning, match="own weight_decay=0.004"):
        model.compile(optimizer=keras.optimizers.AdamW(1e-4))
    model.compile()
    images, y = synthetic_batch(n=2)
    with pytest.raises(ValueError, match="takes no sample weights"):
        model.fit(images, y, sample_weight=np.ones(2), batch_size=2, verbose=0)


def test_zero_instance_batch_trains_without_nan():
    images, y = synthetic_batch(n=2)
    y = {"gt_masks": np.zeros_like(y["gt_masks"]), "gt_labels": -np.ones_like(y["gt_labels"])}
    model = tiny_model()
    model.compile()
    history = model.fit(images, y, batch_size=2, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["loss_mask"] == [0.0, 0.0]
    assert all(np.all(np.isfinite(np.asarray(v))) for v in model.trainable_variables)


def test_non_finite_loss_names_the_batch_images_and_stops(capfd):
    images, y = synthetic_batch(n=2)
    images[1, 5, 5, 0] = np.nan  # a broken image
    x = {"images": images, "image_id": np.array([101, 202], np.int64)}
    model = tiny_model()
    model.compile()
    history = model.fit(tf.data.Dataset.from_tensors((x, y)).repeat(3), epochs=1, verbose=0,
                        callbacks=[keras.callbacks.TerminateOnNaN()])
    err = capfd.readouterr().err
    assert "non-finite loss" in err and "[101 202]" in err, err[-2000:]
    assert np.isnan(history.history["loss"][0])
    assert model.stop_training


def _bad_batches():
    images, y = synthetic_batch(n=2, h=64, w=64, max_instances=3)
    masks, labels = y["gt_masks"], y["gt_labels"]
    return [
        ("no labels", images, {"gt_masks": masks}, r"y is a dict with keys \['gt_masks'\]"),
        ("float labels", images, dict(y, gt_labels=labels.astype("float32")), "gt_labels must be integers"),
        # These trained on without a word: a mask/label slot mismatch.
        ("slots", images, dict(y, gt_masks=masks[:, :2]), "gt_masks has 2 instance slots but gt_labels 3"),
        # These failed inside TensorFlow ("None values not supported", a reshape).
        ("mask size", images, dict(y, gt_masks=masks[..., :32, :32]), "gt_masks are 32x32 but the images 64x64"),
        ("batch", images, {"gt_masks": masks[:1], "gt_labels": labels[:1]}, "batch sizes 2, 1 and 1"),
        ("not /32", images[:, :60, :60], dict(y, gt_masks=masks[..., :60, :60]), "multiples of 32, got 60x60"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_batches())))
def test_a_batch_that_breaks_the_contract_is_named_when_traced(case):
    name, images, y, message = _bad_batches()[case]
    model = tiny_model()
    model.compile()
    with pytest.raises(ValueError, match=message):
        _train_step_graph(model, images, y)


def _unknown_dims(images, y):
    """`(signature, batch)`: every dimension unknown but the channels, as a
    pipeline that pads per batch gives them."""
    sig = (tf.TensorSpec([None, None, None, 3], tf.float32),
           {k: tf.TensorSpec([None] * v.ndim, tf.as_dtype(v.dtype)) for k, v in y.items()})
    return sig, (tf.constant(images), {k: tf.constant(v) for k, v in y.items()})


@pytest.mark.parametrize("case", [2, 3, 4, 5])
def test_a_batch_that_breaks_the_contract_is_named_when_it_runs(case):
    """With dimensions unknown when traced, the same mismatches stop the step
    with the check's message rather than failing inside TensorFlow (before:
    "None values not supported" in the targets, for every batch)."""
    name, images, y, _ = _bad_batches()[case]
    message = {2: "different instance slot counts", 3: "gt_masks are not at the image size",
               4: "different batch sizes", 5: "padded to multiples of 32"}[case]
    model = tiny_model()
    model.compile()
    sig, batch = _unknown_dims(images, y)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        tf.function(model.test_step, input_signature=[sig])(batch)


def test_batches_of_several_sizes_train_in_one_relaxed_graph():
    """Batches padded per batch (mmdet's size_divisor=32): the step is traced
    with unknown H, W (a tf.data pipeline's element spec, or Keras relaxing
    the shapes after a second size), and that one graph computes the loss the
    static one does and trains on every size (before: "None values not
    supported" in the targets)."""
    batches = [synthetic_batch(n=2, h=h, w=w, max_instances=3, seed=i)
               for i, (h, w) in enumerate([(64, 96), (96, 64), (128, 96), (64, 96)])]
    model = tiny_model()
    model.compile()
    images, y = batches[2]
    static = model.test_step((tf.constant(images), {k: tf.constant(v) for k, v in y.items()}))
    model.reset_metrics()  # test_step reports running means
    sig, batch = _unknown_dims(images, y)
    relaxed = tf.function(model.test_step, input_signature=[sig])(batch)
    for key in ("loss", "loss_cls", "loss_mask"):
        np.testing.assert_allclose(float(relaxed[key]), float(static[key]), rtol=1e-5)
    assert float(static["loss_mask"]) > 0

    traces = []
    train_step = model.train_step
    model.train_step = lambda data: traces.append(1) or train_step(data)
    ds = tf.data.Dataset.from_generator(lambda: iter(batches), output_signature=sig)
    history = model.fit(ds.repeat(2).apply(tf.data.experimental.assert_cardinality(8)), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert int(model.optimizer.iterations) == 8
    assert len(traces) == 1
    # A second fit on another size: Keras traces the step again with relaxed shapes.
    model.fit(*batches[0], batch_size=2, epochs=1, verbose=0)
    model.fit(*batches[1], batch_size=2, epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == 10


def test_batches_padded_to_their_own_slot_count_train_in_one_graph():
    """make_dataset pads a batch's instance slots to its image with most
    instances: the step, traced with an unknown slot count, gives the loss of
    the same batch in more slots, and a batch without instances (0 slots;
    before: the targets gathered from an empty slot axis) the loss of
    padding-only slots; in the micro-batch step too."""
    images, y = synthetic_batch(n=2, h=64, w=96, max_instances=3)
    more = {"gt_masks": np.pad(y["gt_masks"], [(0, 0), (0, 5), (0, 0), (0, 0)]),
            "gt_labels": np.pad(y["gt_labels"], [(0, 0), (0, 5)], constant_values=-1)}
    empty = {"gt_masks": np.zeros((2, 0, 64, 96), np.uint8), "gt_labels": np.zeros((2, 0), np.int32)}
    negatives = {"gt_masks": np.zeros((2, 4, 64, 96), np.uint8), "gt_labels": -np.ones((2, 4), np.int32)}
    sig = (tf.TensorSpec([2, 64, 96, 3], tf.float32),
           {"gt_masks": tf.TensorSpec([2, None, 64, 96], tf.uint8), "gt_labels": tf.TensorSpec([2, None], tf.int32)})
    model = tiny_model()
    model.compile()
    step = tf.function(model.test_step, input_signature=[sig])

    def losses(y, step=step):
        model.reset_metrics()  # test_step reports running means
        out = step((tf.constant(images), {k: tf.constant(v) for k, v in y.items()}))
        return {k: float(out[k]) for k in ("loss", "loss_cls", "loss_mask")}

    few, padded = losses(y), losses(more)
    for key in few:
        np.testing.assert_allclose(few[key], padded[key], rtol=1e-6, err_msg=key)
    assert few["loss_mask"] > 0
    none, static_none, only_padding = losses(empty), losses(empty, model.test_step), losses(negatives)
    for got in (none, static_none):
        assert got["loss_mask"] == 0.0
        np.testing.assert_allclose(got["loss_cls"], only_padding["loss_cls"], rtol=1e-6)
    assert step.experimental_get_tracing_count() == 1

    model.compile(micro_batch_size=1)
    batches = [(images, empty), (images, y), (images, more)]
    ds = tf.data.Dataset.from_generator(lambda: iter(batches), output_signature=sig)
    history = model.fit(ds.apply(tf.data.experimental.assert_cardinality(3)), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0]) and int(model.optimizer.iterations) == 3


def test_unknown_sizes_under_xla_are_named_when_traced():
    """XLA needs the mask-pair cap and the tilings static (before: a TopKV2
    conversion error from inside the compiler)."""
    images, y = synthetic_batch(n=2, h=64, w=64, max_instances=3)
    model = tiny_model()
    model.compile(jit_compile=True)
    sig, batch = _unknown_dims(images, y)
    with pytest.raises(ValueError, match="jit_compile=True needs batches of one static size"):
        tf.function(model.train_step, input_signature=[sig])(batch)


def test_masks_that_are_not_0_1_stop_the_step():
    images, y = synthetic_batch(n=2, h=64, w=64, max_instances=3)
    model = tiny_model()
    as_batch = lambda y: (tf.constant(images), {k: tf.constant(v) for k, v in y.items()})  # noqa: E731
    model.test_step(as_batch(y))
    model.test_step((images, y))  # NumPy arrays too (their dtype has no `is_floating`)
    # A 0/255 PNG read as is: the stride-4 rescale would count every nonzero tap.
    with pytest.raises(tf.errors.InvalidArgumentError, match="gt_masks must hold 0/1"):
        model.test_step(as_batch(dict(y, gt_masks=y["gt_masks"] * 255)))


def _train_step_graph(model, images, y):
    """The traced graph of `model.train_step` on one batch."""
    batch = (tf.constant(images), {k: tf.constant(v) for k, v in y.items()})
    return tf.function(model.train_step).get_concrete_function(batch).graph


def _conv_ops_in_train_step(model, images, y):
    return sum(op.type == "Conv2D" for op in _train_step_graph(model, images, y).get_operations())


def test_with_cp_recomputes_backbone_stages_and_trains_the_same():
    """with_cp: the trainable stages' forward runs again in the backward pass
    (more Conv2D ops in the step's graph), and one SGD step gives the same
    loss and weights as without it."""
    images, y = synthetic_batch(n=2)
    plain = tiny_model()
    checkpointed = tiny_model(with_cp=True)
    checkpointed.set_weights(plain.get_weights())
    for model in (plain, checkpointed):
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), grad_clip_norm=None)
    # Stages 2-4 of the tiny R18 (1 block each: 2 convs + projection) again.
    assert _conv_ops_in_train_step(checkpointed, images, y) == _conv_ops_in_train_step(plain, images, y) + 9
    bn = checkpointed.backbone.get_layer("stack2_block0_1_bn")
    moving_mean = keras.ops.convert_to_numpy(bn.moving_mean)
    logs = [model.train_on_batch(images, y, return_dict=True) for model in (plain, checkpointed)]
    np.testing.assert_allclose(logs[1]["loss"], logs[0]["loss"], rtol=1e-5)
    for a, b in zip(plain.trainable_variables, checkpointed.trainable_variables):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6, err_msg=a.path)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn.moving_mean), moving_mean)
    assert SOLOv2.from_config(checkpointed.get_config()).with_cp


def assert_same_update(model, reference, before):
    """`model`'s weights moved from `before` as `reference`'s did, and more
    than half of them moved at all."""
    moved = 0
    for a, b, v0 in zip(reference.trainable_variables, model.trainable_variables, before):
        delta = np.asarray(a) - v0
        moved += np.abs(delta).max() > 1e-7
        # atol: the weights' own rounding (a few ulps of |w| ≈ 0.1) over the update's.
        np.testing.assert_allclose(np.asarray(b) - v0, delta, rtol=1e-3, atol=1e-3 * np.abs(delta).max() + 3e-8,
                                   err_msg=a.path)
    assert moved > len(before) // 2


@pytest.mark.parametrize("micro_batch_size", [1, 3])
def test_micro_batches_give_the_batch_update(micro_batch_size):
    """compile(micro_batch_size=...): the step's micro-batches (3 of 1 image
    in a static batch of 3, or 3 + 1 images in a batch of 4 whose size is not
    static) give the one-pass step's loss and update, with weight decay and a
    clip norm small enough to bind on the summed gradient."""
    images, y = synthetic_batch(n=4 if micro_batch_size == 3 else 3)
    plain, micro = tiny_model(), tiny_model()
    micro.set_weights(plain.get_weights())
    for model, size in ((plain, None), (micro, micro_batch_size)):
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), weight_decay=1e-4,
                      grad_clip_norm=0.5, micro_batch_size=size)
    before = [np.asarray(v) for v in plain.trainable_variables]
    ds = tf.data.Dataset.from_tensor_slices((images, y)).batch(len(images), drop_remainder=micro_batch_size == 1)
    logs = [model.fit(ds, epochs=1, verbose=0).history for model in (plain, micro)]
    for key in ("loss", "loss_cls", "loss_mask"):
        assert logs[0][key][0] > 0
        np.testing.assert_allclose(logs[1][key], logs[0][key], rtol=1e-5, err_msg=key)
    graph = _train_step_graph(micro, images, y)
    assert any(op.type in ("While", "StatelessWhile") for op in graph.get_operations())
    assert_same_update(micro, plain, before)


def test_auto_micro_batch_size_where_it_costs_no_time():
    """compile()'s default, micro_batch_size="auto": in float32 on the CPU
    (the head's convs by Winograd) with norm_eval, the default executor and
    no XLA, one image per pass when padded images have at least 512×512
    pixels, from the static image size or in the step; otherwise the whole
    batch, without the errors an explicit size would raise."""
    from keras_solov2.models.solov2 import AUTO_MICRO_BATCH_PIXELS

    assert AUTO_MICRO_BATCH_PIXELS == 512 * 512
    model = tiny_model()
    model.compile()
    assert model.micro_batch_size == "auto" and model.instance_head.uses_winograd()
    for (h, w), size in (((512, 512), 1), ((800, 1344), 1), ((448, 608), 1), ((480, 544), None), ((128, 160), None)):
        assert model._micro_batch_size_for(tf.zeros((2, h, w, 3))) == size, (h, w)

    @tf.function(input_signature=[tf.TensorSpec((None, None, None, 3))])
    def dynamic(images):
        return model._micro_batch_size_for(images)

    assert [int(dynamic(tf.zeros((3, h, w, 3)))) for h, w in ((800, 1344), (512, 512), (480, 544))] == [1, 1, 3]
    one_pass = [(tiny_model(), dict(step_executor="sequential")), (tiny_model(), dict(jit_compile=True)),
                (tiny_model(), dict(micro_batch_size=None)),
                (tiny_model(frozen_stages=-1, norm_eval=False), {}),
                (tiny_model(dtype="mixed_bfloat16"), {})]
    for other, kwargs in one_pass:
        other.compile(**kwargs)
        assert other._micro_batch_size_for(tf.zeros((2, 512, 512, 3))) is None, kwargs
    model.compile(micro_batch_size=2)
    assert model._micro_batch_size_for(tf.zeros((4, 512, 512, 3))) == 2


@pytest.mark.parametrize("static", [True, False])
def test_auto_micro_batches_give_the_batch_update(monkeypatch, static):
    """With the threshold at 128×160 pixels, "auto" runs a batch of 3 one
    image at a time (a `tf.while_loop` in the step) and gives the one-pass
    step's loss and update, for a static image size and for one known only
    in the step (the size per pass then a tensor)."""
    monkeypatch.setattr("keras_solov2.models.solov2.AUTO_MICRO_BATCH_PIXELS", 128 * 160)
    images, y = synthetic_batch(n=3)
    plain, auto = tiny_model(), tiny_model()
    auto.set_weights(plain.get_weights())
    for model, size in ((plain, None), (auto, "auto")):
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), weight_decay=1e-4,
                      grad_clip_norm=0.5, micro_batch_size=size)
    before = [np.asarray(v) for v in plain.trainable_variables]
    ds = tf.data.Dataset.from_tensors((images, y))
    if not static:
        ds = tf.data.Dataset.from_generator(
            lambda: iter([(images, y)]),
            output_signature=(tf.TensorSpec((3, None, None, 3), tf.float32),
                              {"gt_masks": tf.TensorSpec((3, 4, None, None), tf.uint8),
                               "gt_labels": tf.TensorSpec((3, 4), tf.int32)})
        ).apply(tf.data.experimental.assert_cardinality(1))
    logs = [model.fit(ds, epochs=1, verbose=0).history for model in (plain, auto)]
    for key in ("loss", "loss_cls", "loss_mask"):
        np.testing.assert_allclose(logs[1][key], logs[0][key], rtol=1e-5, err_msg=key)
    spec = ds.element_spec
    graph = tf.function(auto.train_step).get_concrete_function(spec).graph
    assert any(op.type in ("While", "StatelessWhile") for op in graph.get_operations())
    assert not any(op.type in ("While", "StatelessWhile")
                   for op in tf.function(plain.train_step).get_concrete_function(spec).graph.get_operations())
    assert_same_update(auto, plain, before)


def test_micro_batch_size_needs_norm_eval_and_a_positive_int():
    with pytest.raises(ValueError, match="micro_batch_size needs norm_eval=True"):
        tiny_model(frozen_stages=-1, norm_eval=False).compile(micro_batch_size=1)
    with pytest.raises(ValueError, match="micro_batch_size must be 'auto', a positive int or None \\(the whole batch\\), got 0"):
        tiny_model().compile(micro_batch_size=0)


def test_with_cp_needs_norm_eval():
    with pytest.raises(ValueError, match="with_cp=True needs norm_eval=True"):
        tiny_model(with_cp=True, frozen_stages=-1, norm_eval=False)


def test_train_step_traces_once():
    """`compile` builds the optimizer, so the step's first trace creates no
    variables: a `tf.function` that does traces twice and keeps both graphs
    (≈ 0.14 GB for R50's; `fit` without a distribution strategy leaves
    building it to that first trace)."""
    images, y = synthetic_batch(n=2)
    model = tiny_model()
    model.compile()
    assert model.optimizer.built
    step = tf.function(model.train_step)
    step((tf.constant(images), {k: tf.constant(v) for k, v in y.items()}))
    assert step.experimental_get_tracing_count() == 1
    model.fit(images, y, batch_size=2, epochs=1, verbose=0)  # still trains after the early build
    assert int(model.optimizer.iterations) == 2
    # Unfrozen after compile: a clear error naming the fix, then fine after compiling again.
    model.mask_feature_head.trainable = False
    model.compile()
    model.mask_feature_head.trainable = True
    with pytest.raises(ValueError, match=r"became trainable after `compile\(\)` .*mask_feature_head.*compile"):
        model.fit(images, y, batch_size=2, epochs=1, verbose=0)
    model.compile()
    model.fit(images, y, batch_size=2, epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == 1


def test_optimizer_waits_for_the_gradients():
    """SGD's momentum slots are read only after every gradient exists. Read
    earlier (nothing else orders them), momentum·m is computed at the start of
    the step and held through forward and backward: ≈ 0.2 GB for R50, as much
    again for the weight decay terms in the same block."""
    images, y = synthetic_batch(n=2)
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    graph = _train_step_graph(model, images, y)
    handles = {id(v.value.handle) for v in model.optimizer.variables if "momentum" in v.path}
    slots = [inner for outer, inner in graph.captures if id(outer) in handles]
    assert len(slots) == len(model.trainable_variables)

    def after_a_gradient(op, seen):
        for parent in list(op.control_inputs) + [t.op for t in op.inputs]:
            if parent.name.startswith("gradient_tape/"):
                return True
            if parent not in seen:
                seen.add(parent)
                if after_a_gradient(parent, seen):
                    return True
        return False

    reads = [op for slot in slots for op in slot.consumers() if op.type == "ReadVariableOp"]
    assert reads and all(after_a_gradient(op, set()) for op in reads)
    # Through one NoOp: a control edge from every gradient to every op of the
    # update made the R50 step's graph ~0.5 GB larger.
    fan_in = [op.name for op in graph.get_operations() if len(op.control_inputs) >= len(slots) // 2]
    assert len(fan_in) <= 2, fan_in[:5]


def test_train_step_evaluates_the_final_kernel_conv_at_the_loss_cells_only():
    """The loss reads the kernels of a few positive cells: `train_step` runs
    `model(images, dense_kernels=False)` and the final kernel conv becomes a
    gather + matmul at those cells. Same loss and gradients as the dense conv,
    on the trimmed (default) and the static (XLA) shapes."""
    images, y = synthetic_batch(n=2)
    model = tiny_model()
    # Larger final-conv weights than the init's (std 0.01): masks that are not all alike.
    rng = np.random.default_rng(5)
    conv_kernel = model.instance_head.conv_kernel
    conv_kernel.kernel.assign(rng.normal(0, 0.1, conv_kernel.kernel.shape).astype("float32"))
    for static in (False, True):
        model.jit_compile = static  # the static-shape path, run eagerly here
        results = {}
        for dense in (True, False):
            with tf.GradientTape() as tape:
                outputs = model(images, training=True, dense_kernels=dense)
                loss = model.compute_solov2_loss(outputs, y["gt_masks"], y["gt_labels"])
            results[dense] = loss, tape.gradient(loss["loss"], model.trainable_variables)
        (dense_loss, dense_grads), (sparse_loss, sparse_grads) = results[True], results[False]
        assert float(dense_loss["num_pos"]) > 0 and float(dense_loss["loss_mask"]) > 0
        for key in ("loss", "loss_cls", "loss_mask", "num_pos"):
            np.testing.assert_allclose(float(sparse_loss[key]), float(dense_loss[key]), rtol=1e-5)
        for v, a, b in zip(model.trainable_variables, dense_grads, sparse_grads):
            assert b is not None, v.path
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-6, err_msg=v.path)
    # In the step's graph the final kernel conv's weight feeds no convolution (direct convs, so
    # that the dense path would be a Conv2D: Winograd's also starts with a Reshape).
    model = tiny_model(winograd=False)
    model.compile(optimizer=keras.optimizers.SGD(0.01))

    def users_of_the_final_kernel_conv(graph):
        handle = id(model.instance_head.conv_kernel.kernel.value.handle)
        (captured,) = [inner for outer, inner in graph.captures if id(outer) == handle]
        reads = [op for op in captured.consumers() if op.type == "ReadVariableOp"]
        return {c.type for op in reads for t in op.outputs for c in t.consumers()}

    dense_graph = tf.function(lambda x: model(x, dense_kernels=True)).get_concrete_function(images).graph
    assert "Conv2D" in users_of_the_final_kernel_conv(dense_graph)  # what the check below would see
    users = users_of_the_final_kernel_conv(_train_step_graph(model, images, y))
    assert "Reshape" in users, users
    assert not any(u.startswith("Conv2D") for u in users), users
