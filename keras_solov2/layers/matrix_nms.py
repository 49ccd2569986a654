"""`MatrixNMS`: mmdetection's `mask_matrix_nms` as a batched, static-shape Keras layer."""

import functools
import os

import keras
import numpy as np
from keras import ops

from keras_solov2.gather import take_rows

# Integers up to 2**8 are exact in bfloat16 (8 significant bits): a 0/1
# matmul over blocks of this many pixels has exact bfloat16 partial sums.
_EXACT_BF16_BLOCK = 256


@functools.lru_cache(maxsize=None)
def bfloat16_matmul_is_fast():
    """Whether this host multiplies bfloat16 matrices natively (x86 AVX512-BF16
    or AMX). There oneDNN's bfloat16 matmul is ≈2.4× its float32 one; without
    those units it is emulated and slower. `KERAS_SOLOV2_BF16_MATMUL=0|1`
    overrides the detection."""
    forced = os.environ.get("KERAS_SOLOV2_BF16_MATMUL")
    if forced is not None:
        return forced == "1"
    if keras.backend.backend() != "tensorflow":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def binary_intersections(masks_a, masks_b):
    """Exact pairwise pixel intersections of binary masks, one matmul.

    Args:
        masks_a: `(B, N, P)` 0/1 masks, flattened (any float or bool dtype).
        masks_b: `(B, M, P)` 0/1 masks.

    Returns:
        `(B, N, M)` float32 intersection counts, exact.

    On hosts with native bfloat16 matmul the product runs in bfloat16 over
    blocks of 256 pixels, whose partial sums (≤ 256) bfloat16 holds exactly,
    and the blocks are summed in float32; elsewhere in float32, exact below
    2**24 pixels.
    """
    if not bfloat16_matmul_is_fast():
        a = ops.cast(masks_a, "float32")
        b = ops.cast(masks_b, "float32")
        return ops.matmul(a, ops.transpose(b, (0, 2, 1)))
    a = ops.cast(masks_a, "bfloat16")
    b = ops.cast(masks_b, "bfloat16")
    pixels = ops.shape(a)[2]
    pad = (-pixels) % _EXACT_BF16_BLOCK
    a = ops.pad(a, [[0, 0], [0, 0], [0, pad]])
    b = ops.pad(b, [[0, 0], [0, 0], [0, pad]])

    def blocks(t):  # (B, N, P) -> (B, P / 256, N, 256)
        shape = ops.shape(t)
        t = ops.reshape(t, (shape[0], shape[1], -1, _EXACT_BF16_BLOCK))
        return ops.transpose(t, (0, 2, 1, 3))

    partial = ops.matmul(blocks(a), ops.transpose(blocks(b), (0, 1, 3, 2)))
    return ops.sum(ops.cast(partial, "float32"), axis=1)


# Rows per block of the label-blocked IoU: small enough that a block spans
# few labels, large enough for an efficient matmul (tuned on this project's
# 2-core Zen 4 benchmark: 32 beat 64 and 128).
_ROW_BLOCK = 32
# Past this fraction of the N×N pairs the blocked products cost more than
# one full product (smaller matmuls, a loop): measured break-even ≈ 0.25.
_BLOCKED_MAX_FRACTION = 0.25
# Same-label pairs per step of the bit-packed path: its two row gathers
# take 2 × 4096 × P / 8 bytes (69 MB for 200×336 masks).
_PAIR_CHUNK = 4096
# Past this fraction of the N×N pairs (few labels: at most 1/2, one label)
# one full product is cheaper than counting the pairs bit-packed: measured
# break-even 0.25 (500 masks of 200×336; both ≈ 130 ms there, on Zen 4).
_PACKED_MAX_FRACTION = 0.25


def packed_pairs_available():
    """Whether the bit-packed path of `same_label_intersections` runs here:
    it needs a bitcast and a population count, which TensorFlow has and
    `keras.ops` has not."""
    return keras.backend.backend() == "tensorflow"


def pack_bits(flat):
    """0/1 masks → 64 pixels per `uint64` word (TensorFlow only).

    Args:
        flat: `(B, N, P)` 0/1 masks, flattened (bool or any number dtype).

    Returns:
        `(B, N, ceil(P / 64))` uint64. The population count of two masks'
        words ANDed counts their common pixels among those 64.
    """
    import tensorflow as tf

    shape = tf.shape(flat)
    as_bytes = tf.cast(tf.cast(flat, tf.bool), tf.uint8)
    as_bytes = tf.pad(as_bytes, [[0, 0], [0, 0], [0, (-shape[2]) % 64]])
    # 8 pixels per word, a byte each (0 or 1). The product with
    # Σ_{j=0..7} 2**(7·j + 7) moves byte k's bit to bit 56 + k of the word;
    # the other partial products stay below bit 56 without carries, or
    # overflow: the top byte holds the 8 pixels as bits.
    words = tf.bitcast(tf.reshape(as_bytes, (shape[0], shape[1], -1, 8)), tf.uint64)
    spread = tf.bitwise.right_shift(words * tf.constant(0x0102040810204080, tf.uint64), tf.constant(56, tf.uint64))
    return tf.bitcast(tf.reshape(tf.cast(spread, tf.uint8), (shape[0], shape[1], -1, 8)), tf.uint64)


def packed_intersections(packed, rows):
    """Exact pixel intersections of pairs of bit-packed masks (TensorFlow only).

    Args:
        packed: `(R, W)` uint64 masks (`pack_bits`, batch folded into rows).
        rows: `(Q, 2)` int32, the two rows of `packed` of each pair.

    Returns:
        `(Q,)` int32 counts, computed `_PAIR_CHUNK` pairs at a time (the
        gathered words of all pairs would take Q × W × 16 bytes).
    """
    import tensorflow as tf

    num = tf.shape(rows)[0]
    steps = (num + _PAIR_CHUNK - 1) // _PAIR_CHUNK

    def step(i, counts):
        part = rows[i * _PAIR_CHUNK : (i + 1) * _PAIR_CHUNK]
        common = tf.bitwise.bitwise_and(tf.gather(packed, part[:, 0]), tf.gather(packed, part[:, 1]))
        bits = tf.raw_ops.PopulationCount(x=common)  # (chunk, W) uint8, ≤ 64
        return i + 1, counts.write(i, tf.reduce_sum(tf.cast(bits, tf.int32), axis=1))

    def loop():
        counts = tf.TensorArray(tf.int32, size=steps, element_shape=tf.TensorShape([None]), infer_shape=False)
        return tf.while_loop(lambda i, _: i < steps, step, (tf.constant(0), counts))[1].concat()

    # (An empty TensorArray cannot be concatenated.)
    return tf.cond(num > 0, loop, lambda: tf.zeros((0,), tf.int32))


def same_label_intersections(flat, order, labels, valid, subset=True):
    """Pixel intersections of every same-label pair, in score order.

    Matrix NMS only reads the IoU of pairs with the same label, above the
    diagonal: with 80 mixed labels ≈ 1/160 of the N×N pairs. On TensorFlow
    the masks are bit-packed (`pack_bits`) and only those pairs are counted
    (`packed_intersections`): for 500 masks of 200×336 with 80 labels,
    9–11 ms against 42–48 ms for the label-blocked products below and
    ≈ 130 ms for one full bfloat16 product (2-core Zen 4). Elsewhere the
    masks are put in label order (stable, so score order within a label)
    and each block of `_ROW_BLOCK` rows is multiplied only with the
    contiguous run of later columns whose labels fall in the block's label
    range. When the pairs to count exceed a fraction of all
    (`_PACKED_MAX_FRACTION`, `_BLOCKED_MAX_FRACTION`: few labels), one full
    product is cheaper and is used instead.

    Args:
        flat: `(B, N, P)` 0/1 masks, flattened, in input order.
        order: `(B, n)` int, the score order (indices into N).
        labels: `(B, n)` int32 labels in score order.
        valid: `(B, n)` bool in score order; invalid entries need no
            intersections.
        subset: whether `order` may omit masks (`n < N`, or unknown); if
            not, the full product runs on `flat` as it is and only the
            small `(N, N)` result is permuted.

    Returns:
        `(B, n, n)` float32 intersection counts in score order, exact for
        every valid same-label pair; other entries are 0 or exact counts.
    """
    order = ops.cast(order, "int32")

    def reorder(pairs, index):  # pairs[b, index[b, i], index[b, j]]
        pairs = ops.take_along_axis(pairs, index[:, :, None], axis=1)
        return ops.take_along_axis(pairs, index[:, None, :], axis=2)

    def full():
        if subset:
            rows = take_rows(flat, order)
            return binary_intersections(rows, rows)
        return reorder(binary_intersections(flat, flat), order)

    if packed_pairs_available():
        return _packed_or_full(flat, order, labels, valid, full)
    return _blocked_or_full(flat, order, labels, valid, full, reorder)


def _packed_or_full(flat, order, labels, valid, full):
    """`same_label_intersections` on TensorFlow: bit-packed pairs, or `full()`."""
    import tensorflow as tf

    batch, n = tf.shape(order)[0], tf.shape(order)[1]
    rank = tf.range(n)
    wanted = (
        (labels[:, :, None] == labels[:, None, :])
        & (rank[:, None] < rank[None, :])[None]
        & valid[:, :, None]
        & valid[:, None, :]
    )
    num_pairs = tf.reduce_sum(tf.cast(wanted, tf.int32))

    def packed():
        pairs = tf.cast(tf.where(wanted), tf.int32)  # (Q, 3): b, i, j
        # Row of `flat`'s (B·N) rows of each score-ordered mask, and of each pair's two masks.
        mask_rows = tf.reshape(order + tf.range(batch)[:, None] * tf.shape(flat)[1], (-1,))
        rows = tf.gather(mask_rows, pairs[:, :1] * n + pairs[:, 1:])  # (Q, 2)
        words = pack_bits(flat)
        counts = packed_intersections(tf.reshape(words, (-1, tf.shape(words)[2])), rows)
        return tf.scatter_nd(pairs, tf.cast(counts, tf.float32), (batch, n, n))

    limit = _PACKED_MAX_FRACTION * tf.cast(n * n, tf.float32)
    return tf.cond(tf.cast(num_pairs, tf.float32) > limit, full, packed)


def _blocked_or_full(flat, order, labels, valid, full, reorder):
    """`same_label_intersections` in `keras.ops`: label-blocked products, or `full()`."""
    batch, n = ops.shape(order)[0], ops.shape(order)[1]
    rank = ops.arange(n, dtype="int32")[None, :]
    # Invalid entries sort after every label (sentinel = largest label + 1).
    sentinel = ops.max(ops.where(valid, labels, 0)) + 1
    key = ops.where(valid, labels, sentinel)
    by_label = ops.argsort(key * n + rank, axis=1)  # unique keys: a stable sort
    key = ops.take_along_axis(key, by_label, axis=1)

    blocks = (n + _ROW_BLOCK - 1) // _ROW_BLOCK
    padded = blocks * _ROW_BLOCK
    key = ops.pad(key, [[0, 0], [0, padded - n]], constant_values=sentinel)
    block_key = ops.reshape(key, (batch, blocks, _ROW_BLOCK))
    block_valid = block_key < sentinel
    big = ops.cast(2**30, key.dtype)
    low = ops.min(ops.where(block_valid, block_key, big), axis=2)  # (B, blocks)
    high = ops.max(ops.where(block_valid, block_key, -1), axis=2)
    # Columns [start, stop) holding each block's labels (over the batch),
    # from the block's first row on (pairs below the diagonal are unused).
    start = ops.min(ops.sum(ops.cast(key[:, None, :] < low[:, :, None], "int32"), axis=2), axis=0)
    stop = ops.max(ops.sum(ops.cast(key[:, None, :] <= high[:, :, None], "int32"), axis=2), axis=0)
    first = ops.arange(blocks, dtype="int32") * _ROW_BLOCK
    col_start = ops.minimum(ops.maximum(start, first), padded)
    col_stop = ops.maximum(stop, col_start)
    blocked_pairs = ops.sum(col_stop - col_start) * _ROW_BLOCK

    def blocked():
        rows = take_rows(flat, ops.take_along_axis(order, by_label, axis=1))
        rows = ops.pad(rows, [[0, 0], [0, padded - n], [0, 0]])

        def row_block(r, acc):
            c0, c1 = col_start[r], col_stop[r]
            a = ops.slice(rows, [0, r * _ROW_BLOCK, 0], [batch, _ROW_BLOCK, ops.shape(rows)[2]])
            b = ops.slice(rows, [0, c0, 0], [batch, c1 - c0, ops.shape(rows)[2]])
            inter = binary_intersections(a, b)  # (B, ROW_BLOCK, c1 - c0)
            inter = ops.pad(inter, [[0, 0], [0, 0], [c0, padded - c1]])
            return ops.slice_update(acc, [0, r * _ROW_BLOCK, 0], inter)

        acc = ops.fori_loop(0, blocks, row_block, ops.zeros((batch, padded, padded), "float32"))
        return reorder(acc[:, :n, :n], ops.argsort(by_label, axis=1))  # back to score order

    return ops.cond(
        ops.cast(blocked_pairs, "float32") > _BLOCKED_MAX_FRACTION * ops.cast(padded * padded, "float32"),
        full,
        blocked,
    )


@keras.saving.register_keras_serializable(package="keras_solov2")
class MatrixNMS(keras.layers.Layer):
    """Matrix NMS for masks (SOLOv2), exactly as mmdetection's `mask_matrix_nms`.

    Scores are sorted (descending) and the top `nms_pre` kept; the pairwise mask
    IoU of same-label pairs is computed from bit-packed masks, or by matmuls
    over label blocks (`same_label_intersections`; mmdet computes all N²
    pairs, then discards the other labels); for every mask `j` the decay
    coefficient is `min_i f(iou_ij) / f(compensate_i)` over the higher-scored
    masks `i` of the same label, where `compensate_i` is the largest IoU mask
    `i` itself had with a higher-scored same-label mask and
    `f(x) = exp(-sigma * x**2)` ("gaussian"; note `* sigma`, not `/ sigma`, as
    mmdet) or `1 - x` ("linear", as a ratio of `1 - iou`). Decayed scores
    below `filter_thr` are dropped and the rest re-sorted and cut to
    `max_per_img`.

    The output is padded to `max_per_img` (index `-1`, score `0`, label
    `-1`); N may be static or dynamic (a `tf.function` with an unknown N
    traces once).

    Args:
        kernel: `"gaussian"` or `"linear"`.
        sigma: float, the gaussian kernel's `sigma`.
        filter_thr: float, decayed scores `< filter_thr` are dropped; `<= 0`
            keeps all (mmdet's `-1`).
        nms_pre: int, masks kept after the first sort; `<= 0` keeps all.
        max_per_img: int, detections returned; `<= 0` returns every mask
            that entered (`min(N, nms_pre)`).

    Call arguments:
        masks: `(N, H, W)` or `(B, N, H, W)` binary masks (bool or 0/1).
        labels: `(N,)` / `(B, N)` integer labels.
        scores: `(N,)` / `(B, N)` float scores (>= 0).
        mask_area: optional `(N,)` / `(B, N)` mask areas in pixels; computed
            from `masks` when omitted.
        valid: optional `(N,)` / `(B, N)` bool; invalid entries (padding)
            never suppress anything and are never returned.

    Returns:
        Dict with `scores` `(max_per_img,)` decayed scores sorted descending,
        `labels` `(max_per_img,)`, `indices` `(max_per_img,)` int32 indices
        into the input (`-1` for padding), `num_detections` () int32, and
        `decayed_scores` `(N,)` the decayed score of every input mask in input
        order (0 for masks cut by `nms_pre` or invalid). Leading `B` is kept
        for batched input.

    Example:
    >>> import numpy as np
    >>> masks = np.zeros((3, 4, 4), bool)
    >>> masks[0, :2] = masks[1, :2] = True  # two identical masks
    >>> masks[2, 2:] = True
    >>> out = MatrixNMS(max_per_img=3)(
    ...     masks, np.array([0, 0, 0]), np.array([0.9, 0.8, 0.7], "float32"))
    >>> [int(i) for i in out["indices"]]
    [0, 2, 1]
    >>> round(float(out["scores"][2]), 4)  # 0.8 * exp(-2 * 1**2)
    0.1083
    """

    def __init__(
        self,
        kernel="gaussian",
        sigma=2.0,
        filter_thr=0.05,
        nms_pre=500,
        max_per_img=100,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if kernel not in ("gaussian", "linear"):
            raise ValueError(
                f"`kernel` must be 'gaussian' or 'linear', got {kernel!r}."
            )
        if float(sigma) < 0:
            raise ValueError(f"`sigma` must be >= 0 (the gaussian decay exp(-sigma * iou**2)), got {sigma!r}.")
        if float(filter_thr) > 1.0:
            raise ValueError(f"`filter_thr` must be at most 1 (a decayed score; <= 0 keeps all), got {filter_thr!r}.")
        self.kernel = kernel
        self.sigma = float(sigma)
        self.filter_thr = float(filter_thr)
        self.nms_pre = int(nms_pre)
        self.max_per_img = int(max_per_img)

    def call(self, masks, labels, scores, mask_area=None, valid=None):
        masks = ops.convert_to_tensor(masks)
        self._check_shapes(masks.shape, labels=labels, scores=scores, mask_area=mask_area, valid=valid)
        batched = len(masks.shape) == 4
        if not batched:
            masks = masks[None]
            labels = ops.expand_dims(labels, 0)
            scores = ops.expand_dims(scores, 0)
            mask_area = None if mask_area is None else ops.expand_dims(mask_area, 0)
            valid = None if valid is None else ops.expand_dims(valid, 0)
        out = self._batched(masks, labels, scores, mask_area, valid)
        if not batched:
            out = {k: v[0] for k, v in out.items()}
        return out

    def _check_shapes(self, masks_shape, **per_mask):
        """A ValueError naming the argument whose shape is not masks' `(B, N)` / `(N,)`."""
        if len(masks_shape) not in (3, 4):
            raise ValueError(f"{self.name}: masks must be (N, H, W) or (B, N, H, W), got shape {tuple(masks_shape)}.")
        expected = tuple(masks_shape[:-2])
        for name, value in per_mask.items():
            if value is None:
                continue
            shape = tuple(value.shape) if hasattr(value, "shape") else np.shape(value)  # static: None = unknown
            if len(shape) != len(expected) or any(
                    a is not None and b is not None and a != b for a, b in zip(shape, expected)):
                raise ValueError(
                    f"{self.name}: {name} must have shape {expected} (one per mask), got {shape}."
                )

    def _batched(self, masks, labels, scores, mask_area, valid):
        # N may be dynamic (candidates above a threshold): then the outputs
        # are still padded to the static `max_per_img`.
        static_num = masks.shape[1]
        dynamic = static_num is None
        num = ops.shape(masks)[1] if dynamic else static_num
        batch = ops.shape(masks)[0]
        if static_num == 0:
            # No masks: nothing to rank (Keras refuses eager reductions of
            # empty tensors). The outputs of "none kept".
            k = max(self.max_per_img, 0)
            none = ops.full((batch, k), -1, "int32")
            return {"scores": ops.zeros((batch, k), "float32"), "labels": none, "indices": none,
                    "num_detections": ops.zeros((batch,), "int32"), "decayed_scores": ops.zeros((batch, 0), "float32")}
        flat = ops.reshape(masks, (batch, num, -1))
        scores = ops.cast(scores, "float32")
        labels = ops.cast(labels, "int32")
        if mask_area is None:
            mask_area = ops.sum(ops.cast(flat, "float32"), axis=-1)
        mask_area = ops.cast(mask_area, "float32")
        if valid is None:
            valid = ops.ones((batch, num), "bool")
        valid = ops.cast(valid, "bool")
        smaller = ops.minimum if dynamic else min

        # Stable descending sort; invalid entries (score -1) go last.
        _, full_order = ops.top_k(ops.where(valid, scores, -1.0), k=num, sorted=True)
        n_pre = num if self.nms_pre <= 0 else smaller(self.nms_pre, num)
        order = full_order[:, :n_pre]
        take = lambda t: ops.take_along_axis(t, order, axis=1)  # noqa: E731
        s_scores, s_labels, s_area, s_valid = (
            take(scores),
            take(labels),
            take(mask_area),
            take(valid),
        )
        inter = same_label_intersections(flat, order, s_labels, s_valid, subset=dynamic or n_pre < num)
        union = s_area[:, :, None] + s_area[:, None, :] - inter
        iou = ops.where(union > 0, inter / ops.maximum(union, 1e-12), 0.0)
        rank = ops.arange(n_pre)
        upper = (rank[:, None] < rank[None, :])[None]
        same = ops.equal(s_labels[:, :, None], s_labels[:, None, :])
        decay_iou = ops.where(ops.logical_and(upper, same), iou, 0.0)
        # compensate[i]: the column max of column i, used along row i.
        compensate = ops.max(decay_iou, axis=1, initial=0.0)[:, :, None]
        if self.kernel == "gaussian":
            decay = ops.exp(-self.sigma * decay_iou**2) / ops.exp(
                -self.sigma * compensate**2
            )
        else:
            decay = (1.0 - decay_iou) / (1.0 - compensate)
        coefficient = ops.min(decay, axis=1, initial=1.0)
        decayed = s_scores * coefficient

        keep = s_valid
        if self.filter_thr > 0:
            keep = ops.logical_and(keep, decayed >= self.filter_thr)
        k = n_pre if self.max_per_img <= 0 else smaller(self.max_per_img, n_pre)
        top_scores, top = ops.top_k(ops.where(keep, decayed, -1.0), k=k, sorted=True)
        top_keep = ops.take_along_axis(keep, top, axis=1)
        indices = ops.where(top_keep, ops.take_along_axis(order, top, axis=1), -1)
        out_labels = ops.where(top_keep, ops.take_along_axis(s_labels, top, axis=1), -1)
        out_scores = ops.where(top_keep, top_scores, 0.0)
        if self.max_per_img > 0 and (dynamic or k < self.max_per_img):
            pad = [[0, 0], [0, self.max_per_img - k]]
            indices = ops.pad(indices, pad, constant_values=-1)
            out_labels = ops.pad(out_labels, pad, constant_values=-1)
            out_scores = ops.pad(out_scores, pad)
            top_keep = ops.pad(top_keep, pad)

        # Decayed score of every input, in input order.
        decayed_valid = ops.where(s_valid, decayed, 0.0)
        if dynamic or n_pre < num:
            decayed_valid = ops.pad(decayed_valid, [[0, 0], [0, num - n_pre]])
        inverse = ops.argsort(full_order, axis=1)
        by_input = ops.take_along_axis(decayed_valid, inverse, axis=1)
        return {
            "scores": out_scores,
            "labels": out_labels,
            "indices": ops.cast(indices, "int32"),
            "num_detections": ops.sum(ops.cast(top_keep, "int32"), axis=1),
            "decayed_scores": by_input,
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "kernel": self.kernel,
                "sigma": self.sigma,
                "filter_thr": self.filter_thr,
                "nms_pre": self.nms_pre,
                "max_per_img": self.max_per_img,
            }
        )
        return config
