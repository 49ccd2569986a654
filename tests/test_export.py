import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tests.test_model import tiny_model


@pytest.fixture(scope="module")
def detecting_model():
    model = tiny_model(max_per_img=10)
    # Class-logit bias 0 (scores ~0.5): detections on every level.
    bias = model.instance_head.conv_cls.bias
    bias.assign(np.zeros(bias.shape, "float32"))
    return model


def test_export_serves_predict_at_any_size(detecting_model, tmp_path):
    images = np.random.default_rng(0).uniform(0, 255, (2, 70, 90, 3)).astype("float32")
    path = detecting_model.export(tmp_path / "serving", verbose=False)
    assert path == tmp_path / "serving" and (path / "saved_model.pb").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["serving"]  # no temporary folder left
    want = detecting_model.predict(images, verbose=0)
    assert want["num_detections"].min() > 0
    loaded = tf.saved_model.load(str(path))  # held: its variables die with it
    got = loaded.serve(tf.constant(images))
    for key in ("masks", "labels", "num_detections"):
        np.testing.assert_array_equal(np.asarray(got[key]), want[key], err_msg=key)
    np.testing.assert_allclose(np.asarray(got["scores"]), want["scores"], rtol=1e-5, atol=1e-7)

    # A process that never imports keras_solov2 serves it, at another size too.
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf, sys
        loaded = tf.saved_model.load({str(path)!r})
        serve = loaded.serve
        out = serve(tf.constant(np.load({str(tmp_path / "images.npy")!r})))
        assert sorted(out) == ["labels", "masks", "num_detections", "scores"], sorted(out)
        assert out["masks"].shape == (2, 10, 70, 90) and out["masks"].dtype == tf.uint8
        assert serve(tf.zeros((1, 128, 96, 3)))["masks"].shape == (1, 10, 128, 96)
        print(int(np.sum(out["num_detections"])), "keras_solov2" in sys.modules)
    """)
    np.save(tmp_path / "images.npy", images)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-2:] == [str(int(want["num_detections"].sum())), "False"], run.stdout


def test_export_replaces_a_folder_and_names_other_formats(detecting_model, tmp_path):
    old = tmp_path / "serving"
    old.mkdir()
    (old / "stale.txt").write_text("from an earlier export")
    detecting_model.export(old, verbose=False)
    assert not (old / "stale.txt").exists() and (old / "saved_model.pb").exists()
    with pytest.raises(ValueError, match="format='tf_saved_model'.*got 'onnx'"):
        detecting_model.export(tmp_path / "m.onnx", format="onnx")
