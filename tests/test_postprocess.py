import numpy as np

import keras_solov2  # noqa: F401
from keras_solov2 import SOLOv2
from tests import mmdet_reference as ref


def _model(num_classes, **kw):
    return SOLOv2(backbone="resnet18", num_classes=num_classes, fpn_channels=32, feat_channels=32,
                  stacked_convs=1, mask_feat_channels=16, mask_out_channels=kw.pop("e", 256),
                  norm_groups=8, **kw)


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_matches_mmdet_fixture(fixtures_dir):
    z = np.load(fixtures_dir / "solov2_predict_case0.npz")
    outputs = {
        "cls_logits": [z[f"cls_preds_l{lvl}"].transpose(0, 2, 3, 1) for lvl in range(5)],
        "kernels": [z[f"kernel_preds_l{lvl}"].transpose(0, 2, 3, 1) for lvl in range(5)],
        "mask_features": z["mask_feats"].transpose(0, 2, 3, 1),
    }
    res = _model(80).postprocess(outputs, [(250, 310)], [(500, 620)])[0]
    np.testing.assert_array_equal(res["labels"], z["out_labels"])
    np.testing.assert_allclose(res["scores"], z["out_scores"], rtol=0, atol=1e-5)
    assert res["masks"].shape == (100, 500, 620) and res["masks"].dtype == np.uint8
    ious = [_iou(a.astype(bool), b) for a, b in zip(res["masks"], z["out_masks"])]
    assert min(ious) > 0.999


def test_non_square_against_numpy_transcription():
    rng = np.random.default_rng(7)
    h, w, c, e = 96, 160, 4, 8
    outputs = {
        "cls_logits": [rng.normal(-4.0, 1.5, (1, s, s, c)).astype("float32") for s in ref.NUM_GRIDS],
        "kernels": [rng.normal(0, 0.4, (1, s, s, e)).astype("float32") for s in ref.NUM_GRIDS],
        "mask_features": np.maximum(rng.normal(0, 1, (1, h // 4, w // 4, e)), 0).astype("float32"),
    }
    img_shape, ori_shape = (90, 150), (45, 75)
    res = _model(c, e=e, max_candidates=20000).postprocess(outputs, [img_shape], [ori_shape])[0]
    s, lab, masks = ref.predict([x[0] for x in outputs["cls_logits"]], [x[0] for x in outputs["kernels"]],
                                outputs["mask_features"][0], img_shape, ori_shape, c)
    assert len(s) > 5
    np.testing.assert_array_equal(res["labels"], lab)
    np.testing.assert_allclose(res["scores"], s, atol=1e-5)
    assert min(_iou(a.astype(bool), b) for a, b in zip(res["masks"], masks)) > 0.999


def test_no_candidates_gives_empty_result():
    outputs = {
        "cls_logits": [np.full((2, s, s, 3), -10.0, "float32") for s in ref.NUM_GRIDS],
        "kernels": [np.zeros((2, s, s, 8), "float32") for s in ref.NUM_GRIDS],
        "mask_features": np.zeros((2, 16, 24, 8), "float32"),
    }
    res = _model(3, e=8).postprocess(outputs, [(64, 96)] * 2, [(64, 96), (32, 48)])
    assert [r["masks"].shape for r in res] == [(0, 64, 96), (0, 32, 48)]
    assert all(len(r["scores"]) == len(r["labels"]) == 0 for r in res)
