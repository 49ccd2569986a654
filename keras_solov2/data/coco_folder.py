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
`Resize(keep_ratio=True)`; a list of scales is mmdet's `RandomChoiceResize`),
masks with nearest-neighbour sampling so they stay {0, 1}, and padded at the
bottom/right with the mean pixel as mmdet pads them: each image to a
multiple of 32 and a batch to its largest image, training batches being of
one orientation (mmdet's `AspectRatioBatchSampler`); or to a fixed `pad_to`
size (one static shape). Optional random crops and photometric jitter (see
`transforms`). `M` is the largest instance count of the batch (at most
`max_instances`): the pipeline's buffers hold only real masks (a slot is a
full-size mask: 100 slots at 1344×1344 are 180 MB per image).
`static_slots=True` pads every batch to `max_instances` slots, which, with
`pad_to`, is the static shape `compile(jit_compile=True)` needs. The
model's step, traced once with unknown sizes and slot counts, serves them
all.

Bad inputs fail before training with the file and/or annotation id in the
message (missing, unreadable or wrongly sized images, unknown ids, paths
escaping the root, malformed segmentations), or are skipped with a logged
warning when the rest of the data is still usable: polygons with fewer than
3 points, annotations without any usable polygon, masks of zero area.
Images without annotations are kept as negatives.
"""

import contextlib
import io
import logging
import os
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keras_solov2.checks import positive_int
from keras_solov2.data.transforms import (  # noqa: F401  (re-exported: the pipeline's public pieces)
    PIXEL_MEAN,
    PhotoMetricDistortion,
    check_crop,
    check_pad_to,
    default_pad,
    normalise_scales,
    resize_flip_pad,
    sample_augmentation,
)
from keras_solov2.image_files import oriented_size, read_rgb, stored_size_hint

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
    if path.is_dir():
        raise IsADirectoryError(f"annotation file {path} is a folder; expected a COCO instances JSON file.")
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
        # Training reads any true value as crowd; pycocotools' evaluation
        # only the number 1: anything else would mean two things.
        crowd = ann.get("iscrowd", 0)
        if isinstance(crowd, (str, float)) or crowd not in (0, 1):
            raise ValueError(f"{path}: annotation {ann.get('id')} has iscrowd {crowd!r}; expected 0 or 1.")
    return coco


def safe_image_path(image_root, file_name, annotation_file="annotations"):
    """`image_root / file_name`, refusing absolute paths and `..` escapes.

    The check is on the path as written (normalised, symlinks not
    followed): a `file_name` can never climb out of the root, while an
    image folder that is itself a symlink inside the root (as the
    importers may leave) stays usable.
    """
    root = Path(os.path.abspath(image_root))
    path = Path(os.path.normpath(root / file_name))
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
    """Deterministic train/validation split of image ids: `val_fraction` of
    them (at least one when it is above 0; none at 0) for validation."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}.")
    ids = np.array(sorted(image_ids))
    rng = np.random.default_rng(seed)
    rng.shuffle(ids)
    n_val = max(1, int(round(len(ids) * val_fraction))) if val_fraction > 0 else 0
    if n_val >= len(ids):
        raise ValueError(f"val_fraction={val_fraction} of {len(ids)} images leaves none for training.")
    return sorted(ids[n_val:].tolist()), sorted(ids[:n_val].tolist())


def validate_images(coco, info, image_ids):
    """Checks every image before training starts (errors inside tf.data would
    surface as opaque TF errors): path inside the root, file present and
    readable, size (after EXIF orientation, as `read_rgb` reads it) equal to
    the JSON's. Reads headers only."""
    from PIL import Image

    for image_id in image_ids:
        img_info = coco.imgs[image_id]
        path = safe_image_path(info.image_root, img_info["file_name"], info.annotation_file)
        try:
            with Image.open(path) as im:
                h, w = oriented_size(im)
                expected = (img_info.get("height"), img_info.get("width"))
                hint = "" if expected == (h, w) else stored_size_hint(im, expected)
        except FileNotFoundError:
            raise FileNotFoundError(f"{info.annotation_file}: image {image_id} file {path} does not exist.") from None
        except Exception as e:
            raise ValueError(f"{info.annotation_file}: image {image_id} file {path} is not a readable image ({e}).") from e
        if expected != (h, w):
            raise ValueError(
                f"{info.annotation_file}: image {image_id} ({path.name}) is {h}x{w} but the JSON says "
                f"{expected[0]}x{expected[1]}.{hint}"
            )


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def clean_segmentation(ann, height, width, annotation_file="annotations"):
    """An annotation's segmentation made safe for pycocotools.

    pycocotools reads a 2-point polygon as a *box* and crashes on a 1-point
    one or on an empty list, so polygons with fewer than 3 points are
    dropped here. RLE `size`s must match the image (else pycocotools
    returns a mask of another shape).

    Args:
        ann: a COCO annotation dict.
        height, width: the image size from the JSON.

    Returns:
        `(segmentation, None)` to use, or `(None, reason)` to skip the
        annotation (no segmentation, or only degenerate polygons).

    Raises:
        ValueError naming the annotation id for a malformed segmentation.
    """
    where = f"{annotation_file}: annotation {ann.get('id')} (image {ann.get('image_id')})"
    segm = ann.get("segmentation")
    if segm is None or (isinstance(segm, (list, dict)) and len(segm) == 0):
        return None, "no segmentation"
    if isinstance(segm, dict):
        segm = [segm]
        single = True
    elif isinstance(segm, list):
        single = False
    else:
        raise ValueError(f"{where}: segmentation must be polygons or RLE, got {type(segm).__name__}.")
    if all(isinstance(p, dict) for p in segm):
        for rle in segm:
            if "counts" not in rle or "size" not in rle:
                raise ValueError(f"{where}: an RLE segmentation needs 'counts' and 'size'.")
            size = list(rle["size"]) if isinstance(rle["size"], (list, tuple)) else rle["size"]
            if size != [height, width]:
                raise ValueError(f"{where}: RLE size {size} differs from the image's {height}x{width}.")
            counts = rle["counts"]
            if isinstance(counts, list):  # uncompressed (COCO's crowd regions)
                if not all(isinstance(c, int) and c >= 0 for c in counts):
                    raise ValueError(f"{where}: uncompressed RLE counts must be non-negative integers.")
                if sum(counts) != height * width:
                    raise ValueError(f"{where}: uncompressed RLE counts sum to {sum(counts)}, "
                                     f"not {height}x{width} = {height * width}.")
            elif not isinstance(counts, (str, bytes)):
                raise ValueError(f"{where}: RLE counts must be a list or a compressed string.")
        return (segm[0] if single else segm), None
    if all(_is_number(v) for v in segm):
        raise ValueError(f"{where}: segmentation is a flat list of numbers; polygons are nested, "
                         "[[x0, y0, x1, y1, ...], ...].")
    if not all(isinstance(p, list) for p in segm):
        raise ValueError(f"{where}: segmentation must be a list of polygons [[x0, y0, ...], ...] or RLE.")
    for p in segm:
        if not all(_is_number(v) for v in p):
            raise ValueError(f"{where}: a polygon has a non-numeric or non-finite coordinate.")
        if len(p) % 2:
            raise ValueError(f"{where}: a polygon has an odd number ({len(p)}) of coordinates.")
    polygons = [p for p in segm if len(p) >= 6]
    if not polygons:
        return None, "degenerate polygon (< 3 points)"
    return (segm if len(polygons) == len(segm) else polygons), None


def check_annotations(coco, image_ids, annotation_file="annotations"):
    """Checks the segmentation of every annotation of `image_ids` up front
    (no rasterising), so malformed ones fail before training, and logs one
    summary of the annotations that will be skipped.

    Returns:
        Dict `annotation id -> reason` of the skipped annotations.
    """
    skipped = {}
    for image_id in image_ids:
        img = coco.imgs[image_id]
        for ann in coco.imgToAnns.get(image_id, []):
            _, reason = clean_segmentation(ann, img.get("height"), img.get("width"), annotation_file)
            if reason is not None:
                skipped[ann.get("id")] = reason
    if skipped:
        shown = ", ".join(f"{k} ({v})" for k, v in list(skipped.items())[:20])
        log.warning("%s: skipping %d annotation(s) without a usable segmentation: %s%s", annotation_file,
                    len(skipped), shown, " ..." if len(skipped) > 20 else "")
    return skipped


def instance_mask(coco, ann, segmentation, annotation_file="annotations"):
    """`(H, W)` uint8 {0, 1} mask of `ann` with a `clean_segmentation` result."""
    img = coco.imgs[ann["image_id"]]
    try:
        mask = coco.annToMask(dict(ann, segmentation=segmentation))
    except Exception as e:  # a corrupt compressed RLE string
        raise ValueError(f"{annotation_file}: annotation {ann.get('id')} (image {ann['image_id']}) "
                         f"does not decode ({type(e).__name__}: {e}).") from e
    if mask.shape != (img["height"], img["width"]):
        raise ValueError(f"{annotation_file}: annotation {ann.get('id')} decodes to a {mask.shape} mask, "
                         f"not the image's {img['height']}x{img['width']}.")
    return mask


def _load_example(coco, info, image_id, max_instances, warned=None):
    """Image `(H, W, 3)` uint8, masks `(K, H, W)` uint8 and labels `(K,)`
    int32 of the first `K <= max_instances` usable non-crowd instances."""
    img_info = coco.imgs[image_id]
    path = safe_image_path(info.image_root, img_info["file_name"], info.annotation_file)
    image = read_rgb(path, image_id, info.annotation_file)
    h, w = image.shape[:2]
    label_of = {c: i for i, c in enumerate(info.category_ids)}
    warned = set() if warned is None else warned
    masks, labels = [], []
    # Crowd regions are ignore regions for COCOeval, not positives.
    anns = [a for a in coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
    for ann in anns:
        segmentation, reason = clean_segmentation(ann, h, w, info.annotation_file)
        if reason is not None:
            continue  # counted and logged once by check_annotations
        m = instance_mask(coco, ann, segmentation, info.annotation_file)
        if not m.any():
            if ann.get("id") not in warned:  # once per annotation, not once per epoch
                warned.add(ann.get("id"))
                log.warning("%s: annotation %s has a zero-area mask; skipped.", info.annotation_file, ann.get("id"))
            continue
        if len(masks) == max_instances:
            if ("image", image_id) not in warned:
                warned.add(("image", image_id))
                log.warning("%s: image %s has more than %d instances; keeping the first %d (max_instances).",
                            info.annotation_file, image_id, max_instances, max_instances)
            break
        masks.append(m)
        labels.append(label_of[ann["category_id"]])
    out_masks = np.stack(masks) if masks else np.zeros((0, h, w), np.uint8)
    return image, out_masks, np.array(labels, np.int32)


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
                 steps_per_epoch=None, epoch_tracker=None, crop_size=None, crop_type="absolute",
                 photometric_distortion=None, static_slots=False):
    """`tf.data.Dataset` of `(x, y)` batches from a COCO folder (see module doc).

    The training stream is a pure function of `(shuffle_seed, position in
    the stream)`: pass `p` over the images is a permutation seeded by
    `(shuffle_seed, p)`, batched by orientation as mmdet batches
    (`OrientationGroupedOrder`), and every random choice for the example at
    `position` (scale, crop, flip, jitter) is drawn statelessly from the
    seed `(shuffle_seed, position)`. With an `epoch_tracker` (its callback
    in `fit`'s list) and `steps_per_epoch`, epoch `e` yields batches
    `e * steps_per_epoch ...` of that stream, so a run resumed by
    `BackupAndRestore` sees exactly the data the uninterrupted run would
    have, and epochs need not align with passes over the images.

    Args:
        info: `COCOFolderInfo` from `describe`.
        image_ids: ids to use (default: `info.image_ids`).
        scale: `(long, short)` keep-ratio resize target, mmdet style, or a
            list of such pairs of which training picks one per example
            (mmdet `RandomChoiceResize`, e.g. the 3x schedule's
            `[(1333, 800), (1333, 768), ..., (1333, 640)]`); evaluation
            uses the first pair.
        pad_to: `(H, W)` fixed padded size (images larger at their scale
            are shrunk to fit), for one static shape (`jit_compile` needs
            it; `default_pad(scale)` is a square that fits every image).
            Default: mmdet's padding, each image to a multiple of 32 and a
            batch to its largest image, training batches of one
            orientation, so that the S×S grids cover what they cover in
            mmdet, in training as at test time (a converted mmdet model
            predicts exactly as mmdet does); at 1333×800 a landscape batch
            is about 800×1344 instead of a 1344×1344 square.
        max_instances: the most instances kept per image (the first ones,
            with a logged warning naming the image when more are dropped).
        training: shuffle and augment (deterministically); otherwise file
            order, the first scale, no augmentation.
        flip_prob: probability of a horizontal flip (training).
        shuffle_seed: the seed of the order and of every augmentation.
        steps_per_epoch: batches per epoch (default: one pass).
        epoch_tracker: an `EpochTracker` whose callback is given to `fit`.
        crop_size: optional random crop of the source image before the
            resize (training), `(h, w)` in the units of `crop_type`;
            instances left without pixels are dropped (label -1).
        crop_type: `"absolute"`, `"absolute_range"`, `"relative"` or
            `"relative_range"` (mmdet `RandomCrop`; see
            `transforms.check_crop`).
        photometric_distortion: `None`/`False` (default), `True` for
            mmdet's `PhotoMetricDistortion` defaults, or a dict of its
            settings / a `PhotoMetricDistortion` (training, image only).
        static_slots: pad every batch to `max_instances` instance slots
            (static shapes, with `pad_to`, for `compile(jit_compile=True)`);
            by default a batch has as many slots as its image with most
            instances.
    """
    import tensorflow as tf

    positive_int("batch_size", batch_size)
    positive_int("max_instances", max_instances)
    positive_int("steps_per_epoch", steps_per_epoch, allow_none=True)
    # The arguments first, before any file is read.
    scales = normalise_scales(scale)
    pad_to = check_pad_to(pad_to)
    if crop_size is not None:
        check_crop(crop_size, crop_type)
    photometric = PhotoMetricDistortion.from_arg(photometric_distortion)
    coco = load_coco(info.annotation_file)
    ids = list(info.image_ids if image_ids is None else image_ids)
    if not ids:
        raise ValueError(f"{info.annotation_file}: no images to make a dataset of (image_ids is empty).")
    unknown = [i for i in ids if i not in coco.imgs]
    if unknown:
        raise ValueError(f"{info.annotation_file} has no image with id {unknown[0]}"
                         f"{f' (nor {len(unknown) - 1} other requested ids)' if len(unknown) > 1 else ''}.")
    if training and steps_per_epoch is None and len(ids) < batch_size:
        # Training drops the last partial batch: an epoch would have no step.
        raise ValueError(
            f"{info.annotation_file}: {len(ids)} training images, fewer than batch_size={batch_size}: "
            "lower batch_size or pass steps_per_epoch (the stream repeats the images)."
        )
    validate_images(coco, info, ids)
    check_annotations(coco, ids, info.annotation_file)
    n = len(ids)
    if steps_per_epoch is None:
        steps_per_epoch = n // batch_size if training else -(-n // batch_size)
    per_epoch = steps_per_epoch * batch_size if training else n
    warned = set()
    if training:
        # With pad_to every batch has one shape: one orientation, i.e. plain shuffled passes.
        portrait = [coco.imgs[i]["width"] < coco.imgs[i]["height"] for i in ids] if pad_to is None else [False] * n
        order = OrientationGroupedOrder(portrait, batch_size, shuffle_seed)

    def generate():
        epoch = epoch_tracker.epoch if epoch_tracker is not None else 0
        for position in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            image_id = ids[order[position]] if training else ids[position]
            image, masks, labels = _load_example(coco, info, image_id, max_instances, warned)
            yield image, masks, labels, np.array(image.shape[:2], np.int32), np.int64(image_id), np.int64(position)

    sig = (
        tf.TensorSpec((None, None, 3), tf.uint8),
        tf.TensorSpec((None, None, None), tf.uint8),  # only the real instances: resizing is per mask
        tf.TensorSpec((None,), tf.int32),
        tf.TensorSpec((2,), tf.int32),
        tf.TensorSpec((), tf.int64),
        tf.TensorSpec((), tf.int64),
    )

    def transform(image, masks, labels, original_shape, image_id, position):
        if training:
            seed = tf.stack([tf.constant(shuffle_seed, tf.int64), position])
            aug = sample_augmentation(seed, original_shape, scales, flip_prob, crop_size, crop_type, photometric)
        else:
            aug = {"scale": scales[0], "flip": tf.constant(False)}
        return resize_flip_pad(image, masks, labels, original_shape, image_id, pad_to=pad_to,
                               max_instances=max_instances if static_slots else None, **aug)

    ds = tf.data.Dataset.from_generator(generate, output_signature=sig)
    # A known length lets `fit` size epochs and progress bars.
    ds = ds.apply(tf.data.experimental.assert_cardinality(per_epoch))
    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _finished(_padded_batch(ds, batch_size, drop_remainder=training))


class OrientationGroupedOrder:
    """Position in a training stream → index of its image, batched as mmdet batches.

    Pass `p` over the `n` images is a permutation seeded by `(seed, p)`;
    each image joins the pending group of its orientation (portrait, or
    landscape/square) and a group that reaches `batch_size` is the
    stream's next batch (mmdet's `AspectRatioBatchSampler`; a group's
    partial batch carries over to the next pass). So every batch is of one
    orientation and, padded to its largest image, about one image's size
    (mmdet pads a batch so). One orientation only (or `batch_size=1`):
    the permutations themselves, one after the other.

    Example:
    >>> order = OrientationGroupedOrder([True, False, True, False], batch_size=2, seed=0)
    >>> pairs = [(order[2 * k], order[2 * k + 1]) for k in range(4)]
    >>> all(a % 2 == b % 2 for a, b in pairs)
    True
    """

    def __init__(self, portrait, batch_size, seed):
        self.portrait = np.asarray(portrait, bool)
        self.batch_size, self.seed = int(batch_size), seed
        self._passes, self._pending = 0, {False: [], True: []}
        self._chunks, self._ends = [], []  # the stream so far, one int32 array per pass

    def __getitem__(self, position):
        while not self._ends or self._ends[-1] <= position:
            self._add_pass()
        k = int(np.searchsorted(self._ends, position, side="right"))
        return int(self._chunks[k][position - (self._ends[k - 1] if k else 0)])

    def _add_pass(self):
        emitted = []
        for j in np.random.default_rng([self.seed, self._passes]).permutation(len(self.portrait)):
            group = self._pending[bool(self.portrait[j])]
            group.append(int(j))
            if len(group) == self.batch_size:
                emitted.extend(group)
                group.clear()
        self._passes += 1
        self._chunks.append(np.asarray(emitted, np.int32))
        self._ends.append((self._ends[-1] if self._ends else 0) + len(emitted))


def _padded_batch(ds, batch_size, drop_remainder=False):
    """`ds.padded_batch`: each dimension padded to the batch's largest.

    Instance slots an image lacks get masks of 0 and label -1. Images of
    different sizes (each already a multiple of 32) are padded with the mean
    pixel, as each image is, which the model normalises to 0: mmdet pads a
    batch so (`pad_size_divisor=32`), and the S×S grids then cover what they
    cover in mmdet (a fixed square padding would change that, and the
    predictions with it). Statically shaped components are unchanged.
    """
    import tensorflow as tf

    values = tf.nest.map_structure(lambda spec: tf.constant(0, spec.dtype), ds.element_spec)
    values[1]["gt_labels"] = tf.constant(-1, ds.element_spec[1]["gt_labels"].dtype)
    if ds.element_spec[0]["images"].shape.is_fully_defined():
        return ds.padded_batch(batch_size, padding_values=values, drop_remainder=drop_remainder)
    # padded_batch pads with one scalar per component: pad the mean-subtracted images with 0.
    mean = tf.constant(PIXEL_MEAN, tf.float32)
    ds = ds.map(lambda x, y: (dict(x, images=x["images"] - mean), y),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.padded_batch(batch_size, padding_values=values, drop_remainder=drop_remainder)
    return ds.map(lambda x, y: (dict(x, images=x["images"] + mean), y))


def make_tfds_dataset(ds, scale=(1333, 800), pad_to=None, batch_size=2, max_instances=100,
                      training=True, flip_prob=0.5, seed=0, crop_size=None, crop_type="absolute",
                      photometric_distortion=None, static_slots=False):
    """The same `(x, y)` batches from a `solov2_coco` tfds split.

    Crowd instances are left out of the targets; the first `max_instances`
    others are kept (a warning names each image over that, once). Every
    random choice (scale, crop, flip, jitter) is drawn statelessly from the
    seed `(seed, index in ds)`. Shuffle `ds` (e.g. `tfds.load(...,
    shuffle_files=True)` / `ds.shuffle(n, seed)`) before passing it for
    training. Without `pad_to`, training batches are grouped by orientation
    as they arrive (`tf.data`'s `group_by_window`, as mmdet's
    `AspectRatioBatchSampler`; the groups left unfilled at the end of a
    finite `ds` make mixed batches, as mmdet's). The other arguments are
    `make_dataset`'s.
    """
    import tensorflow as tf

    positive_int("batch_size", batch_size)
    positive_int("max_instances", max_instances)
    scales = normalise_scales(scale)
    pad_to = check_pad_to(pad_to)
    if crop_size is not None:
        check_crop(crop_size, crop_type)
    photometric = PhotoMetricDistortion.from_arg(photometric_distortion)
    warned = set()

    def warn_over_cap(image_id, count):
        image_id = int(image_id.numpy())
        if image_id not in warned:  # once per image, not once per epoch
            warned.add(image_id)
            log.warning("tfds example image/id %d has %d non-crowd instances; keeping the first %d "
                        "(max_instances).", image_id, int(count.numpy()), max_instances)
        return True

    def prepare(index, ex):
        objects = ex["objects"]
        keep = tf.logical_not(objects["is_crowd"])
        hw = tf.shape(ex["image"])[:2]
        masks = tf.reshape(tf.boolean_mask(objects["mask"], keep), (-1, hw[0], hw[1]))
        labels = tf.cast(tf.boolean_mask(objects["label"], keep), tf.int32)
        count = tf.shape(labels)[0]
        # The warning needs Python (logging, once per image); only images over the cap reach it.
        noted = tf.cond(count > max_instances,
                        lambda: tf.py_function(warn_over_cap, [ex["image/id"], count], tf.bool),
                        lambda: tf.constant(False))
        with tf.control_dependencies([noted]):
            masks, labels = masks[:max_instances], labels[:max_instances]
        if training:
            example_seed = tf.stack([tf.constant(seed, tf.int64), index])
            aug = sample_augmentation(example_seed, hw, scales, flip_prob, crop_size, crop_type, photometric)
        else:
            aug = {"scale": scales[0], "flip": tf.constant(False)}
        return resize_flip_pad(ex["image"], masks, labels, hw, ex["image/id"], pad_to=pad_to,
                               max_instances=max_instances if static_slots else None, **aug)

    ds = ds.enumerate().map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if training and pad_to is None:
        # mmdet's AspectRatioBatchSampler: a full group of one orientation (of
        # the source image) is emitted as `batch_size` consecutive examples, so
        # batching the flat stream keeps the groups; the groups left unfilled at
        # the end make mixed batches, and there are `len(ds) // batch_size`.
        def orientation(x, y):
            return tf.cast(x["original_shape"][1] < x["original_shape"][0], tf.int64)

        examples = int(ds.cardinality())
        ds = ds.group_by_window(orientation, lambda _, window: window, window_size=batch_size)
        ds = _padded_batch(ds, batch_size, drop_remainder=True)
        if examples >= 0:  # a known length (not an infinite .repeat()) lets `fit` size epochs
            ds = ds.apply(tf.data.experimental.assert_cardinality(examples // batch_size))
        return _finished(ds)
    return _finished(_padded_batch(ds, batch_size, drop_remainder=training))


def _finished(ds):
    """`ds` prefetched, with tf.data's autotuning model off.

    That model's thread (one per iterator) did not always wake when its
    iterator was deleted, and the deletion, run by Python holding the GIL,
    then waited for the thread's next optimisation round (up to 60 s):
    with TensorFlow 2.21, `keras-solov2 train` on `coco_train_mini`
    (12 steps at 768×512) hung 24–35 s at the end of `fit` in 8 of 9 runs
    (58–59 s instead of 33–34 s without the validation callback), in none
    of 6 with the model off, whose steps took as long; the demo's pipeline
    (slices in memory, batched) began some epochs 9–10 s late, after the
    last epoch's iterator, and never with the model off. Without the model,
    `num_parallel_calls=AUTOTUNE` is the number of cores (at most 16) and
    the prefetch buffer is still sized as the consumer waits.
    A later `ds.with_options(...)` can turn it back on.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)
