import json

import numpy as np
import pytest

import keras_solov2  # noqa: F401
from keras_solov2.layers import MatrixNMS
from tests import mmdet_reference as ref

SETTINGS = {
    "solov2": dict(filter_thr=0.05, nms_pre=500, max_per_img=100),
    "raw": dict(filter_thr=-1, nms_pre=-1, max_per_img=-1),
}


@pytest.mark.parametrize("case", [0, 1, 2])
@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize("setting", ["solov2", "raw"])
def test_matches_mmdet_fixtures(fixtures_dir, case, kernel, setting):
    z = np.load(fixtures_dir / f"matrix_nms_case{case}.npz")
    params = json.loads(str(z["params_json"]))
    # The recorded call is the one replayed here.
    assert params["case"]["n"] == len(z["masks"]) and params["sigma"] == 2.0
    mm = params["settings"][setting]
    assert (mm["filter_thr"], mm["nms_pre"], mm["max_num"]) == tuple(
        SETTINGS[setting][k] for k in ("filter_thr", "nms_pre", "max_per_img"))
    out = MatrixNMS(kernel=kernel, **SETTINGS[setting])(z["masks"], z["labels"], z["scores"])
    n = int(out["num_detections"])
    ref_ids = z[f"{kernel}_{setting}_keep_inds"]
    assert n == len(ref_ids)
    np.testing.assert_array_equal(np.asarray(out["indices"])[:n], ref_ids)
    np.testing.assert_array_equal(np.asarray(out["labels"])[:n], z[f"{kernel}_{setting}_labels"])
    np.testing.assert_allclose(
        np.asarray(out["scores"])[:n], z[f"{kernel}_{setting}_scores"], rtol=0, atol=1e-6
    )
    # Padding past the detections, to a static max_per_img.
    if SETTINGS[setting]["max_per_img"] > 0:
        assert out["indices"].shape == out["scores"].shape == out["labels"].shape == (100,)
    assert np.all(np.asarray(out["indices"])[n:] == -1)
    assert np.all(np.asarray(out["scores"])[n:] == 0)
    if setting == "raw":
        np.testing.assert_allclose(
            np.asarray(out["decayed_scores"]),
            z[f"{kernel}_raw_decayed_scores_by_input"],
            rtol=0,
            atol=1e-6,
        )


def test_hand_computed_case():
    # Mask 1 equals mask 0 (IoU 1, same label); mask 2 overlaps mask 0 by
    # 4 of 12 pixels but has another label; mask 3 overlaps mask 0 with IoU 1/3.
    masks = np.zeros((4, 4, 4), bool)
    masks[0, :2] = True  # 8 px
    masks[1, :2] = True
    masks[2, 1:3] = True  # 8 px, inter with 0: 4 -> IoU 4/12
    masks[3, 1:3] = True
    labels = np.array([0, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.6], "float32")
    out = MatrixNMS(filter_thr=-1, nms_pre=-1, max_per_img=-1)(masks, labels, scores)
    d = np.asarray(out["decayed_scores"])
    # 1: decayed by 0 (IoU 1, 0 has no compensation): 0.8 e^{-2}.
    # 2: other label -> untouched.
    # 3: vs 0: IoU 1/3 (comp 0) -> e^{-2/9}; vs 1: IoU 1/3 but 1's comp is 1:
    #    e^{-2/9} / e^{-2} > 1, so the min is e^{-2/9}.
    np.testing.assert_allclose(d, [0.9, 0.8 * np.exp(-2), 0.7, 0.6 * np.exp(-2 / 9)], rtol=1e-6)
    out_lin = MatrixNMS(kernel="linear", filter_thr=-1, nms_pre=-1, max_per_img=-1)(
        masks, labels, scores
    )
    np.testing.assert_allclose(
        np.asarray(out_lin["decayed_scores"]), [0.9, 0.0, 0.7, 0.6 * (2 / 3)], rtol=1e-6, atol=1e-7
    )


def test_valid_flags_and_mask_area_and_batch():
    rng = np.random.default_rng(0)
    masks = rng.random((2, 12, 16, 20)) > 0.5
    labels = rng.integers(0, 3, (2, 12))
    scores = rng.uniform(0.1, 1, (2, 12)).astype("float32")
    valid = np.ones((2, 12), bool)
    valid[:, 8:] = False
    layer = MatrixNMS(filter_thr=0.05, nms_pre=6, max_per_img=5)
    out = layer(masks, labels, scores, valid=valid)
    for b in range(2):
        s, lab, idx = ref.matrix_nms(
            masks[b, :8], labels[b, :8], scores[b, :8], filter_thr=0.05, nms_pre=6, max_num=5
        )
        n = int(out["num_detections"][b])
        assert n == len(idx)
        np.testing.assert_array_equal(np.asarray(out["indices"][b])[:n], idx)
        np.testing.assert_allclose(np.asarray(out["scores"][b])[:n], s, atol=1e-6)
    # mask_area is used instead of the masks' own sums when given (other areas, other IoUs).
    area = (masks.reshape(2, 12, -1).sum(-1) * rng.uniform(0.6, 1.5, (2, 12))).astype("float32")
    out2 = layer(masks, labels, scores, mask_area=area, valid=valid)
    changed = False
    for b in range(2):
        s, lab, idx = ref.matrix_nms(masks[b, :8], labels[b, :8], scores[b, :8], filter_thr=0.05, nms_pre=6,
                                     max_num=5, mask_area=area[b, :8])
        n = int(out2["num_detections"][b])
        assert n == len(idx)
        np.testing.assert_array_equal(np.asarray(out2["indices"][b])[:n], idx)
        np.testing.assert_allclose(np.asarray(out2["scores"][b])[:n], s, atol=1e-6)
        changed |= n != int(out["num_detections"][b]) or not np.allclose(out2["scores"][b], out["scores"][b])
    assert changed  # the areas made a difference, so the check above could fail


def test_empty_and_all_invalid():
    layer = MatrixNMS(max_per_img=4)
    out = layer(np.zeros((3, 5, 5), bool), np.zeros(3, "int32"), np.zeros(3, "float32"),
                valid=np.zeros(3, bool))
    assert int(out["num_detections"]) == 0
    assert np.all(np.asarray(out["indices"]) == -1)
    # No masks at all.
    out = layer(np.zeros((0, 5, 5), bool), np.zeros(0, "int32"), np.zeros(0, "float32"))
    assert int(out["num_detections"]) == 0
    assert out["indices"].shape == (4,) and np.all(np.asarray(out["indices"]) == -1)
    assert np.all(np.asarray(out["labels"]) == -1) and not np.any(np.asarray(out["scores"]))
    assert out["decayed_scores"].shape == (0,)
    out = MatrixNMS(max_per_img=-1)(np.zeros((2, 0, 5, 5), bool), np.zeros((2, 0), "int32"),
                                    np.zeros((2, 0), "float32"))
    assert out["indices"].shape == (2, 0) and np.asarray(out["num_detections"]).tolist() == [0, 0]


def test_config_round_trip():
    layer = MatrixNMS(kernel="linear", sigma=3.0, filter_thr=0.1, nms_pre=50, max_per_img=7)
    clone = MatrixNMS.from_config(json.loads(json.dumps(layer.get_config())))
    assert clone.get_config() == layer.get_config()
    with pytest.raises(ValueError, match="kernel"):
        MatrixNMS(kernel="box")


def test_dynamic_number_of_masks_in_a_graph():
    import tensorflow as tf

    z = np.random.default_rng(5)
    masks = z.random((1, 30, 16, 24)) > 0.4
    labels = z.integers(0, 3, (1, 30))
    scores = z.uniform(0.1, 1, (1, 30)).astype("float32")
    layer = MatrixNMS(filter_thr=0.05, nms_pre=20, max_per_img=10)
    fn = tf.function(
        lambda m, l, s: layer(m, l, s),
        input_signature=[tf.TensorSpec((1, None, 16, 24), tf.bool), tf.TensorSpec((1, None), tf.int64),
                         tf.TensorSpec((1, None), tf.float32)],
    )
    for n in (30, 12, 3):
        dyn = fn(masks[:, :n], labels[:, :n], scores[:, :n])
        ref_s, ref_l, ref_i = ref.matrix_nms(masks[0, :n], labels[0, :n], scores[0, :n], 0.05, 20, 10)
        assert dyn["indices"].shape == (1, 10)
        k = len(ref_i)
        assert int(dyn["num_detections"][0]) == k
        np.testing.assert_array_equal(np.asarray(dyn["indices"][0, :k]), ref_i)
        np.testing.assert_allclose(np.asarray(dyn["scores"][0, :k]), ref_s, atol=1e-6)
        assert np.all(np.asarray(dyn["indices"][0, k:]) == -1)
    assert len(fn._list_all_concrete_functions()) == 1  # one trace for every N


@pytest.mark.parametrize("native_bf16", [True, False])
def test_intersections_are_exact_on_both_matmul_paths(monkeypatch, native_bf16):
    from keras_solov2.layers import matrix_nms

    monkeypatch.setattr(matrix_nms, "bfloat16_matmul_is_fast", lambda: native_bf16)
    rng = np.random.default_rng(3)
    # 50·70 = 3500 pixels: not a multiple of the 256-pixel block, counts far above 256.
    masks = rng.random((2, 7, 50 * 70)) < rng.uniform(0.05, 0.95, (2, 7, 1))
    masks[0, 3] = True
    got = np.asarray(matrix_nms.binary_intersections(masks, masks))
    want = np.einsum("bnp,bmp->bnm", masks.astype(np.int64), masks.astype(np.int64))
    assert want.max() == 3500
    np.testing.assert_array_equal(got, want)
    # The layer agrees with the NumPy transcription of mmdet's mask_matrix_nms on this path too.
    out = MatrixNMS()(masks[0].reshape(7, 50, 70), np.zeros(7, "int32"), np.linspace(0.9, 0.3, 7).astype("float32"))
    ref_out = ref.matrix_nms(masks[0].reshape(7, 50, 70), np.zeros(7), np.linspace(0.9, 0.3, 7).astype("float32"),
                             filter_thr=0.05, nms_pre=500, max_num=100)
    n = int(out["num_detections"])
    np.testing.assert_array_equal(np.asarray(out["indices"])[:n], ref_out[2])
    np.testing.assert_allclose(np.asarray(out["scores"])[:n], ref_out[0], rtol=0, atol=1e-6)


def test_bit_packed_intersections_are_exact():
    from keras_solov2.layers import matrix_nms

    rng = np.random.default_rng(11)
    # 3500 pixels: 54 full words and a padded one; dense masks, so that
    # counts reach the whole mask (far above a word's 64 and a uint8's 255).
    masks = rng.random((2, 9, 3500)) < rng.uniform(0.05, 0.95, (2, 9, 1))
    masks[1, 4] = True
    want = np.einsum("bnp,bmp->bnm", masks.astype(np.int64), masks.astype(np.int64))
    for dtype in ("bool", "float32"):  # decode's masks are bool; 0/1 numbers work too
        words = np.asarray(matrix_nms.pack_bits(masks.astype(dtype)))
        assert words.shape == (2, 9, 55) and words.dtype == np.uint64
        rows = np.array([(b * 9 + i, b * 9 + j) for b in range(2) for i in range(9) for j in range(9)], "int32")
        got = np.asarray(matrix_nms.packed_intersections(words.reshape(18, 55), rows))
        np.testing.assert_array_equal(got, want.reshape(-1))
    assert want.max() == 3500
    # No pair at all (every label different): an empty result, not an error.
    empty = matrix_nms.packed_intersections(words.reshape(18, 55), np.zeros((0, 2), "int32"))
    assert tuple(empty.shape) == (0,)
    out = MatrixNMS(filter_thr=-1)(masks[0].reshape(9, 50, 70), np.arange(9), np.linspace(0.9, 0.1, 9).astype("float32"))
    np.testing.assert_allclose(np.asarray(out["scores"])[:9], np.linspace(0.9, 0.1, 9), atol=1e-6)  # nothing decays


@pytest.mark.parametrize("path", ["packed", "blocked", "full"])
def test_label_blocks_cover_every_same_label_pair(monkeypatch, path):
    from keras_solov2.layers import matrix_nms

    # Each path regardless of how many pairs share a label: bit-packed pairs
    # and one full product (TensorFlow's choice), label blocks (the
    # `keras.ops` fallback).
    monkeypatch.setattr(matrix_nms, "packed_pairs_available", lambda: path != "blocked")
    monkeypatch.setattr(matrix_nms, "_PACKED_MAX_FRACTION", 2.0 if path == "packed" else -1.0)
    monkeypatch.setattr(matrix_nms, "_BLOCKED_MAX_FRACTION", 2.0)
    # Several steps of the bit-packed path's loop over pairs.
    monkeypatch.setattr(matrix_nms, "_PAIR_CHUNK", 1000)
    # 200 masks span several 32-row label blocks; item 0 has 80 mixed labels
    # (blocks multiply only their label runs), item 1 one label (the whole
    # upper triangle); scattered invalid entries sort after every label.
    rng = np.random.default_rng(7)
    n = 200
    masks = np.zeros((2, n, 30, 40), bool)
    for b in range(2):
        for i in range(n):
            y, x = rng.integers(0, 20), rng.integers(0, 30)
            masks[b, i, y:y + rng.integers(4, 15), x:x + rng.integers(4, 15)] = True
    labels = np.stack([rng.integers(0, 80, n), np.zeros(n, int)])
    scores = rng.uniform(0.1, 1, (2, n)).astype("float32")
    valid = rng.random((2, n)) > 0.1
    out = MatrixNMS(kernel="linear", filter_thr=-1, nms_pre=-1, max_per_img=-1)(masks, labels, scores, valid=valid)
    for b in range(2):
        keep = np.flatnonzero(valid[b])
        s, lab, idx = ref.matrix_nms(masks[b, keep], labels[b, keep], scores[b, keep], kernel="linear")
        k = int(out["num_detections"][b])
        assert k == len(keep)
        np.testing.assert_array_equal(np.asarray(out["indices"][b])[:k], keep[idx])
        np.testing.assert_allclose(np.asarray(out["scores"][b])[:k], s, atol=1e-6)
    # Item 1 has strongly overlapping pairs more than two 32-row blocks apart
    # in score order, which a block-diagonal product would miss.
    keep = np.flatnonzero(valid[1])
    flat = masks[1, keep[np.argsort(-scores[1, keep], kind="stable")]].reshape(len(keep), -1).astype(np.int64)
    inter = flat @ flat.T
    iou = inter / (flat.sum(1)[:, None] + flat.sum(1)[None, :] - inter)
    assert np.triu(iou, 65).max() > 0.5


def test_bad_settings_and_shapes_are_named():
    with pytest.raises(ValueError, match="`sigma` must be >= 0"):
        MatrixNMS(sigma=-2.0)  # would raise the scores it decays
    with pytest.raises(ValueError, match="`filter_thr` must be at most 1"):
        MatrixNMS(filter_thr=1.2)  # would drop every mask
    masks = np.zeros((10, 8, 8), bool)
    scores, labels = np.linspace(0.9, 0.1, 10).astype("float32"), np.zeros(10, "int32")
    # These failed inside a TF gather or select, without naming the argument.
    with pytest.raises(ValueError, match=r"labels must have shape \(10,\) \(one per mask\), got \(9,\)"):
        MatrixNMS()(masks, labels[:9], scores)
    with pytest.raises(ValueError, match=r"scores must have shape \(10,\) \(one per mask\), got \(1, 10\)"):
        MatrixNMS()(masks, labels, scores[None])
    with pytest.raises(ValueError, match=r"valid must have shape \(1, 10\)"):
        MatrixNMS()(masks[None], labels[None], scores[None], valid=np.ones(10, bool))
    with pytest.raises(ValueError, match=r"masks must be \(N, H, W\) or \(B, N, H, W\), got shape \(8, 8\)"):
        MatrixNMS()(masks[0], labels, scores)
