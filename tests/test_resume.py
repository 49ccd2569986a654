"""A training subprocess killed with SIGKILL mid-epoch resumes to the same weights."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    import keras, tensorflow as tf
    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    import keras_solov2  # noqa: F401
    from keras_solov2.data.coco_folder import describe
    from keras_solov2.training import train
    from tests.test_model import tiny_model

    data, out, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class Marker(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            print(f"STEP {step}", flush=True)
            if step == kill_at:
                print("READY", flush=True)
                time.sleep(600)

    info = describe(f"{data}/ann.json", data)
    model = tiny_model(frozen_stages=-1, norm_eval=False)
    train(model, info, info.image_ids, [], out, epochs=4, batch_size=2, scale=(64, 64), max_instances=4,
          steps_per_epoch=2, warmup_steps=2, seed=3,
          optimizer=keras.optimizers.SGD(keras.optimizers.schedules.PiecewiseConstantDecay([5], [0.02, 0.005]),
                                         momentum=0.9),
          callbacks=[Marker()])
    np.save(f"{out}/final_weights.npy", np.concatenate([np.ravel(v) for v in model.get_weights()]))
    print("DONE", flush=True)
    """
)


def _write_dataset(path):
    from keras_solov2.demo import coco_ground_truth, make_shapes

    images, masks, labels = make_shapes(6, size=64, max_instances=3, seed=1)
    coco = coco_ground_truth(masks, labels)
    for info, image in zip(coco.dataset["images"], images):
        Image.fromarray(image).save(path / info["file_name"])
    (path / "ann.json").write_text(json.dumps(coco.dataset))


def _run(data, out, kill_at=-1):
    cmd = [sys.executable, "-c", CHILD, str(data), str(out), str(kill_at)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    steps = []
    for line in proc.stdout:
        if line.startswith("STEP"):
            steps.append(int(line.split()[1]))
        if line.strip() == "READY":
            proc.send_signal(signal.SIGKILL)  # no chance to clean up or save
            proc.wait()
            return steps, None
    proc.wait(timeout=600)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    return steps, np.load(out / "final_weights.npy")


def test_sigkill_mid_epoch_resumes_to_the_same_weights(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write_dataset(data)
    steps, reference = _run(data, tmp_path / "straight")
    assert steps == list(range(1, 9))
    assert json.loads((tmp_path / "straight" / "split.json").read_text()) == {"train": list(range(1, 7)), "val": []}

    out = tmp_path / "killed"
    steps, _ = _run(data, out, kill_at=5)  # epoch 3 of 4, after its first step
    assert steps == [1, 2, 3, 4, 5]
    assert (out / "backup").exists()
    steps, resumed = _run(data, out)
    # Resumed from the backup of epoch 2 (step 4): steps 5..8 run again, not 1..8.
    assert steps == [5, 6, 7, 8]
    np.testing.assert_allclose(resumed, reference, rtol=1e-5, atol=1e-6)
