import time

import numpy as np
import pytest

import keras_solov2  # noqa: F401
from keras_solov2 import SOLOv2
from keras_solov2.models import presets
from tests.test_model import tiny_model


def test_registry_matches_mmdet_release():
    assert set(presets.PRESETS) == {"resnet50_coco", "resnet50_1x_coco", "resnet101_coco",
                                    "light_resnet18_coco", "light_resnet34_coco", "light_resnet50_coco"}
    assert presets.PRESETS["resnet50_coco"]["url"].endswith("solov2_r50_fpn_3x_coco_20220512_125856-fed092d4.pth")
    assert presets.PRESETS["resnet50_coco"]["mask_ap"] == 37.5
    assert presets.PRESETS["resnet50_1x_coco"]["mask_ap"] == 34.8
    assert len(presets.COCO_CLASSES) == 80 and presets.COCO_CLASSES[-1] == "toothbrush"


def test_offline_named_preset_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(presets.socket, "create_connection", unreachable)
    start = time.time()
    with pytest.raises(ConnectionError) as err:
        SOLOv2.from_preset("light_resnet18_coco")
    assert time.time() - start < 5
    text = str(err.value)
    assert "solov2_light_r18_fpn_3x_coco_20220511_083717-75fa355b.pth" in text
    assert "from_preset('/path/to/" in text and str(tmp_path) in text


def test_cached_checkpoint_with_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    target = presets.cache_dir() / "solov2_light_r18_fpn_3x_coco_20220511_083717-75fa355b.pth"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the checkpoint")
    with pytest.raises(ValueError, match="does not match the sha256 prefix 75fa355b"):
        presets.fetch_checkpoint("light_resnet18_coco")


def test_save_to_preset_round_trip_and_new_classes(tmp_path):
    model = tiny_model(class_names=["a", "b", "c"])
    for v in model.weights:
        v.assign(np.asarray(v) + np.random.default_rng(2).normal(0, 0.01, v.shape).astype(v.dtype))
    path = model.save_to_preset(tmp_path / "tiny_preset")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "metadata.json", "model.weights.h5"]
    images = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype("float32")
    loaded = SOLOv2.from_preset(path)
    assert loaded.class_names == ["a", "b", "c"]
    np.testing.assert_array_equal(np.asarray(loaded(images)["mask_features"]), np.asarray(model(images)["mask_features"]))
    # Saving again replaces the folder atomically.
    model.save_to_preset(path)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny_preset"]
    # Fine-tuning: 5 classes, only the class-logit conv is new.
    tuned = SOLOv2.from_preset(path, num_classes=5)
    assert tuned.instance_head.conv_cls.kernel.shape[-1] == 5
    np.testing.assert_array_equal(np.asarray(tuned.instance_head.conv_kernel.kernel),
                                  np.asarray(model.instance_head.conv_kernel.kernel))
    np.testing.assert_array_equal(np.asarray(tuned(images)["mask_features"]), np.asarray(model(images)["mask_features"]))


def test_local_pth_preset(fixtures_dir, tmp_path):
    torch = pytest.importorskip("torch", reason="the convert extra (torch) is not installed")
    z = np.load(fixtures_dir / "tiny" / "solov2_tiny_r18_forward.npz")
    sd = {k[len("state_dict/"):]: torch.from_numpy(np.array(z[k])) for k in z.files if k.startswith("state_dict/")}
    torch.save({"state_dict": sd}, tmp_path / "tiny.pth")
    model = SOLOv2.from_preset(str(tmp_path / "tiny.pth"), norm_groups=8)
    image = z["input_uint8_bgr_chw"][::-1].transpose(1, 2, 0)[None].astype("float32")
    np.testing.assert_allclose(np.asarray(model(image)["mask_features"]).transpose(0, 3, 1, 2), z["mask_feats"], atol=1e-4)
