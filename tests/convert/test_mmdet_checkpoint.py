import json

import numpy as np
import pytest

import keras_solov2  # noqa: F401
from keras_solov2 import SOLOv2
from keras_solov2.convert import convert, load_into_model, load_state_dict, model_to_state_dict

MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])


def _tiny(fixtures_dir, name):
    z = np.load(fixtures_dir / "tiny" / f"solov2_tiny_{name}_forward.npz")
    sd = {k[len("state_dict/"):]: z[k] for k in z.files if k.startswith("state_dict/")}
    return z, sd


def _nchw(t):
    return np.asarray(t).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("name", ["r18", "r50"])
def test_tiny_models_reproduce_mmdet_forward_and_predictions(fixtures_dir, name):
    z, sd = _tiny(fixtures_dir, name)
    meta = json.loads(str(z["meta_json"]))
    assert meta["stage_blocks"] == [1, 1, 1, 1]
    model = convert(sd, norm_groups=8, max_candidates=5000)
    assert model.num_classes == 3 and model.stacked_convs == 2 and model.mask_out_channels == 32
    image = z["input_uint8_bgr_chw"][::-1].transpose(1, 2, 0)[None].astype("float32")  # BGR CHW -> RGB HWC
    normalised = ((image - MEAN) / STD).astype("float32")
    np.testing.assert_allclose(_nchw(normalised), z["input_normalized_rgb_nchw"], atol=1e-6)
    feats = model.feature_extractor(normalised)
    for i, f in enumerate(feats):
        np.testing.assert_allclose(_nchw(f), z[f"backbone_c{i + 2}"], rtol=0, atol=1e-4)
    for i, p in enumerate(model.neck(feats)):
        np.testing.assert_allclose(_nchw(p), z[f"fpn_p{i + 2}"], rtol=0, atol=1e-4)
    out = model(image)
    for lvl in range(5):
        np.testing.assert_allclose(_nchw(out["kernels"][lvl]), z[f"kernel_preds_l{lvl}"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(_nchw(out["cls_logits"][lvl]), z[f"cls_preds_l{lvl}"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(_nchw(out["mask_features"]), z["mask_feats"], rtol=0, atol=1e-4)

    res = model.postprocess(out, [(128, 160)], [(128, 160)])[0]
    np.testing.assert_array_equal(res["labels"], z["pred_labels"])
    np.testing.assert_allclose(res["scores"], z["pred_scores"], atol=1e-4)
    for a, b in zip(res["masks"].astype(bool), z["pred_masks"]):
        assert (a & b).sum() / (a | b).sum() > 0.99


def _keys_file(fixtures_dir):
    rows = []
    for line in (fixtures_dir / "solov2_r50_state_dict_keys.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype, _ = line.split("\t")
        rows.append((key, tuple(json.loads(shape.replace("(", "[").replace(")", "]").replace(",]", "]"))), dtype))
    return rows


def test_r50_checkpoint_layout_round_trips_bit_identical(fixtures_dir):
    rows = _keys_file(fixtures_dir)
    assert len(rows) == 386
    rng = np.random.default_rng(0)
    sd = {k: (rng.standard_normal(s).astype(np.float32) if d == "float32" else np.zeros(s, np.int64))
          for k, s, d in rows}
    model = SOLOv2.from_architecture("solov2_r50")
    load_into_model(model, sd)
    back = model_to_state_dict(model)
    expected = {k for k in sd if not k.endswith("num_batches_tracked")}
    assert set(back) == expected
    for k in expected:
        assert back[k].shape == sd[k].shape and np.array_equal(back[k], sd[k]), k
    # The architecture is read off the shapes alone.
    inferred = convert(sd)
    assert inferred.count_params() == model.count_params()


def test_mismatches_are_listed(fixtures_dir):
    _, sd = _tiny(fixtures_dir, "r18")
    model = convert(sd, norm_groups=8)
    bad = dict(sd)
    del bad["neck.fpn_convs.0.conv.bias"]
    bad["extra.weight"] = np.zeros(3, np.float32)
    bad["mask_head.conv_cls.bias"] = np.zeros(4, np.float32)
    with pytest.raises(ValueError) as err:
        load_into_model(model, bad)
    text = str(err.value)
    assert "neck.fpn_convs.0.conv.bias" in text and "extra.weight" in text
    assert "mask_head.conv_cls.bias: checkpoint (4,) vs model (3,)" in text


def test_pth_files_load_safely_and_corrupt_ones_fail_clearly(fixtures_dir, tmp_path):
    torch = pytest.importorskip("torch", reason="the convert extra (torch) is not installed")
    _, sd = _tiny(fixtures_dir, "r18")
    path = tmp_path / "solov2_tiny.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}}, path)
    loaded = load_state_dict(path)
    assert set(loaded) == set(sd)
    model = convert(path, norm_groups=8)
    assert model.num_classes == 3
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated.pth is not a readable PyTorch checkpoint"):
        load_state_dict(truncated)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_state_dict(tmp_path / "nothere.pth")
