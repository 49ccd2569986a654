import keras
import numpy as np
import tensorflow as tf

import keras_solov2  # noqa: F401
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
