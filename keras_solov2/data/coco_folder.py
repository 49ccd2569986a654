"""A COCO JSON + image folder as a `tf.data` pipeline for `model.fit` and evaluation.

Reads annotations with pycocotools (polygons, RLE and compressed RLE all
decode through `annToMask`), maps COCO category ids (1–90 with gaps) to
contiguous labels through the sorted category list (never `id - 1`), keeps
crowd regions out of the training targets (COCOeval uses them as ignore
regions), and refuses `file_name`s that escape the image root.

Batches follow the model's data contract:
`x = {"images": (B, H, W, 3) float32 RGB 0..255, "image_shape": (B, 2),
"original_shape": (B, 2), "image_id": (B,)}` and
`y = {"gt_masks": (B, M, H, W) uint8, "gt_labels": (B, M) int32, -1 = padding}`.
Images are resized keeping the aspect ratio into `scale` (mmdet
`Resize(keep_ratio=True)`), masks with nearest-neighbour sampling so they stay
{0, 1}, and padded at the bottom/right to the fixed `pad_to` size with the
mean pixel (which the model normalises to 0, as mmdet pads after
normalisation), so every batch has the same static shape.
"""

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PIXEL_MEAN = (123.675, 116.28, 103.53)
log = logging.getLogger(__name__)


@dataclass
class COCOFolderInfo:
    """What a dataset needs for training and evaluation."""

    annotation_file: str
    image_root: str
    category_ids: list  # contiguous label -> COCO category id
    class_names: list
    image_ids: list

    @property
    def num_classes(self):
        return len(self.category_ids)

    @property
    def label_to_category_id(self):
        return list(self.category_ids)


def load_coco(annotation_file):
    """pycocotools `COCO` of a JSON file, with a clear error for a bad file."""
    from pycocotools.coco import COCO

    path = Path(annotation_file)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist.")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(path))
    except Exception as e:  # json errors, missing keys
        raise ValueError(f"{path}: not a readable COCO instances file ({type(e).__name__}: {e}).") from e
    for key in ("images", "annotations", "categories"):
        if key not in coco.dataset:
            raise ValueError(f"{path}: missing the '{key}' list of a COCO instances file.")
    known = set(coco.cats)
    for ann in coco.dataset["annotations"]:
        if ann.get("category_id") not in known:
            raise ValueError(f"{path}: annotation {ann.get('id')} has unknown category_id {ann.get('category_id')}.")
        if ann.get("image_id") not in coco.imgs:
            raise ValueError(f"{path}: annotation {ann.get('id')} refers to unknown image_id {ann.get('image_id')}.")
    return coco


def safe_image_path(image_root, file_name, annotation_file="annotations"):
    """`image_root / file_name`, refusing absolute paths and `..` escapes."""
    root = Path(image_root).resolve()
    path = (root / file_name).resolve()
    if Path(file_name).is_absolute() or root not in path.parents:
        raise ValueError(f"{annotation_file}: file_name {file_name!r} escapes the image root {root}.")
    return path


def describe(annotation_file, image_root, image_ids=None):
    """`COCOFolderInfo` (category mapping in sorted-id order, image ids)."""
    coco = load_coco(annotation_file)
    cat_ids = sorted(coco.cats)
    ids = sorted(coco.imgs) if image_ids is None else [int(i) for i in image_ids]
    return COCOFolderInfo(str(annotation_file), str(image_root), cat_ids,
                          [coco.cats[c]["name"] for c in cat_ids], ids)


def split_ids(image_ids, val_fraction=0.2, seed=0):
    """Deterministic train/validation split of image ids."""
    ids = np.array(sorted(image_ids))
    rng = np.random.default_rng(seed)
    rng.shuffle(ids)
    n_val = max(1, int(round(len(ids) * val_fraction)))
    return sorted(ids[n_val:].tolist()), sorted(ids[:n_val].tolist())


def validate_images(coco, info, image_ids):
    """Checks every image before training starts (errors inside tf.data would
    surface as opaque TF errors): path inside the root, file present and
    readable, size equal to the JSON's. Reads headers only."""
    from PIL import Image

    for image_id in image_ids:
        img_info = coco.imgs[image_id]
        path = safe_image_path(info.image_root, img_info["file_name"], info.annotation_file)
        try:
            with Image.open(path) as im:
                w, h = im.size
        except FileNotFoundError:
            raise FileNotFoundError(f"{info.annotation_file}: image {image_id} file {path} does not exist.") from None
        except Exception as e:
            raise ValueError(f"{info.annotation_file}: image {image_id} file {path} is not a readable image ({e}).") from e
        if (img_info.get("height"), img_info.get("width")) != (h, w):
            raise ValueError(
                f"{info.annotation_file}: image {image_id} ({path.name}) is {h}x{w} but the JSON says "
                f"{img_info.get('height')}x{img_info.get('width')}."
            )


def _load_example(coco, info, image_id, max_instances):
    from PIL import Image

    img_info = coco.imgs[image_id]
    path = safe_image_path(info.image_root, img_info["file_name"], info.annotation_file)
    with Image.open(path) as im:
        image = np.asarray(im.convert("RGB"))  # grayscale, RGBA, palette -> RGB
    h, w = image.shape[:2]
    label_of = {c: i for i, c in enumerate(info.category_ids)}
    masks, labels = [], []
    for ann in coco.imgToAnns.get(image_id, []):
        if ann.get("iscrowd", 0):
            continue  # crowd regions are ignore regions for COCOeval, not positives
        m = coco.annToMask(ann)
        if not m.any():
            log.warning("%s: annotation %s has an empty mask; skipped.", info.annotation_file, ann["id"])
            continue
        masks.append(m)
        labels.append(label_of[ann["category_id"]])
    if len(masks) > max_instances:
        log.warning("%s: image %s has %d instances; keeping the first %d (max_instances).",
                    info.annotation_file, image_id, len(masks), max_instances)
        masks, labels = masks[:max_instances], labels[:max_instances]
    out_masks = np.zeros((max_instances, h, w), np.uint8)
    out_labels = -np.ones((max_instances,), np.int32)
    if masks:
        out_masks[: len(masks)] = np.stack(masks)
        out_labels[: len(labels)] = labels
    return image, out_masks, out_labels


def resize_flip_pad(image, masks, labels, original_shape, image_id, flip, scale, pad_to, max_instances):
    """One example → the model's `(x, y)` contract (see module doc).

    Keep-ratio resize into `scale` (bilinear image, nearest masks, mmcv's
    rounding), optional horizontal flip, bottom/right padding to `pad_to`
    with the mean pixel (images) and 0 (masks).
    """
    import tensorflow as tf

    long_side, short_side = max(scale), min(scale)
    ph, pw = pad_to
    h = tf.cast(original_shape[0], tf.float32)
    w = tf.cast(original_shape[1], tf.float32)
    factor = tf.minimum(long_side / tf.maximum(h, w), short_side / tf.minimum(h, w))
    factor = tf.minimum(factor, tf.minimum(ph / h, pw / w))
    # mmcv.rescale_size: int(x * factor + 0.5)
    nh = tf.cast(tf.floor(h * factor + 0.5), tf.int32)
    nw = tf.cast(tf.floor(w * factor + 0.5), tf.int32)
    image = tf.image.resize(tf.cast(image, tf.float32), (nh, nw), method="bilinear")
    masks = tf.image.resize(tf.transpose(masks, (1, 2, 0)), (nh, nw), method="nearest")
    image = tf.where(flip, image[:, ::-1], image)
    masks = tf.where(flip, masks[:, ::-1], masks)
    mean = tf.constant(PIXEL_MEAN, tf.float32)
    image = tf.pad(image - mean, [[0, ph - nh], [0, pw - nw], [0, 0]]) + mean
    masks = tf.pad(masks, [[0, ph - nh], [0, pw - nw], [0, 0]])
    masks = tf.transpose(masks, (2, 0, 1))
    image.set_shape((ph, pw, 3))
    masks.set_shape((max_instances, ph, pw))
    x = {"images": image, "image_shape": tf.stack([nh, nw]), "original_shape": tf.cast(original_shape, tf.int32),
         "image_id": tf.cast(image_id, tf.int64)}
    return x, {"gt_masks": masks, "gt_labels": labels}


def default_pad(scale):
    """A square of the long side rounded up to 32: fits landscape and portrait."""
    side = -(-max(scale) // 32) * 32
    return (side, side)


class EpochTracker:
    """Tells a training stream which epoch `fit` is in (a Keras callback).

    `fit` calls `on_epoch_begin(epoch)` with the true epoch index (also after
    `BackupAndRestore` resumed a run) before it creates that epoch's iterator,
    so the stream can start exactly at `epoch * steps_per_epoch` batches.
    """

    def __init__(self):
        self.epoch = 0

    def as_callback(self):
        import keras

        tracker = self

        class _Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                tracker.epoch = int(epoch)

        return _Callback()


def make_dataset(info, image_ids=None, scale=(1333, 800), pad_to=None, batch_size=2,
                 max_instances=100, training=True, flip_prob=0.5, shuffle_seed=0,
                 steps_per_epoch=None, epoch_tracker=None):
    """`tf.data.Dataset` of `(x, y)` batches from a COCO folder (see module doc).

    Training order and flips are a pure function of `(shuffle_seed, position
    in the stream)`: pass `p` over the images is a permutation seeded by
    `(shuffle_seed, p)`, and each example's flip by `(shuffle_seed, p, i)`.
    With an `epoch_tracker` (its callback in `fit`'s list) and
    `steps_per_epoch`, epoch `e` yields batches `e * steps_per_epoch ...`
    of that stream, so a run resumed by `BackupAndRestore` sees exactly the
    data the uninterrupted run would have, and epochs need not align with
    passes over the images.

    Args:
        info: `COCOFolderInfo` from `describe`.
        image_ids: ids to use (default: `info.image_ids`).
        scale: `(long, short)` keep-ratio resize target, mmdet style.
        pad_to: `(H, W)` fixed padded size; default: a square of the long
            side rounded up to a multiple of 32 (fits landscape and portrait).
        training: shuffle and flip (deterministically); otherwise file order.
        steps_per_epoch: batches per epoch (default: one pass).
        epoch_tracker: an `EpochTracker` whose callback is given to `fit`.
    """
    import tensorflow as tf

    coco = load_coco(info.annotation_file)
    ids = list(info.image_ids if image_ids is None else image_ids)
    validate_images(coco, info, ids)
    long_side, short_side = max(scale), min(scale)
    ph, pw = pad_to or default_pad(scale)
    n = len(ids)
    if steps_per_epoch is None:
        steps_per_epoch = n // batch_size if training else -(-n // batch_size)
    per_epoch = steps_per_epoch * batch_size if training else n

    def generate():
        epoch = epoch_tracker.epoch if epoch_tracker is not None else 0
        for position in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            if training:
                passes, i = divmod(position, n)
                image_id = ids[np.random.default_rng([shuffle_seed, passes]).permutation(n)[i]]
                flip = bool(np.random.default_rng([shuffle_seed, passes, i]).random() < flip_prob)
            else:
                image_id, flip = ids[position], False
            image, masks, labels = _load_example(coco, info, image_id, max_instances)
            yield image, masks, labels, np.array(image.shape[:2], np.int32), np.int64(image_id), flip

    sig = (
        tf.TensorSpec((None, None, 3), tf.uint8),
        tf.TensorSpec((max_instances, None, None), tf.uint8),
        tf.TensorSpec((max_instances,), tf.int32),
        tf.TensorSpec((2,), tf.int32),
        tf.TensorSpec((), tf.int64),
        tf.TensorSpec((), tf.bool),
    )

    def transform(image, masks, labels, original_shape, image_id, flip):
        return resize_flip_pad(image, masks, labels, original_shape, image_id, flip,
                               (long_side, short_side), (ph, pw), max_instances)

    ds = tf.data.Dataset.from_generator(generate, output_signature=sig)
    # A known length lets `fit` size epochs and progress bars.
    ds = ds.apply(tf.data.experimental.assert_cardinality(per_epoch))
    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=training).prefetch(tf.data.AUTOTUNE)


def make_tfds_dataset(ds, scale=(1333, 800), pad_to=None, batch_size=2, max_instances=100,
                      training=True, flip_prob=0.5, seed=0):
    """The same `(x, y)` batches from a `solov2_coco` tfds split.

    Crowd instances are left out of the targets; the first `max_instances`
    others are kept. Flips are seeded by `(seed, index in the split)`.
    Shuffle `ds` (e.g. `tfds.load(..., shuffle_files=True)` /
    `ds.shuffle(n, seed)`) before passing it for training.
    """
    import tensorflow as tf

    pad_to = pad_to or default_pad(scale)

    def prepare(index, ex):
        objects = ex["objects"]
        keep = tf.logical_not(objects["is_crowd"])
        hw = tf.shape(ex["image"])[:2]
        masks = tf.reshape(tf.boolean_mask(objects["mask"], keep), (-1, hw[0], hw[1]))
        labels = tf.cast(tf.boolean_mask(objects["label"], keep), tf.int32)
        n = tf.minimum(tf.shape(labels)[0], max_instances)
        masks = tf.pad(masks[:n], [[0, max_instances - n], [0, 0], [0, 0]])
        labels = tf.pad(labels[:n], [[0, max_instances - n]], constant_values=-1)
        if training and flip_prob > 0:
            u = tf.random.stateless_uniform((), seed=tf.stack([tf.cast(seed, tf.int64), index]))
            flip = u < flip_prob
        else:
            flip = tf.constant(False)
        return resize_flip_pad(ex["image"], masks, labels, hw, ex["image/id"], flip, scale, pad_to,
                               max_instances)

    ds = ds.enumerate().map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=training).prefetch(tf.data.AUTOTUNE)
