"""MirroredStrategy on 2 logical CPU devices equals one device on the same global batch,
with and without micro-batches within each replica's step; the sequential step is for one
replica."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import keras_solov2  # noqa: F401
    from tests.test_model import tiny_model
    from tests.test_training import synthetic_batch

    images, y = synthetic_batch(n=4, h=96, w=128)
    result = {}
    for mode in ("single", "mirrored", "mirrored_micro"):
        keras.utils.set_random_seed(0)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]) if mode != "single" \\
            else tf.distribute.get_strategy()
        with strategy.scope():
            model = tiny_model(frozen_stages=-1, norm_eval=True)
            # mmdet's weight decay, and a clip norm small enough to bind: both
            # must act on the global batch's gradient, not on each replica's.
            model.compile(optimizer=keras.optimizers.SGD(0.01), weight_decay=1e-4, grad_clip_norm=0.5,
                          micro_batch_size=1 if mode == "mirrored_micro" else None)
        before = [np.asarray(v).ravel()[:50] for v in model.trainable_variables[-6:]]
        ds = tf.data.Dataset.from_tensor_slices((images, y)).batch(4)
        hist = model.fit(ds, epochs=1, verbose=0)
        result[mode] = {"loss": hist.history["loss"][0],
                        "deltas": [(np.asarray(v).ravel()[:50] - b).tolist()
                                   for v, b in zip(model.trainable_variables[-6:], before)]}
        result[mode]["replicas"] = strategy.num_replicas_in_sync
    # compile(step_executor="sequential") under replicas, which must run at
    # once: refused; a .keras file saved with it loads, trained in parallel.
    saved = tiny_model()
    saved.compile(step_executor="sequential")
    saved.save(sys.argv[1] + "/sequential.keras")
    import warnings
    with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
        try:
            tiny_model().compile(step_executor="sequential")
        except ValueError as error:
            result["sequential_refused"] = str(error)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = keras.saving.load_model(sys.argv[1] + "/sequential.keras")
        result["loaded_executor"] = loaded.step_executor
        result["load_warnings"] = [str(w.message) for w in caught]
    print("RESULT" + json.dumps(result))
    """
)


def test_mirrored_two_cpus_equals_single_device(tmp_path):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=root, capture_output=True, text=True,
                          timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, proc.stderr[-3000:]
    r = json.loads(line[0][len("RESULT"):])
    import numpy as np

    assert r["single"]["replicas"] == 1
    assert "2 tf.distribute replicas, which must run at once" in r.get("sequential_refused", ""), r
    assert r["loaded_executor"] == "parallel"
    assert any("replicas" in w and "trains with step_executor='parallel'" in w for w in r["load_warnings"]), r
    for mode in ("mirrored", "mirrored_micro"):
        assert r[mode]["replicas"] == 2
        assert abs(r[mode]["loss"] - r["single"]["loss"]) < 1e-4 * abs(r["single"]["loss"]), mode
        # The update itself (not just the weights) agrees: gradients are summed
        # over replicas (and micro-batches) of a loss normalised over the global batch.
        for a, b in zip(r[mode]["deltas"], r["single"]["deltas"]):
            assert np.abs(b).max() > 1e-6
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max(), err_msg=mode)
