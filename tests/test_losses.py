import numpy as np

import keras_solov2  # noqa: F401
from keras_solov2 import SOLOv2, losses
from tests import mmdet_reference as ref
from tests.synthetic import non_square_instances


def _model(num_classes, e=256, max_pos_pairs=256):
    return SOLOv2(backbone="resnet18", num_classes=num_classes, fpn_channels=32, feat_channels=32,
                  stacked_convs=1, mask_feat_channels=16, mask_out_channels=e, norm_groups=8,
                  max_pos_pairs=max_pos_pairs)


def _nhwc(z, key):
    return [z[f"{key}_l{lvl}"].transpose(0, 2, 3, 1) for lvl in range(5)]


def test_matches_mmdet_fixture(fixtures_dir):
    z = np.load(fixtures_dir / "solov2_loss_case0.npz")
    outputs = {
        "cls_logits": _nhwc(z, "cls_preds"),
        "kernels": _nhwc(z, "kernel_preds"),
        "mask_features": z["mask_feats"].transpose(0, 2, 3, 1),
    }
    masks = np.zeros((3, 6, 512, 512), np.uint8)
    labels = -np.ones((3, 6), np.int32)
    for b in range(3):
        g = z[f"gt{b}_masks"]
        masks[b, : len(g)] = g
        labels[b, : len(g)] = z[f"gt{b}_labels"]
    out = _model(80).compute_solov2_loss(outputs, masks, labels)
    np.testing.assert_allclose(float(out["loss_cls"]), float(z["loss_cls"]), rtol=1e-5)
    np.testing.assert_allclose(float(out["loss_mask"]), float(z["loss_mask"]), rtol=1e-5)
    np.testing.assert_allclose(float(out["loss"]), float(z["loss_cls"] + z["loss_mask"]), rtol=1e-5)


def _random_outputs(rng, b, h, w, c, e):
    return {
        "cls_logits": [rng.normal(-3, 1, (b, s, s, c)).astype("float32") for s in ref.NUM_GRIDS],
        "kernels": [rng.normal(0, 0.3, (b, s, s, e)).astype("float32") for s in ref.NUM_GRIDS],
        "mask_features": np.maximum(rng.normal(0, 1, (b, h // 4, w // 4, e)), 0).astype("float32"),
    }


def test_non_square_batch_against_numpy_transcription():
    rng = np.random.default_rng(3)
    masks, labels = non_square_instances(160, 224)
    gt_masks = np.zeros((2, 8, 160, 224), np.uint8)
    gt_labels = -np.ones((2, 8), np.int32)
    gt_masks[0, :7], gt_labels[0, :7] = masks, labels
    gt_masks[1, :2], gt_labels[1, :2] = masks[5:], labels[5:]
    outputs = _random_outputs(rng, 2, 160, 224, 3, 8)
    out = _model(3, e=8).compute_solov2_loss(outputs, gt_masks, gt_labels)
    ref_cls, ref_mask, num_pos = ref.loss(
        outputs["cls_logits"], outputs["kernels"], outputs["mask_features"],
        [masks, masks[5:]], [labels, labels[5:]], 3,
    )
    assert num_pos > 0
    np.testing.assert_allclose(float(out["loss_cls"]), ref_cls, rtol=1e-5)
    np.testing.assert_allclose(float(out["loss_mask"]), ref_mask, rtol=1e-5)


def test_zero_instances_is_finite_and_mask_loss_zero():
    rng = np.random.default_rng(0)
    outputs = _random_outputs(rng, 2, 64, 96, 3, 8)
    out = _model(3, e=8).compute_solov2_loss(
        outputs, np.zeros((2, 4, 64, 96), np.uint8), -np.ones((2, 4), np.int32)
    )
    assert float(out["loss_mask"]) == 0.0
    assert np.isfinite(float(out["loss_cls"])) and float(out["loss_cls"]) > 0


def test_pair_cap_estimates_the_full_sum():
    rng = np.random.default_rng(1)
    masks, labels = non_square_instances(160, 224)
    outputs = _random_outputs(rng, 1, 160, 224, 3, 8)
    full = _model(3, e=8).compute_solov2_loss(outputs, masks[None], labels[None])
    capped_model = _model(3, e=8, max_pos_pairs=10)
    # 80 draws: per-draw spread ≈ 10 %, the mean's ≈ 1.1 %; rtol 5 % catches a biased rescaling.
    runs = [capped_model.compute_solov2_loss(outputs, masks[None], labels[None]) for _ in range(80)]
    capped = [float(r["loss_mask"]) for r in runs]
    # Category loss is never capped; the mask loss is an unbiased estimate.
    assert {float(r["loss_cls"]) for r in runs} == {float(full["loss_cls"])}
    assert len(set(capped)) > 1
    np.testing.assert_allclose(np.mean(capped), float(full["loss_mask"]), rtol=0.05)


def test_focal_and_dice_hand_computed():
    # logit 0: p = 0.5, target 1: bce = log 2, weight α · (1 - p)² = 0.25 · 0.5²;
    # target 0: weight (1 - α) · p² = 0.75 · 0.5².
    np.testing.assert_allclose(np.asarray(losses.sigmoid_focal_loss(np.zeros(2), np.array([1.0, 0.0]))),
                               [np.log(2) * 0.25 * 0.25, np.log(2) * 0.75 * 0.25], rtol=1e-6)
    # logit 2, target 0: bce = 2 + log(1 + e^-2), p = σ(2).
    p = 1 / (1 + np.exp(-2.0))
    np.testing.assert_allclose(float(losses.sigmoid_focal_loss(np.full(1, 2.0), np.zeros(1))[0]),
                               (2 + np.log1p(np.exp(-2.0))) * 0.75 * p**2, rtol=1e-6)
    # Dice 1 - 2Σpt / ((Σp² + 0.001) + (Σt² + 0.001)), 8 of 16 pixels in the target:
    t = np.zeros((1, 4, 4)); t[0, :2] = 1
    good = float(losses.dice_loss(np.where(t > 0, 20.0, -20.0), t)[0])  # p ≈ t: 1 - 16 / 16.002
    np.testing.assert_allclose(good, 1 - 16 / 16.002, rtol=0, atol=1e-6)  # float32: 1 - x near 1
    half = float(losses.dice_loss(np.zeros((1, 4, 4)), t)[0])  # p = 0.5: 1 - 2·4 / (4.001 + 8.001)
    np.testing.assert_allclose(half, 1 - 8 / 12.002, rtol=1e-6)
    bad = float(losses.dice_loss(np.where(t > 0, -20.0, 20.0), t)[0])  # Σpt ≈ 8 e^-20
    np.testing.assert_allclose(bad, 1 - 16 * np.exp(-20.0) / 16.002, rtol=1e-7)


def test_unused_slots_and_pairs_are_trimmed_without_changing_the_loss():
    """Without XLA the loss runs on the slots and pairs the batch uses; with
    `jit_compile` on the static `M` slots and `max_pos_pairs` pairs. Same sums,
    also for a padding slot between real ones and an open slot axis."""
    import tensorflow as tf

    rng = np.random.default_rng(4)
    masks, labels = non_square_instances(160, 224)
    gt_masks = np.zeros((2, 40, 160, 224), np.uint8)
    gt_labels = -np.ones((2, 40), np.int32)
    slots = [0, 1, 2, 3, 4, 5, 8]  # padding between real slots
    gt_masks[0, slots], gt_labels[0, slots] = masks, labels
    gt_masks[1, [0, 2]], gt_labels[1, [0, 2]] = masks[5:], labels[5:]
    outputs = _random_outputs(rng, 2, 160, 224, 3, 8)
    model = _model(3, e=8, max_pos_pairs=1000)
    trimmed = model.compute_solov2_loss(outputs, gt_masks, gt_labels)
    model.jit_compile = True  # the static path (run eagerly here)
    static = model.compute_solov2_loss(outputs, gt_masks, gt_labels)
    model.jit_compile = False
    spec = [tf.TensorSpec((2, None, 160, 224), tf.uint8), tf.TensorSpec((2, None), tf.int32)]
    open_slots = tf.function(lambda m, lab: model.compute_solov2_loss(outputs, m, lab), input_signature=spec)
    any_m = open_slots(gt_masks[:, :9], gt_labels[:, :9])
    assert float(static["num_pos"]) > 0
    for key in ("loss_cls", "loss_mask", "num_pos"):
        np.testing.assert_allclose(float(trimmed[key]), float(static[key]), rtol=1e-6)
        np.testing.assert_allclose(float(any_m[key]), float(static[key]), rtol=1e-6)
