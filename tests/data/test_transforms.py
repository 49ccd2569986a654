"""Training augmentation: masks follow the image, instances cropped away are
dropped, and every random choice is a pure function of (seed, position)."""

import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import keras_solov2  # noqa: F401
from keras_solov2.data.coco_folder import EpochTracker, describe, make_dataset, make_tfds_dataset
from keras_solov2.data.transforms import (
    PIXEL_MEAN,
    PhotoMetricDistortion,
    check_crop,
    default_pad,
    normalise_scales,
    resize_flip_pad,
    sample_augmentation,
)

# Flat instance colours, far apart in some channel, and a black background.
PALETTE = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)], np.uint8)
BOXES = [(8, 10, 40, 50), (20, 70, 70, 120), (60, 15, 95, 60), (5, 125, 45, 150), (75, 100, 98, 148)]


def _painted_folder(tmp_path, n_images=4):
    """COCO folder of 100x160 images, instance k a flat box in PALETTE[k] (RLE masks)."""
    from pycocotools import mask as mu

    images, anns = [], []
    for i in range(n_images):
        img = np.zeros((100, 160, 3), np.uint8)
        for k, (y0, x0, y1, x1) in enumerate(BOXES):
            # Shift boxes per image so examples differ.
            y0, y1 = y0 + i % 3, y1 + i % 3
            img[y0:y1, x0:x1] = PALETTE[k]
            m = np.zeros((100, 160), np.uint8)
            m[y0:y1, x0:x1] = 1
            rle = mu.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode()
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": k + 1, "segmentation": rle,
                         "area": int(m.sum()), "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 100, "width": 160})
    cats = [{"id": k + 1, "name": f"c{k}"} for k in range(len(PALETTE))]
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return describe(tmp_path / "ann.json", tmp_path)


def _erode(mask, r):
    """Pixels whose (2r+1)x(2r+1) neighbourhood lies in `mask` (outside = empty)."""
    from numpy.lib.stride_tricks import sliding_window_view

    padded = np.pad(mask, r)
    return sliding_window_view(padded, (2 * r + 1, 2 * r + 1)).all(axis=(-2, -1))


def _assert_masks_on_their_colour(image, masks, labels, image_shape, max_zoom=3):
    """Each kept mask lies on its instance's colour; that colour appears nowhere else.

    Bilinear resampling blends colours near region borders, but (TF's
    half-pixel centres) the source pixel the nearest-neighbour mask picks
    has weight >= 1/2 per axis, >= 1/4 in all: a pixel outside the mask is
    at least a quarter of the way to another colour (>= 64 in a channel).
    Inside, pixels `max_zoom` output pixels away from the mask's edge read
    only pixels of the instance, so they have its exact colour.
    """
    nh, nw = image_shape
    kept = 0
    for m, label in zip(masks, labels):
        if label < 0:
            assert not m.any()
            continue
        kept += 1
        m = m.astype(bool)
        assert m.any() and not m[nh:].any() and not m[:, nw:].any()
        dist = np.abs(image - PALETTE[label].astype(np.float32)).max(-1)
        assert (dist[~m] >= 60).all(), f"instance {label}: its colour outside its mask"
        interior = _erode(m, max_zoom)
        assert (dist[interior] < 0.5).all(), f"instance {label}: mask not on its colour"
        assert interior.any() or m.sum() < 400
    return kept


def test_normalise_scales_and_default_pad():
    assert normalise_scales((1333, 800)) == [(1333, 800)] == normalise_scales((800, 1333))
    three_x = [(1333, 800), (1333, 768), (1333, 736), (1333, 704), (1333, 672), (1333, 640)]
    assert normalise_scales(three_x) == three_x
    assert default_pad(three_x) == (1344, 1344) == default_pad((1333, 800))
    assert default_pad([(320, 320), (512, 256)]) == (512, 512)
    with pytest.raises(ValueError, match="not a .long, short. pair"):
        normalise_scales([(1333, 800, 3)])
    with pytest.raises(ValueError, match="crop_type"):
        check_crop((10, 10), "centre")
    with pytest.raises(ValueError, match=r"fractions must be in \(0, 1\]"):
        check_crop((0.0, 0.5), "relative_range")


def _reference_geometry(mask_hw, crop_box, scale, flip, pad_to):
    """NumPy transcription: crop, keep-ratio size (mmcv rounding), nearest
    indices with half-pixel centres (float32, as TF), flip, pad."""
    top, left, ch, cw = crop_box
    long_side, short_side = max(scale), min(scale)
    f32 = np.float32
    h, w = f32(ch), f32(cw)
    factor = min(f32(long_side) / max(h, w), f32(short_side) / min(h, w), f32(pad_to[0]) / h, f32(pad_to[1]) / w)
    nh, nw = int(np.floor(h * factor + f32(0.5))), int(np.floor(w * factor + f32(0.5)))
    rows = np.minimum(np.floor((np.arange(nh, dtype=f32) + f32(0.5)) * (f32(ch) / f32(nh))).astype(int), ch - 1)
    cols = np.minimum(np.floor((np.arange(nw, dtype=f32) + f32(0.5)) * (f32(cw) / f32(nw))).astype(int), cw - 1)
    if flip:
        cols = cols[::-1]
    return top + rows, left + cols, nh, nw


def test_resize_flip_pad_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    h, w, slots, pad_to = 57, 83, 5, (96, 128)
    masks = (rng.random((3, h, w)) < 0.3).astype(np.uint8)
    masks[2] = 0
    masks[2, 0, 0] = 1  # a one-pixel instance: often lost by a crop or a downscale
    labels = np.array([4, 1, 7], np.int32)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    for crop_box, scale, flip in [((0, 0, h, w), (128, 96), False), ((5, 9, 40, 51), (128, 80), True),
                                  ((20, 30, 17, 13), (96, 96), False), ((0, 40, 57, 43), (50, 30), True)]:
        x, y = resize_flip_pad(image, masks, labels, (h, w), 3, tf.constant(flip), scale, pad_to, slots,
                               crop_box=tf.constant(crop_box))
        rows, cols, nh, nw = _reference_geometry((h, w), crop_box, scale, flip, pad_to)
        ref = masks[:, rows][:, :, cols]
        keep = ref.reshape(3, -1).any(1)
        got = np.asarray(y["gt_masks"])
        assert got.dtype == np.uint8 and got.shape == (slots, *pad_to)
        assert list(np.asarray(x["image_shape"])) == [nh, nw]
        np.testing.assert_array_equal(np.asarray(y["gt_labels"]),
                                      np.pad(labels[keep], (0, slots - keep.sum()), constant_values=-1))
        np.testing.assert_array_equal(got[: keep.sum(), :nh, :nw], ref[keep])
        assert not got[keep.sum():].any() and not got[:, nh:].any() and not got[:, :, nw:].any()
        # The image goes through the same crop and flip (bilinear: compare to TF's resize of the crop).
        top, left, ch, cw = crop_box
        ref_img = tf.image.resize(image[top:top + ch, left:left + cw].astype(np.float32), (nh, nw)).numpy()
        ref_img = ref_img[:, ::-1] if flip else ref_img
        np.testing.assert_allclose(np.asarray(x["images"])[:nh, :nw], ref_img, atol=1e-3)
        pad = np.asarray(x["images"])[nh:]
        np.testing.assert_allclose(pad, np.broadcast_to(PIXEL_MEAN, pad.shape), atol=1e-4)


def test_crop_that_removes_an_instance_drops_it():
    h, w = 60, 90
    masks = np.zeros((3, h, w), np.uint8)
    masks[0, 5:20, 5:20] = 1  # inside the crop
    masks[1, 40:55, 70:85] = 1  # outside it
    masks[2, 10:50, 25:60] = 1  # cut by it
    labels = np.array([2, 5, 0], np.int32)
    x, y = resize_flip_pad(np.zeros((h, w, 3), np.uint8), masks, labels, (h, w), 1, tf.constant(False),
                           (64, 64), (64, 64), 4, crop_box=tf.constant([0, 0, 32, 48]))
    got_labels = np.asarray(y["gt_labels"])
    got = np.asarray(y["gt_masks"])
    np.testing.assert_array_equal(got_labels, [2, 0, -1, -1])  # instance 1 dropped, the rest moved up
    assert got[0].any() and got[1].any() and not got[2:].any()
    # Crop 32x48 → 43x64 (factor 4/3): instance 0 at rows 5..19 → ~7..26.
    assert got[0, 7:26, 7:26].all() and got[0].sum() < 22 * 22


def test_masks_stay_on_their_pixels_through_crop_multiscale_and_flip(tmp_path):
    info = _painted_folder(tmp_path)
    scales = [(160, 100), (192, 120), (128, 80), (240, 150)]
    ds = make_dataset(info, scale=scales, batch_size=2, max_instances=6, training=True, shuffle_seed=1,
                      steps_per_epoch=6, crop_size=(0.5, 0.5), crop_type="relative_range")
    shapes, kept, dropped, flips = set(), 0, 0, 0
    for x, y in ds:
        # Slots: the batch's most instances left after the crop (at most 6).
        slots = int((np.asarray(y["gt_labels"]) >= 0).sum(1).max())
        # mmdet's padding: the batch's largest image, rounded up to 32.
        padded = tuple(int(v) for v in -(-np.asarray(x["image_shape"]).max(0) // 32) * 32)
        assert x["images"].shape == (2, *padded, 3) and y["gt_masks"].shape == (2, slots, *padded)
        for image, masks, labels, image_shape in zip(np.asarray(x["images"]), np.asarray(y["gt_masks"]),
                                                     np.asarray(y["gt_labels"]), np.asarray(x["image_shape"])):
            assert set(np.unique(masks)) <= {0, 1}
            n = _assert_masks_on_their_colour(image, masks, labels, image_shape)
            kept, dropped = kept + n, dropped + len(BOXES) - n
            shapes.add(tuple(image_shape))
            # Instance 0 (left) and 3 (right) tell a flip when both survive.
            if (labels == 0).any() and (labels == 3).any():
                k0, k3 = np.argmax(labels == 0), np.argmax(labels == 3)
                flips += np.nonzero(masks[k0].any(0))[0].mean() > np.nonzero(masks[k3].any(0))[0].mean()
    assert len(shapes) > 3 and kept > 0 and dropped > 0 and flips > 0  # crops, scales, flips all happened


def test_multiscale_picks_each_example_one_of_the_scales(tmp_path):
    info = _painted_folder(tmp_path)
    three_x = [(1333, 800), (1333, 768), (1333, 736), (1333, 704), (1333, 672), (1333, 640)]
    scaled = [(s[0] // 8, s[1] // 8) for s in three_x]  # same ratios, small images
    # 100x160 images: the short side decides, 160 * short / 100 <= long.
    allowed = {(short, round(160 * short / 100)) for _, short in scaled}
    ds = make_dataset(info, scale=scaled, batch_size=4, max_instances=6, steps_per_epoch=4)
    seen = {tuple(s) for x, _ in ds for s in np.asarray(x["image_shape"])}
    assert seen <= allowed and len(seen) >= 3
    # Evaluation uses the first scale, no augmentation.
    x, _ = next(iter(make_dataset(info, scale=scaled, batch_size=4, max_instances=6, training=False)))
    assert {tuple(s) for s in np.asarray(x["image_shape"])} == {(100, 160)}
    # mmdet's test padding: to a multiple of 32 of the image, not the training square.
    assert x["images"].shape[1:3] == (128, 160) != default_pad(scaled)
    assert x["images"].shape[1:3] == tuple(
        make_dataset(info, scale=scaled, batch_size=4, max_instances=6, pad_to=(128, 160), training=False)
        .element_spec[0]["images"].shape[1:3])


def _arrays(ds):
    return [np.concatenate([np.ravel(np.asarray(v)) for v in (*x.values(), *y.values())]) for x, y in ds]


def test_augmented_stream_is_a_pure_function_of_seed_and_position(tmp_path):
    info = _painted_folder(tmp_path)
    kw = dict(scale=[(160, 100), (128, 80)], batch_size=2, max_instances=6, crop_size=(0.6, 0.6),
              crop_type="relative_range", photometric_distortion=True, steps_per_epoch=2)
    a = _arrays(make_dataset(info, shuffle_seed=5, **kw))
    b = _arrays(make_dataset(info, shuffle_seed=5, **kw))
    c = _arrays(make_dataset(info, shuffle_seed=6, **kw))
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(u.shape == v.shape and np.array_equal(u, v) for u, v in zip(a, c))
    # Epoch 1 of a resumed run = batches 2..3 of the uninterrupted stream.
    tracker = EpochTracker()
    tracker.epoch = 1
    resumed = _arrays(make_dataset(info, shuffle_seed=5, epoch_tracker=tracker, **kw))
    long = _arrays(make_dataset(info, shuffle_seed=5, **dict(kw, steps_per_epoch=4)))
    assert all(np.array_equal(u, v) for u, v in zip(resumed, long[2:]))


def _tfds_like(n=4):
    """A dataset shaped like a `solov2_coco` split, without building one."""
    rng = np.random.default_rng(0)
    examples = []
    for i in range(n):
        masks = np.zeros((3, 50, 70, 1), np.uint8)
        masks[0, 5:20, 5:30] = masks[1, 25:45, 30:60] = masks[2, 0:50, 0:70] = 1
        examples.append({"image": rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), "image/id": np.int64(i + 1),
                         "objects": {"mask": masks, "label": np.array([0, 1, 2], np.int64),
                                     "is_crowd": np.array([False, False, True])}})
    return tf.data.Dataset.from_generator(
        lambda: iter(examples),
        output_signature={"image": tf.TensorSpec((None, None, 3), tf.uint8), "image/id": tf.TensorSpec((), tf.int64),
                          "objects": {"mask": tf.TensorSpec((None, None, None, 1), tf.uint8),
                                      "label": tf.TensorSpec((None,), tf.int64),
                                      "is_crowd": tf.TensorSpec((None,), tf.bool)}})


def test_tfds_route_is_seeded_by_index():
    kw = dict(scale=[(96, 64), (80, 48)], batch_size=2, max_instances=4, crop_size=(30, 40), crop_type="absolute",
              photometric_distortion={"hue_delta": 9})
    a = _arrays(make_tfds_dataset(_tfds_like(), seed=1, **kw))
    b = _arrays(make_tfds_dataset(_tfds_like(), seed=1, **kw))
    c = _arrays(make_tfds_dataset(_tfds_like(), seed=2, **kw))
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(u.shape == v.shape and np.array_equal(u, v) for u, v in zip(a, c))
    train = make_tfds_dataset(_tfds_like(), **kw)
    assert train.options().autotune.enabled is False  # see coco_folder._finished
    x, y = next(iter(train))
    labels = np.asarray(y["gt_labels"])
    assert set(labels.ravel()) <= {-1, 0, 1} and (labels == -1).all(axis=0)[2:].all()  # the crowd is left out
    assert np.all(np.asarray(x["images"]) >= 0) and np.all(np.asarray(x["images"]) <= 255)


def test_tfds_route_warns_once_per_image_over_max_instances(caplog):
    # Each example has 2 non-crowd instances: max_instances=1 keeps the first and says so.
    ds = make_tfds_dataset(_tfds_like().repeat(2), scale=(96, 64), batch_size=2, max_instances=1, training=False)
    with caplog.at_level("WARNING"):
        labels = np.concatenate([np.asarray(y["gt_labels"]) for _, y in ds])
    assert labels.shape == (8, 1) and (labels == 0).all()  # the first instance of each image
    warnings = [r.getMessage() for r in caplog.records if "max_instances" in r.getMessage()]
    assert sorted(warnings) == sorted(
        f"tfds example image/id {i} has 2 non-crowd instances; keeping the first 1 (max_instances)."
        for i in range(1, 5))
    caplog.clear()
    with caplog.at_level("WARNING"):
        list(make_tfds_dataset(_tfds_like(), scale=(96, 64), batch_size=2, max_instances=2, training=False))
    assert "max_instances" not in caplog.text


def test_photometric_distortion_changes_the_image_only(tmp_path):
    info = _painted_folder(tmp_path)
    kw = dict(scale=(160, 100), batch_size=4, max_instances=6, shuffle_seed=3, steps_per_epoch=1)
    (x0, y0), = make_dataset(info, **kw)
    (x1, y1), = make_dataset(info, photometric_distortion=True, **kw)
    (x2, _), = make_dataset(info, photometric_distortion=False, **kw)  # off = the default
    np.testing.assert_array_equal(np.asarray(x0["images"]), np.asarray(x2["images"]))
    for key in ("gt_masks", "gt_labels"):
        np.testing.assert_array_equal(np.asarray(y0[key]), np.asarray(y1[key]))
    np.testing.assert_array_equal(np.asarray(x0["image_shape"]), np.asarray(x1["image_shape"]))
    img0, img1 = np.asarray(x0["images"]), np.asarray(x1["images"])
    assert not np.allclose(img0, img1) and img1.min() >= 0 and img1.max() <= 255
    # Padding (rows 100.. of 160x100 content in a 160x160 pad) stays the mean pixel.
    np.testing.assert_allclose(img1[:, 100:], np.broadcast_to(PIXEL_MEAN, img1[:, 100:].shape), atol=1e-4)


def test_photometric_steps_follow_mmdet():
    image = tf.constant(np.array([[[200.0, 100.0, 50.0], [10.0, 20.0, 30.0]]], np.float32))
    off = {k: tf.constant(False) for k in ("brightness", "contrast", "contrast_first", "saturation", "hue", "swap")}
    params = dict(off, delta=tf.constant(20.0), alpha=tf.constant(0.5), saturation_factor=tf.constant(0.0),
                  hue_shift=tf.constant(0.5), perm=tf.constant([2, 1, 0]))
    from keras_solov2.data.transforms import apply_photometric

    def run(**flags):
        return apply_photometric(image, dict(params, **{k: tf.constant(v) for k, v in flags.items()})).numpy()

    np.testing.assert_allclose(run(), image.numpy())
    np.testing.assert_allclose(run(brightness=True), [[[220, 120, 70], [30, 40, 50]]])
    np.testing.assert_allclose(run(contrast=True), image.numpy() * 0.5)  # multiplicative, as mmdet
    np.testing.assert_allclose(run(saturation=True), [[[200] * 3, [30] * 3]], atol=1e-3)  # grey keeps V
    np.testing.assert_allclose(run(swap=True), image.numpy()[..., ::-1])
    hue = run(hue=True)  # half a turn: the complementary colour, same V and S
    np.testing.assert_allclose(hue[0, 0], [50, 150, 200], atol=1e-3)
    draws = PhotoMetricDistortion(hue_delta=18).sample(tf.constant([1, 2], tf.int64))
    assert abs(float(draws["hue_shift"])) <= 0.05 and 0.5 <= float(draws["alpha"]) <= 1.5
    # A pure function of the seed.
    again = PhotoMetricDistortion(hue_delta=18).sample(tf.constant([1, 2], tf.int64))
    assert all(np.array_equal(np.asarray(draws[k]), np.asarray(again[k])) for k in draws)


def test_sample_augmentation_crop_types():
    hw = tf.constant([100, 200])
    for crop_size, crop_type, check in [
        ((50, 300), "absolute", lambda ch, cw: (ch, cw) == (50, 200)),
        ((40, 80), "absolute_range", lambda ch, cw: 40 <= ch <= 80 and 40 <= cw <= 80),
        ((0.5, 0.25), "relative", lambda ch, cw: (ch, cw) == (50, 50)),
        ((0.5, 0.25), "relative_range", lambda ch, cw: 50 <= ch <= 100 and 50 <= cw <= 200),
    ]:
        boxes = set()
        for position in range(12):
            aug = sample_augmentation(tf.constant([0, position], tf.int64), hw, [(64, 32)], 0.5, crop_size, crop_type)
            top, left, ch, cw = (int(v) for v in aug["crop_box"])
            assert check(ch, cw), (crop_type, ch, cw)
            assert 0 <= top <= 100 - ch and 0 <= left <= 200 - cw
            boxes.add((top, left, ch, cw))
        assert len(boxes) > 1, crop_type  # random position (and size)
