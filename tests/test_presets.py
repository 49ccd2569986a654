import time

import numpy as np
import pytest

import keras_solov2  # noqa: F401
from keras_solov2 import SOLOv2
from keras_solov2.models import presets
from tests.optional import import_or_skip
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


def test_corrupt_cached_checkpoint_is_fetched_again_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    target = presets.checkpoint_path("light_resnet18_coco")
    assert target.name == "solov2_light_r18_fpn_3x_coco_20220511_083717-75fa355b.pth"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the checkpoint")
    monkeypatch.setattr(presets.socket, "create_connection", _unreachable)
    with pytest.warns(UserWarning, match="does not start with 75fa355b"), pytest.raises(ConnectionError) as err:
        presets.fetch_checkpoint("light_resnet18_coco")
    assert "interrupted or corrupt" in str(err.value)


def _unreachable(*args, **kwargs):
    raise OSError("Name or service not known")


@pytest.fixture
def local_checkpoint_server(fixtures_dir, tmp_path):
    """A tiny mmdet checkpoint served over HTTP on 127.0.0.1, named as mmdet names its files."""
    import functools
    import hashlib
    import http.server
    import threading

    torch = import_or_skip("torch", "pip install 'keras-solov2[convert]'")
    z = np.load(fixtures_dir / "tiny" / "solov2_tiny_r18_forward.npz")
    sd = {k[len("state_dict/"):]: torch.from_numpy(np.array(z[k])) for k in z.files if k.startswith("state_dict/")}
    served = tmp_path / "served"
    served.mkdir()
    raw = served / "raw.pth"
    torch.save({"meta": {"dataset_meta": {"classes": ["a", "b", "c"]}}, "state_dict": sd}, raw)
    sha = hashlib.sha256(raw.read_bytes()).hexdigest()
    name = f"solov2_tiny_r18_20990101_000000-{sha[:8]}.pth"
    raw.rename(served / name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{name}"
    yield dict(url=url, sha=sha, served=served / name, z=z, server=server)
    server.shutdown()


def test_named_preset_downloads_checks_converts_and_caches(local_checkpoint_server, tmp_path, monkeypatch):
    srv = local_checkpoint_server
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(presets.PRESETS, "tiny_test_coco", dict(
        architecture=None, mmdet_config="tiny", url=srv["url"], sha256_prefix=srv["sha"][:8], mask_ap=0.0,
        test_scale=(128, 160), description="test", config={"norm_groups": 8}, class_names=["a", "b", "c"]))
    model = SOLOv2.from_preset("tiny_test_coco")
    checkpoint = presets.checkpoint_path("tiny_test_coco")
    assert checkpoint.read_bytes() == srv["served"].read_bytes()
    assert not list(checkpoint.parent.glob("*.part"))
    converted = presets.converted_preset_dir("tiny_test_coco")
    assert sorted(p.name for p in converted.iterdir()) == ["config.json", "metadata.json", "model.weights.h5"]
    z = srv["z"]
    image = z["input_uint8_bgr_chw"][::-1].transpose(1, 2, 0)[None].astype("float32")
    np.testing.assert_allclose(np.asarray(model(image)["mask_features"]).transpose(0, 3, 1, 2), z["mask_feats"],
                               atol=1e-4)
    assert model.class_names == ["a", "b", "c"]
    # Later calls need neither the network nor the .pth: the converted preset is cached.
    srv["server"].shutdown()
    checkpoint.unlink()
    monkeypatch.setattr(presets.socket, "create_connection", _unreachable)
    again = SOLOv2.from_preset("tiny_test_coco", num_classes=2)
    assert again.num_classes == 2
    np.testing.assert_array_equal(np.asarray(again(image)["mask_features"]), np.asarray(model(image)["mask_features"]))


def test_download_with_the_wrong_hash_is_not_kept(local_checkpoint_server, tmp_path, monkeypatch):
    srv = local_checkpoint_server
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(presets.PRESETS, "tiny_test_coco", dict(
        architecture=None, mmdet_config="tiny", url=srv["url"], sha256_prefix="00000000", mask_ap=0.0,
        test_scale=(128, 160), description="test", config={"norm_groups": 8}, class_names=["a", "b", "c"]))
    with pytest.raises(ValueError, match="not 00000000"):
        presets.fetch_checkpoint("tiny_test_coco")
    assert not presets.checkpoint_path("tiny_test_coco").exists()
    assert not list(presets.checkpoint_path("tiny_test_coco").parent.glob("*.part"))


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
    torch = import_or_skip("torch", "pip install 'keras-solov2[convert]'")
    z = np.load(fixtures_dir / "tiny" / "solov2_tiny_r18_forward.npz")
    sd = {k[len("state_dict/"):]: torch.from_numpy(np.array(z[k])) for k in z.files if k.startswith("state_dict/")}
    torch.save({"state_dict": sd}, tmp_path / "tiny.pth")
    model = SOLOv2.from_preset(str(tmp_path / "tiny.pth"), norm_groups=8)
    image = z["input_uint8_bgr_chw"][::-1].transpose(1, 2, 0)[None].astype("float32")
    np.testing.assert_allclose(np.asarray(model(image)["mask_features"]).transpose(0, 3, 1, 2), z["mask_feats"], atol=1e-4)


def test_keras_file_as_preset_for_fine_tuning(tmp_path):
    model = tiny_model(class_names=["a", "b", "c"])
    model.save(tmp_path / "m.keras")
    tuned = SOLOv2.from_preset(str(tmp_path / "m.keras"), num_classes=2, class_names=["x", "y"], frozen_stages=4)
    assert tuned.num_classes == 2 and tuned.class_names == ["x", "y"]
    frozen = [w for w in tuned.backbone.weights if w.path.startswith(("conv1", "stack3"))]
    assert tuned.frozen_stages == 4 and frozen and not any(w.trainable for w in frozen)
    assert model.backbone.get_layer("stack3_block0_1_conv").trainable  # the saved model's was not frozen
    np.testing.assert_array_equal(np.asarray(tuned.instance_head.conv_kernel.kernel),
                                  np.asarray(model.instance_head.conv_kernel.kernel))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SOLOv2.from_preset(str(tmp_path / "missing.keras"))
