import numpy as np
import pytest
import tensorflow as tf

import keras_solov2  # noqa: F401
from keras_solov2 import SOLOv2, targets
from tests import mmdet_reference as ref
from tests.synthetic import non_square_instances

OFFSETS = np.cumsum([0] + [s * s for s in ref.NUM_GRIDS])


@pytest.fixture(scope="module")
def model():
    return SOLOv2(backbone="resnet18", num_classes=80, fpn_channels=32, feat_channels=32,
                  stacked_convs=1, mask_feat_channels=16, mask_out_channels=32, norm_groups=8)


@pytest.mark.parametrize("img", [0, 1, 2])
def test_matches_mmdet_fixtures(fixtures_dir, model, img):
    z = np.load(fixtures_dir / f"solov2_targets_img{img}.npz")
    masks, labels = z["gt_masks"], z["gt_labels"]
    np.testing.assert_array_equal(np.asarray(targets.rescale_masks(masks)), z["gt_masks_rescaled"])
    geo = targets.instance_geometry(masks)
    nonempty = masks.reshape(len(masks), -1).any(1)
    np.testing.assert_array_equal(np.asarray(geo["scale"])[nonempty], z["gt_scale"][nonempty])
    com = np.stack([np.asarray(geo["center_h"]), np.asarray(geo["center_w"])], 1)
    np.testing.assert_array_equal(com[nonempty], z["gt_center_of_mass_hw"][nonempty])

    levels = model.assign_targets(masks, labels, image_shape=tuple(z["img_hw"]))
    t = targets.assign_targets(masks[None], labels[None], 80, ref.NUM_GRIDS, ref.SCALE_RANGES)
    rescaled = np.asarray(targets.rescale_masks(masks))
    cells = np.asarray(t["pair_cells"])[0]
    valid = np.asarray(t["pair_valid"])[0]
    for lvl in range(5):
        np.testing.assert_array_equal(np.asarray(levels[lvl]["labels"]), z[f"labels_l{lvl}"])
        np.testing.assert_array_equal(np.asarray(levels[lvl]["positive"]), z[f"pos_mask_l{lvl}"])
        # Pairs in gt order, cells row-major, duplicates kept: mmdet's pos_index.
        np.testing.assert_array_equal(cells[:, lvl][valid[:, lvl]] - OFFSETS[lvl], z[f"pos_index_l{lvl}"])
        slots = np.nonzero(valid[:, lvl])[0]
        if len(slots):
            np.testing.assert_array_equal(rescaled[slots], z[f"mask_targets_l{lvl}"])
    assert int(t["num_pos"]) == sum(int(z[f"pos_mask_l{lvl}"].sum()) for lvl in range(5))


def _compare_with_reference(masks, labels, h, w):
    t = targets.assign_targets(masks[None], labels[None], 80, ref.NUM_GRIDS, ref.SCALE_RANGES)
    expected = ref.targets_single(masks, labels, (h // 4, w // 4))
    cells = np.asarray(t["pair_cells"])[0]
    valid = np.asarray(t["pair_valid"])[0]
    rescaled = np.asarray(targets.rescale_masks(masks))
    for lvl, (lab, pos, pidx, tg) in enumerate(expected):
        np.testing.assert_array_equal(np.asarray(t["labels"][lvl][0]), lab)
        np.testing.assert_array_equal(np.asarray(t["positive"][lvl][0]), pos)
        np.testing.assert_array_equal(cells[:, lvl][valid[:, lvl]] - OFFSETS[lvl], pidx)
        slots = np.nonzero(valid[:, lvl])[0]
        for s, target in zip(slots, tg):
            np.testing.assert_array_equal(rescaled[s], target)
    return expected


def test_non_square_image_against_numpy_transcription():
    masks, labels = non_square_instances(160, 224)
    expected = _compare_with_reference(masks, labels, 160, 224)
    # The cases are really exercised: the 70x70 object is on levels 0 and 1,
    # the border object is positive, the empty mask contributes nothing.
    assert len(expected[0][2]) and len(expected[1][2]) and len(expected[2][2])
    levels_of_first = [lvl for lvl in range(5) if 0 in np.asarray(
        targets.assign_targets(masks[None, :1], labels[None, :1], 80, ref.NUM_GRIDS, ref.SCALE_RANGES)["labels"][lvl])]
    assert levels_of_first == [0, 1]


def test_mask_sizes_not_multiple_of_four():
    masks, labels = non_square_instances(150, 210)
    rescaled = np.asarray(targets.rescale_masks(masks))
    assert rescaled.shape[1:] == (38, 53)
    for m, r in zip(masks, rescaled):
        np.testing.assert_array_equal(r, ref.cv2_rescale_quarter(m))


def test_zero_instances_and_padding_slots():
    masks = np.zeros((1, 3, 64, 96), np.uint8)
    labels = -np.ones((1, 3), np.int32)
    masks[0, 0, 10:30, 10:40] = 1  # padding slot with a mask: ignored (label -1)
    t = targets.assign_targets(masks, labels, 5, ref.NUM_GRIDS, ref.SCALE_RANGES)
    assert int(t["num_pos"]) == 0
    assert not np.asarray(t["pair_valid"]).any()
    for lab in t["labels"]:
        assert np.all(np.asarray(lab) == 5)


def test_later_instance_overwrites_earlier():
    masks = np.zeros((2, 64, 64), np.uint8)
    masks[0, 20:40, 20:40] = 1
    masks[1, 20:40, 20:40] = 1
    t = targets.assign_targets(masks[None], np.array([[3, 7]]), 10, ref.NUM_GRIDS, ref.SCALE_RANGES)
    lab = np.asarray(t["labels"][0][0])
    assert set(np.unique(lab)) == {7, 10}
    # Both instances still give (duplicate) pairs, counted once as cells.
    valid = np.asarray(t["pair_valid"])[0, :, 0]
    assert valid[0].sum() == valid[1].sum() > 0
    assert int(t["num_pos"]) == int(np.asarray(t["positive"][0]).sum())


def _with_unknown_image_size(fn, masks, *args):
    """`fn(masks, *args)` in a graph where the masks' H and W are unknown until it
    runs (how Keras traces `train_step` once batches of a second size arrive)."""
    spec = tf.TensorSpec([None] * (masks.ndim - 2) + [None, None], tf.as_dtype(masks.dtype))
    return tf.function(lambda m: fn(m, *args), input_signature=[spec])(tf.constant(masks))


@pytest.mark.parametrize("img", [0, 1, 2])
def test_unknown_image_size_gives_the_mmdet_fixtures(fixtures_dir, img):
    z = np.load(fixtures_dir / f"solov2_targets_img{img}.npz")
    masks, labels = z["gt_masks"], z["gt_labels"]
    rescaled = _with_unknown_image_size(targets.rescale_masks, masks)
    np.testing.assert_array_equal(np.asarray(rescaled), z["gt_masks_rescaled"])
    t = _with_unknown_image_size(
        lambda m: targets.assign_targets(m, labels[None], 80, ref.NUM_GRIDS, ref.SCALE_RANGES), masks[None])
    valid = np.asarray(t["pair_valid"])[0]
    cells = np.asarray(t["pair_cells"])[0]
    for lvl in range(5):
        np.testing.assert_array_equal(np.asarray(t["labels"][lvl][0]), z[f"labels_l{lvl}"])
        np.testing.assert_array_equal(cells[:, lvl][valid[:, lvl]] - OFFSETS[lvl], z[f"pos_index_l{lvl}"])
    assert int(t["num_pos"]) == sum(int(z[f"pos_mask_l{lvl}"].sum()) for lvl in range(5))


@pytest.mark.parametrize("h, w", [(150, 210), (160, 224), (33, 31), (203, 321)])
def test_unknown_image_size_rescales_as_the_cv2_transcription(h, w):
    """The in-graph taps against the NumPy transcription of cv2's fixed-point
    INTER_LINEAR (the constant taps are checked against mmcv's output on the
    fixtures): sizes that are not multiples of 4 included."""
    masks, _ = non_square_instances(160, 224)
    masks = np.pad(masks, ((0, 0), (0, max(h - 160, 0)), (0, max(w - 224, 0))))[:, :h, :w]
    rescaled = np.asarray(_with_unknown_image_size(targets.rescale_masks, masks))
    assert rescaled.shape[1:] == (int(h / 4 + 0.5), int(w / 4 + 0.5))
    assert rescaled.any()
    for m, r in zip(masks, rescaled):
        np.testing.assert_array_equal(r, ref.cv2_rescale_quarter(m))


def test_in_graph_taps_equal_the_constant_taps_at_every_size():
    """Sizes up to mmdet's test scale: the in-graph float64 arithmetic and
    rounding give the taps the fixture-checked constant path gives."""
    taps = tf.function(targets._cv2_linear_taps_in_graph)
    for size in range(1, 1400):
        out = int(size / 4 + 0.5)
        if out == 0:
            continue
        expected = targets._cv2_linear_taps(size, out)
        got = taps(tf.constant(size), tf.constant(out))
        for e, g in zip(expected, got):
            np.testing.assert_array_equal(np.asarray(g), e, err_msg=f"size {size}")


def test_instance_geometry_widens_no_full_size_copy_of_the_masks():
    """The counts are summed 32 pixels at a time in uint8: no op of the graph
    outputs a (B, M, H, W) tensor wider than the uint8 masks (count_nonzero
    made an int32 and a bool one per axis: ≈ 1.1 GB at batch 2, 50 instances,
    1344×800). Exact against NumPy at sizes that are not multiples of 32."""
    shape = (2, 5, 96, 160)
    graph = tf.function(targets.instance_geometry).get_concrete_function(
        tf.TensorSpec(shape, tf.uint8)).graph
    full = np.prod(shape)
    for op in graph.get_operations():
        for out in op.outputs:
            if out.shape.is_fully_defined() and out.shape.num_elements() >= full:
                assert out.dtype.size == 1 and op.type in ("Placeholder", "Cast", "Reshape", "Identity"), (
                    op.type, out.shape, out.dtype)
    rng = np.random.default_rng(0)
    for h, w in [(37, 50), (64, 33), (1, 95)]:
        masks = (rng.random((3, 4, h, w)) < 0.3).astype(np.uint8)
        masks[0, 1] = 0  # an empty mask
        geo = targets.instance_geometry(masks)
        rows, cols = masks.sum(-1), masks.sum(-2)
        area = rows.sum(-1)
        np.testing.assert_array_equal(geo["area"], area)
        with np.errstate(invalid="ignore"):
            np.testing.assert_allclose(np.asarray(geo["center_h"])[area > 0],
                                       ((rows * np.arange(h)).sum(-1) / area)[area > 0], rtol=1e-6)
            np.testing.assert_allclose(np.asarray(geo["center_w"])[area > 0],
                                       ((cols * np.arange(w)).sum(-1) / area)[area > 0], rtol=1e-6)
