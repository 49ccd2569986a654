"""Per-example training transforms, in-graph and seeded statelessly.

The steps, in the order applied (mmdet's names):

1. `RandomCrop` (optional, off by default): a box of the *source* image,
   chosen as mmdet's `crop_type`s do; cropping before the resize means the
   crop is then scaled up to the training scale (a zoom-in).
2. `Resize(keep_ratio=True)` into `(long, short)`, or `RandomChoiceResize`
   when several `(long, short)` pairs are given (mmdet's 3x schedule), with
   mmcv's rounding; bilinear for the image.
3. `RandomFlip` (horizontal).
4. `PhotoMetricDistortion` (optional, off by default; image only).
5. `Pad` at the bottom/right with the mean pixel (which the model
   normalises to 0, as mmdet pads after normalisation) and 0 for masks: to
   a multiple of 32 (mmdet's `pad_size_divisor`, the default), or to a
   fixed `pad_to`, so every batch has one static shape.

Masks never go through an interpolating op: crop, resize and flip are one
index gather per axis (the pixels `tf.image.resize(method="nearest")`
picks, TF's half-pixel centres), so they stay uint8 {0, 1} and land on the
same pixels as the image content. An instance whose mask is empty after
these steps (cropped away, or too thin to survive the resize) is dropped:
its label becomes -1 and the remaining instances move up, so label >= 0
always means a non-empty mask.

Randomness: `sample_augmentation` draws every choice (scale, crop, flip,
jitter) with `tf.random.stateless_*` under seeds folded from one
per-example seed such as `(shuffle_seed, position in the stream)`. The
augmented stream is therefore a pure function of integers: identical across
runs, parallelism and resumption. (Keras's augmentation layers are not used
for that reason: they draw from stateful seed generators, and they resample
segmentation masks like images.)
"""

import dataclasses
import numbers

# The model's mean pixel (`models/solov2.py`; data code never imports model
# code, a test keeps the two equal): padding with it is 0 after normalising.
PIXEL_MEAN = (123.675, 116.28, 103.53)
CROP_TYPES = ("absolute", "absolute_range", "relative", "relative_range")

# Stream ids folded into the per-example seed, one per independent draw.
_SCALE, _CROP, _FLIP, _PHOTOMETRIC = 0, 1, 2, 3


def normalise_scales(scale):
    """`(long, short)` or a list of such pairs → a list of `(long, short)` int pairs.

    Either order is accepted inside a pair (`(1333, 800)` and `(800, 1333)`
    mean the same keep-ratio target, as in mmdet).
    """
    if isinstance(scale, (str, bytes)) or not hasattr(scale, "__len__"):
        raise ValueError(f"scale: {scale!r} is not (long, short) nor a list of (long, short) pairs.")
    pairs = [scale] if len(scale) == 2 and all(isinstance(v, numbers.Real) for v in scale) else list(scale)
    if not pairs:
        raise ValueError("scale: expected (long, short) or a non-empty list of (long, short) pairs.")
    out = []
    for pair in pairs:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(v, numbers.Real) and v > 0 for v in pair)):
            raise ValueError(f"scale: {pair!r} is not a (long, short) pair of positive sizes.")
        out.append((int(max(pair)), int(min(pair))))
    return out


def check_pad_to(pad_to):
    """`pad_to` as an `(H, W)` int pair of positive multiples of 32 (the
    model's size divisor), or None."""
    if pad_to is None:
        return None
    if (isinstance(pad_to, (str, bytes)) or not hasattr(pad_to, "__len__") or len(pad_to) != 2
            or not all(isinstance(v, numbers.Integral) and v > 0 and v % 32 == 0 for v in pad_to)):
        raise ValueError(f"pad_to {pad_to!r}: expected (H, W), positive multiples of 32 pixels "
                         "(e.g. default_pad(scale)).")
    return tuple(int(v) for v in pad_to)


def default_pad(scale):
    """A square of the longest side of `scale` (one pair or a list) rounded up
    to 32: fits landscape and portrait images at every scale."""
    side = -(-max(long for long, _ in normalise_scales(scale)) // 32) * 32
    return (side, side)


def check_crop(crop_size, crop_type):
    """Validates `crop_size` for `crop_type` (mmdet `RandomCrop` semantics, but `(h, w)` order).

    * `absolute`: `(h, w)` pixels of the source image (clipped to its size);
    * `absolute_range`: `(min, max)` pixels, height and width each drawn
      from `[min, max]` (clipped to the image);
    * `relative`: `(h, w)` fractions of the image size in (0, 1];
    * `relative_range`: `(h, w)` lower bounds; each fraction is drawn from
      `[bound, 1]`.

    Returns the pair as a tuple of floats (relative) or ints (absolute).
    """
    if crop_type not in CROP_TYPES:
        raise ValueError(f"crop_type {crop_type!r}: expected one of {CROP_TYPES}.")
    if len(crop_size) != 2:
        raise ValueError(f"crop_size {crop_size!r}: expected a pair.")
    if crop_type.startswith("relative"):
        if not all(0 < v <= 1 for v in crop_size):
            raise ValueError(f"crop_size {crop_size!r}: {crop_type} fractions must be in (0, 1].")
        return tuple(float(v) for v in crop_size)
    if not all(int(v) == v and v >= 1 for v in crop_size):
        raise ValueError(f"crop_size {crop_size!r}: {crop_type} sizes must be positive integers.")
    if crop_type == "absolute_range" and crop_size[0] > crop_size[1]:
        raise ValueError(f"crop_size {crop_size!r}: absolute_range needs min <= max.")
    return tuple(int(v) for v in crop_size)


@dataclasses.dataclass(frozen=True)
class PhotoMetricDistortion:
    """mmdet's `PhotoMetricDistortion` settings (its defaults and names).

    Each step happens with probability 0.5, contrast either before or after
    the HSV steps (also 0.5): brightness `+ U(-brightness_delta,
    brightness_delta)` (0..255 units), contrast `* U(contrast_range)`
    (multiplicative, as mmdet; not `tf.image.adjust_contrast`), saturation
    `* U(saturation_range)`, hue `+ U(-hue_delta, hue_delta)` degrees, and
    a random permutation of the RGB channels if `swap_channels`. Unlike
    mmdet, values are clipped to 0..255 after each step so the batch keeps
    its 0..255 contract.
    """

    brightness_delta: float = 32.0
    contrast_range: tuple = (0.5, 1.5)
    saturation_range: tuple = (0.5, 1.5)
    hue_delta: float = 18.0
    swap_channels: bool = True

    @classmethod
    def from_arg(cls, value):
        """`None`/`False` → None; `True` → mmdet's defaults; a dict → its overrides."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(f"photometric_distortion: expected None, a bool, a dict or {cls.__name__}, got {value!r}.")

    def sample(self, seed):
        """Draws the parameters for one image: a dict of scalar tensors (and `perm`, (3,))."""
        import tensorflow as tf

        seeds = [tf.random.experimental.stateless_fold_in(seed, k) for k in range(7)]
        flags = tf.random.stateless_uniform((6,), seeds[0]) < 0.5

        def uniform(s, lo, hi):
            return tf.random.stateless_uniform((), s, minval=float(lo), maxval=float(hi))

        return {
            "brightness": flags[0], "contrast": flags[1], "contrast_first": flags[2],
            "saturation": flags[3], "hue": flags[4], "swap": tf.logical_and(flags[5], self.swap_channels),
            "delta": uniform(seeds[1], -self.brightness_delta, self.brightness_delta),
            "alpha": uniform(seeds[2], *self.contrast_range),
            "saturation_factor": uniform(seeds[3], *self.saturation_range),
            # Degrees (mmdet, cv2 float HSV) → fraction of a turn (tf.image).
            "hue_shift": uniform(seeds[4], -self.hue_delta, self.hue_delta) / 360.0,
            "perm": tf.argsort(tf.random.stateless_uniform((3,), seeds[5])),
        }


def apply_photometric(image, params):
    """Applies drawn `PhotoMetricDistortion` parameters to a float32 0..255 RGB image."""
    import tensorflow as tf

    def clip(x):
        return tf.clip_by_value(x, 0.0, 255.0)

    image = tf.where(params["brightness"], clip(image + params["delta"]), image)
    contrast = params["contrast"]
    image = tf.where(contrast & params["contrast_first"], clip(image * params["alpha"]), image)

    def hsv_steps(x):
        hsv = tf.image.rgb_to_hsv(x / 255.0)
        h, s, v = tf.unstack(hsv, axis=-1)
        s = tf.where(params["saturation"], tf.clip_by_value(s * params["saturation_factor"], 0.0, 1.0), s)
        h = tf.where(params["hue"], tf.math.floormod(h + params["hue_shift"], 1.0), h)
        return clip(tf.image.hsv_to_rgb(tf.stack([h, s, v], axis=-1)) * 255.0)

    # The colour-space round trip is the expensive part: skip it when unused.
    image = tf.cond(params["saturation"] | params["hue"], lambda: hsv_steps(image), lambda: image)
    image = tf.where(contrast & ~params["contrast_first"], clip(image * params["alpha"]), image)
    return tf.cond(params["swap"], lambda: tf.gather(image, params["perm"], axis=-1), lambda: image)


def _crop_box(seed, image_hw, crop_size, crop_type):
    """`(top, left, height, width)` int32 of a random crop (mmdet `RandomCrop`)."""
    import tensorflow as tf

    h, w = image_hw[0], image_hw[1]
    size_seed, y_seed, x_seed = (tf.random.experimental.stateless_fold_in(seed, k) for k in range(3))

    def randint(s, lo, hi):  # inclusive bounds, like numpy's randint(lo, hi + 1)
        return tf.random.stateless_uniform((), s, minval=lo, maxval=hi + 1, dtype=tf.int32)

    if crop_type == "absolute":
        ch, cw = tf.minimum(crop_size[0], h), tf.minimum(crop_size[1], w)
    elif crop_type == "absolute_range":
        lo, hi = crop_size
        s_h, s_w = (tf.random.experimental.stateless_fold_in(size_seed, k) for k in range(2))
        ch = randint(s_h, tf.minimum(lo, h), tf.minimum(hi, h))
        cw = randint(s_w, tf.minimum(lo, w), tf.minimum(hi, w))
    else:
        frac = tf.constant(crop_size, tf.float32)
        if crop_type == "relative_range":
            frac = frac + tf.random.stateless_uniform((2,), size_seed) * (1.0 - frac)
        hw = tf.cast(tf.stack([h, w]), tf.float32)
        # mmdet: int(size * fraction + 0.5); at least one pixel.
        c = tf.maximum(tf.cast(tf.floor(hw * frac + 0.5), tf.int32), 1)
        ch, cw = c[0], c[1]
    top = randint(y_seed, 0, h - ch)
    left = randint(x_seed, 0, w - cw)
    return tf.stack([top, left, ch, cw])


def sample_augmentation(seed, image_hw, scales, flip_prob=0.5, crop_size=None, crop_type="absolute",
                        photometric_distortion=None):
    """Draws one example's augmentation from a stateless seed.

    Args:
        seed: `(2,)` int tensor, e.g. `(shuffle_seed, position)`.
        image_hw: `(2,)` int32 size of the source image.
        scales: list of `(long, short)` pairs (`normalise_scales`); one is
            chosen uniformly (mmdet `RandomChoiceResize`).
        flip_prob: probability of a horizontal flip.
        crop_size, crop_type: see `check_crop`; `None` = no crop.
        photometric_distortion: a `PhotoMetricDistortion` or `None`.

    Returns:
        Dict with `scale` `(2,)` int32 `(long, short)`, `flip` bool,
        `crop_box` `(4,)` int32 `(top, left, height, width)` (the whole
        image when not cropping) and `photometric` (drawn parameters or
        `None`): the keyword arguments of `resize_flip_pad`.
    """
    import tensorflow as tf

    seed = tf.cast(seed, tf.int64)
    table = tf.constant(scales, tf.int32)
    if len(scales) > 1:
        choice = tf.random.stateless_uniform((), tf.random.experimental.stateless_fold_in(seed, _SCALE),
                                             minval=0, maxval=len(scales), dtype=tf.int32)
        scale = table[choice]
    else:
        scale = table[0]
    image_hw = tf.cast(image_hw, tf.int32)
    if crop_size is None:
        crop_box = tf.stack([0, 0, image_hw[0], image_hw[1]])
    else:
        crop_box = _crop_box(tf.random.experimental.stateless_fold_in(seed, _CROP), image_hw,
                             check_crop(crop_size, crop_type), crop_type)
    if flip_prob > 0:
        flip = tf.random.stateless_uniform((), tf.random.experimental.stateless_fold_in(seed, _FLIP)) < flip_prob
    else:
        flip = tf.constant(False)
    photometric = None
    if photometric_distortion is not None:
        photometric = photometric_distortion.sample(tf.random.experimental.stateless_fold_in(seed, _PHOTOMETRIC))
    return {"scale": scale, "flip": flip, "crop_box": crop_box, "photometric": photometric}


def _nearest_source_indices(out_size, in_size):
    """Source index of each output pixel, exactly as TF's nearest resize
    (half-pixel centres, float32 `floor((i + 0.5) * in / out)`)."""
    import tensorflow as tf

    ratio = tf.cast(in_size, tf.float32) / tf.cast(out_size, tf.float32)
    src = tf.floor((tf.cast(tf.range(out_size), tf.float32) + 0.5) * ratio)
    return tf.minimum(tf.cast(src, tf.int32), in_size - 1)


def resize_flip_pad(image, masks, labels, original_shape, image_id, flip, scale, pad_to, max_instances,
                    crop_box=None, photometric=None):
    """One example → the model's `(x, y)` contract (see `coco_folder`).

    Args:
        image: `(H, W, 3)` uint8 (or float) RGB.
        masks: `(M, H, W)` uint8 {0, 1}, one per instance slot.
        labels: `(M,)` int32 contiguous labels, -1 = padding.
        original_shape: `(2,)` int `(H, W)` of the source image.
        image_id: scalar int.
        flip: scalar bool, horizontal flip.
        scale: `(long, short)` keep-ratio target, Python ints or a `(2,)`
            int32 tensor (a per-example random choice).
        pad_to: `(PH, PW)` Python ints, the fixed output size; or `None`
            for the resized content's own size rounded up to a multiple of
            32 (mmdet's `pad_size_divisor=32`; a batch is then padded to
            its largest image).
        max_instances: output instance slots, or `None` to keep `M`
            (after dropping empty masks).
        crop_box: optional `(4,)` int `(top, left, height, width)` in source
            pixels, applied before the resize.
        photometric: optional drawn `PhotoMetricDistortion` parameters.

    Returns:
        `x` with `images` `(PH, PW, 3)` float32 0..255 (padded with the
        mean pixel, which the model normalises to 0), `image_shape` `(2,)`
        (the resized content, before padding), `original_shape`,
        `image_id`; `y` with `gt_masks` `(max_instances, PH, PW)` uint8 and
        `gt_labels` `(max_instances,)` int32 (-1 = padding).
    """
    import tensorflow as tf

    original_shape = tf.cast(original_shape, tf.int32)
    if crop_box is None:
        crop_box = tf.stack([0, 0, original_shape[0], original_shape[1]])
    crop_box = tf.cast(crop_box, tf.int32)
    top, left, ch, cw = crop_box[0], crop_box[1], crop_box[2], crop_box[3]
    scale = tf.cast(scale, tf.float32)
    long_side, short_side = tf.reduce_max(scale), tf.reduce_min(scale)
    h, w = tf.cast(ch, tf.float32), tf.cast(cw, tf.float32)
    factor = tf.minimum(long_side / tf.maximum(h, w), short_side / tf.minimum(h, w))
    if pad_to is not None:
        factor = tf.minimum(factor, tf.minimum(pad_to[0] / h, pad_to[1] / w))
    # mmcv.rescale_size: int(x * factor + 0.5)
    nh = tf.cast(tf.floor(h * factor + 0.5), tf.int32)
    nw = tf.cast(tf.floor(w * factor + 0.5), tf.int32)
    ph, pw = pad_to if pad_to is not None else ((nh + 31) // 32 * 32, (nw + 31) // 32 * 32)

    image = tf.cast(image[top:top + ch, left:left + cw], tf.float32)
    image = tf.image.resize(image, (nh, nw), method="bilinear")
    image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    if photometric is not None:
        image = apply_photometric(image, photometric)

    # Crop + nearest resize + flip of the masks as one gather per axis.
    rows = top + _nearest_source_indices(nh, ch)
    cols = _nearest_source_indices(nw, cw)
    cols = left + tf.cond(flip, lambda: tf.reverse(cols, [0]), lambda: cols)
    masks = tf.gather(tf.gather(tf.cast(masks, tf.uint8), rows, axis=1), cols, axis=2)

    # Drop instances left without pixels; the rest keep their order.
    labels = tf.cast(labels, tf.int32)
    keep = tf.where((labels >= 0) & tf.reduce_any(masks > 0, axis=[1, 2]))[:, 0]
    masks, labels = tf.gather(masks, keep), tf.gather(labels, keep)
    slot_pad = 0
    if max_instances is not None:
        masks, labels = masks[:max_instances], labels[:max_instances]
        slot_pad = max_instances - tf.shape(labels)[0]
    labels = tf.pad(labels, [[0, slot_pad]], constant_values=-1)
    masks = tf.pad(masks, [[0, slot_pad], [0, ph - nh], [0, pw - nw]])

    mean = tf.constant(PIXEL_MEAN, tf.float32)
    image = tf.pad(image - mean, [[0, ph - nh], [0, pw - nw], [0, 0]]) + mean
    static = (None, None) if pad_to is None else pad_to
    image.set_shape((*static, 3))
    masks.set_shape((max_instances, *static))
    labels.set_shape((max_instances,))
    x = {"images": image, "image_shape": tf.stack([nh, nw]), "original_shape": original_shape,
         "image_id": tf.cast(image_id, tf.int64)}
    return x, {"gt_masks": masks, "gt_labels": labels}
