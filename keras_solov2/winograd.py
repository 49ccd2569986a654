"""3×3 "same" convolutions by Winograd's minimal filtering F(4×4, 3×3), in `keras.ops`.

A direct 3×3 conv spends 9 multiply-adds per output and input channel;
F(4×4, 3×3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016) spends 36 per 4×4 output tile, i.e. 2.25: each 6×6 input
tile and the 3×3 kernel are taken to a 6×6 transform domain
(`Bᵀ d B`, `G g Gᵀ`), multiplied there, channels summed, as 36 independent
`(tiles, C) @ (C, K)` matrix products, and taken back (`Aᵀ m A`).
cuDNN picks this algorithm on GPUs; TensorFlow's CPU convolutions (oneDNN)
are direct only, so on a CPU SOLOv2's head towers (4 × 3×3 convs of 512
channels over 3,872 grid cells, per branch) take half the time this way:
measured on this project's 2-core machine, float32, the 5 levels (batch 2)
of one 512→512 layer: 77 → 37 ms forward, 246 → 106 ms forward + backward.
SOLOv2 uses it for every 3×3 conv after the backbone (FPN outputs, mask
branch, head towers).

The price is rounding: relative error ≈ 2e-5 of the output's scale in
float32 (direct: ≈ 1e-6), far below bfloat16's own (≈ 3e-3). In bfloat16 the
transforms' coefficients (up to 8) amplify the matrix products' rounding to
≈ 3 % (measured), so `use_winograd` is for float32 only.

Several maps that share one kernel (a head tower on the pyramid levels) go
through the products together, with the batch: one `(36, B·Σ tiles, C) @
(36, C, K)` call.

Example:
>>> import numpy as np
>>> from keras import ops
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(1, 10, 7, 3)).astype("float32")
>>> kernel = rng.normal(size=(3, 3, 3, 5)).astype("float32")
>>> y = conv3x3_same([x], kernel)[0]
>>> bool(np.allclose(y, ops.conv(x, kernel, padding="same"), atol=1e-4))
True
"""

import functools

import keras
import numpy as np
from keras import ops

TILE = 4  # m: outputs per tile side
_WINDOW = TILE + 2  # α = m + r − 1: inputs per tile side
_AREA = _WINDOW * _WINDOW

# Lavin & Gray's F(4, 3) matrices for the interpolation points 0, ±1, ±2, ∞.
_BT = np.array(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    np.float64,
)
_G = np.array(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    np.float64,
)
_AT = np.array(
    [
        [1, 1, 1, 1, 1, 0],
        [0, 1, -1, 2, -2, 0],
        [0, 1, 1, 4, 4, 0],
        [0, 1, -1, 8, -8, 1],
    ],
    np.float64,
)
# The 2-D transforms as matrices on row-major flattened tiles:
# vec(Bᵀ d B) = (Bᵀ ⊗ Bᵀ) vec(d), and likewise for G and Aᵀ.
_DATA_TRANSFORM = np.kron(_BT, _BT)  # (36, 36)
_KERNEL_TRANSFORM = np.kron(_G, _G)  # (36, 9)
_OUTPUT_TRANSFORM = np.kron(_AT, _AT)  # (16, 36)


def use_winograd(dtype):
    """Whether `conv3x3_same` is the faster exact-enough choice here.

    True for float32 compute on a machine whose Keras devices are CPUs only:
    GPU libraries choose Winograd themselves, and bfloat16 is too coarse for
    the transforms (see the module docstring).

    Args:
        dtype: the compute dtype, e.g. `layer.compute_dtype`.
    """
    if keras.backend.standardize_dtype(dtype) != "float32":
        return False
    return all(device.split(":")[0].lower() == "cpu" for device in _devices())


@functools.lru_cache(maxsize=None)
def _devices():
    return tuple(keras.distribution.list_devices())


def conv_same(maps, kernel, winograd=True):
    """`ops.conv(x, kernel, padding="same")` of each map, by `conv3x3_same`
    for a 3×3 kernel if `winograd` and `use_winograd(kernel.dtype)`.

    Args:
        maps: list of `(B, H_i, W_i, C)` (see `conv3x3_same`).
        kernel: `(k, k, C, K)`, the maps' dtype.
        winograd: the calling layer's setting; `False` keeps direct convs.

    Returns:
        List of `(B, H_i, W_i, K)`, no bias.
    """
    if winograd and tuple(kernel.shape[:2]) == (3, 3) and use_winograd(kernel.dtype):
        return conv3x3_same(maps, kernel)
    return [ops.conv(x, kernel, padding="same") for x in maps]


def winograd_kernel(kernel):
    """A 3×3 conv kernel in the transform domain, `G g Gᵀ` per channel pair.

    Args:
        kernel: `(3, 3, C, K)` (Keras's HWIO layout).

    Returns:
        `(36, C, K)`, same dtype; row `6·i + j` is transform entry `(i, j)`.
    """
    channels, filters = kernel.shape[2], kernel.shape[3]
    flat = ops.reshape(kernel, (9, channels * filters))
    return ops.reshape(ops.matmul(_constant(_KERNEL_TRANSFORM, kernel), flat), (_AREA, channels, filters))


def conv3x3_same(maps, kernel):
    """`ops.conv(x, kernel, padding="same")` for each map, by F(4×4, 3×3).

    The maps' tiles, of every map and batch item, go through one set of 36
    matrix products `(B·N, C) @ (C, K)`. The backward pass keeps only the
    maps and the 3×3 kernel, as a direct conv's does, and recomputes their
    padded copy and transforms (cheap, linear maps): autodiff would keep
    the transformed tiles and kernel, 4–5× larger, and the padded copy of
    every map (≈ 0.25 GB in SOLOv2's float32 train step, R50 batch 2 512²).

    Args:
        maps: list of `(B, H_i, W_i, C)`, any size (maps are zero-extended
            to multiples of 4 and the result cropped); a single map may have
            unknown H and W (its tiling is then computed in the graph).
        kernel: `(3, 3, C, K)`, the maps' dtype.

    Returns:
        List of `(B, H_i, W_i, K)`, no bias.
    """
    channels, filters = kernel.shape[2], kernel.shape[3]
    static = all(d is not None for x in maps for d in x.shape[1:3])
    if not static and len(maps) > 1:
        raise ValueError("conv3x3_same: maps of unknown height or width go one at a time.")
    if static:
        sizes = [tuple(int(d) for d in x.shape[1:3]) for x in maps]
    else:
        sizes = [tuple(ops.shape(maps[0])[1:3])]
    table = _tile_table(sizes)
    batch = ops.shape(maps[0])[0]
    grids = [(TILE * _tiles(h) + 2, TILE * _tiles(w) + 2) for h, w in sizes]  # zero-padded tiling grids

    def pad_and_concatenate(maps):
        """`(B, R, C)`: each map zero-padded to its grid, flattened, concatenated."""
        padded = []
        for x, (h, w), (gh, gw) in zip(maps, sizes, grids):
            x = ops.pad(x, [[0, 0], [1, gh - h - 1], [1, gw - w - 1], [0, 0]])
            padded.append(ops.reshape(x, (batch, gh * gw, channels)))
        return ops.concatenate(padded, axis=1) if len(padded) > 1 else padded[0]

    def interiors(padded):
        """`pad_and_concatenate`'s adjoint: the maps' pixels of `(B, R, C)`."""
        parts = _split(padded, [gh * gw for gh, gw in grids], axis=1)
        return [
            ops.reshape(part, (batch, gh, gw, channels))[:, 1 : h + 1, 1 : w + 1]
            for part, (h, w), (gh, gw) in zip(parts, sizes, grids)
        ]

    rows = sum(gh * gw for gh, gw in grids)
    out = _transformed_conv(list(maps), kernel, table, rows, pad_and_concatenate, interiors)  # (16, B·N, K)
    num_tiles = sum(_tiles(h) * _tiles(w) for h, w in sizes)
    out = ops.reshape(out, (TILE, TILE, batch, num_tiles, filters))
    results = []
    for part, (h, w) in zip(_split(out, [_tiles(h) * _tiles(w) for h, w in sizes], axis=3), sizes):
        th, tw = _tiles(h), _tiles(w)
        y = ops.reshape(part, (TILE, TILE, batch, th, tw, filters))
        y = ops.reshape(ops.transpose(y, (2, 3, 0, 4, 1, 5)), (batch, TILE * th, TILE * tw, filters))
        results.append(y if static and (TILE * th, TILE * tw) == (h, w) else y[:, :h, :w])
    return results


def _transformed_conv(maps, kernel, table, rows, pad_and_concatenate, interiors):
    """The maps, `(3, 3, C, K)` kernel → `(16, B·N, K)`: each output tile
    entry (row-major over 4×4) of the N tiles of every batch item,
    `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`. `table` indexes the R = `rows` rows of
    `pad_and_concatenate(maps)` `(B, R, C)` (see `_tile_table`); `interiors`
    is that function's adjoint."""
    channels, filters = kernel.shape[2], kernel.shape[3]
    batch = ops.shape(maps[0])[0]

    # Row of the padded maps' (B·R, C) view read by tap t of tile n of batch item b, at [t, b, n].
    index = ops.reshape(table, (_AREA, 1, -1)) + ops.reshape(ops.arange(batch, dtype="int32") * rows, (1, -1, 1))
    index = ops.reshape(index, (-1,))

    def transformed_tiles(maps):
        tiles = ops.take(ops.reshape(pad_and_concatenate(maps), (-1, channels)), index, axis=0)
        data = ops.matmul(_constant(_DATA_TRANSFORM, tiles), ops.reshape(tiles, (_AREA, -1)))  # Bᵀ d B
        return ops.reshape(data, (_AREA, -1, channels))  # (36, B·N, C)

    @ops.custom_gradient
    def conv(*args):
        # The backward pass keeps the maps themselves (which the layer
        # before keeps anyway, e.g. as its ReLU's output) and the kernel;
        # their padded copy and transforms are recomputed there.
        maps, kernel = args[:-1], args[-1]
        data = transformed_tiles(maps)
        products = ops.matmul(data, winograd_kernel(_after(kernel, data)))  # (36, B·N, K)
        out = ops.matmul(_constant(_OUTPUT_TRANSFORM, data), ops.reshape(products, (_AREA, -1)))  # Aᵀ m A

        def grad(*grads, upstream=None):
            upstream = grads[0] if upstream is None else upstream
            # Recomputed only once the backward pass reaches this conv
            # (delaying the tiles' transform further did not lower the peak).
            kernel_now = _after(kernel, upstream)
            data = transformed_tiles([_after(x, upstream) for x in maps])
            d_products = ops.matmul(_constant(_OUTPUT_TRANSFORM.T, upstream), upstream)
            d_products = ops.reshape(d_products, (_AREA, -1, filters))
            d_kernel = ops.matmul(ops.swapaxes(data, 1, 2), d_products)  # (36, C, K)
            d_kernel = ops.matmul(_constant(_KERNEL_TRANSFORM.T, d_kernel), ops.reshape(d_kernel, (_AREA, -1)))
            d_data = ops.matmul(d_products, ops.swapaxes(winograd_kernel(kernel_now), 1, 2))
            d_tiles = ops.matmul(_constant(_DATA_TRANSFORM.T, d_data), ops.reshape(d_data, (_AREA, -1)))
            # The gather's transpose: each padded pixel sums the tile entries
            # it was copied to (≤ 4).
            d_padded = ops.segment_sum(ops.reshape(d_tiles, (-1, channels)), index, num_segments=batch * rows)
            d_maps = interiors(ops.reshape(d_padded, (batch, rows, channels)))
            return (*d_maps, ops.reshape(d_kernel, (3, 3, channels, filters)))

        return out, grad

    return conv(*maps, kernel)


def _after(x, dependency):
    """`x`, available only once `dependency` is computed.

    TensorFlow's graph executor runs an op as soon as its inputs exist:
    a kernel transform (which reads only a weight) would run at the start
    of the step, for every layer at once, and the backward pass's
    recomputations as soon as the forward pass made their inputs, so all
    their 38 MB (512² kernels) results would be alive together (+0.3 GB in
    predict, +0.75 GB in a train step, measured). Other backends run in
    program order or schedule for memory themselves.
    """
    if keras.backend.backend() != "tensorflow":
        return x
    import tensorflow as tf

    with tf.control_dependencies([dependency]):
        return tf.identity(x)


def _constant(matrix, like):
    return ops.convert_to_tensor(matrix, dtype=like.dtype)


def _split(x, lengths, axis):
    """`x` cut into consecutive parts of static `lengths` along `axis` (one
    part: `x` itself, whose length may be unknown). A split, not slices: a
    slice's gradient is a zero-padded copy of the whole input (5 levels:
    22 ms of a 137 ms forward + backward)."""
    if len(lengths) == 1:
        return [x]
    return ops.split(x, np.cumsum(lengths)[:-1].tolist(), axis=axis)


def _tiles(size):
    """Tiles along a side of `size` pixels (an int, or a tensor)."""
    return (size + TILE - 1) // TILE


def _tile_table(sizes):
    """`(36 · N,)` int32: for each of the 36 taps (row-major over the 6×6
    window), the row of every tile's input in the maps' zero-padded
    `(4·th + 2) × (4·tw + 2)` grids, flattened and concatenated (tiles of a
    map row-major, maps in order). Sizes may be ints (a NumPy array: one
    constant in the graph) or scalar tensors (a map of unknown size: the
    table is then computed in the graph)."""
    static = all(isinstance(d, int) for size in sizes for d in size)
    xp = np if static else ops
    taps = np.arange(_WINDOW, dtype="int32")
    dy = np.repeat(taps, _WINDOW).reshape(-1, 1, 1)
    dx = np.tile(taps, _WINDOW).reshape(-1, 1, 1)
    if not static:
        dy, dx = ops.convert_to_tensor(dy), ops.convert_to_tensor(dx)
    tables, offset = [], 0
    for h, w in sizes:
        th, tw = _tiles(h), _tiles(w)
        width = TILE * tw + 2
        corners = xp.reshape(xp.arange(th, dtype="int32") * (TILE * width), (1, -1, 1)) + xp.reshape(
            xp.arange(tw, dtype="int32") * TILE, (1, 1, -1)
        )
        tables.append(xp.reshape(offset + corners + dy * width + dx, (_AREA, -1)))
        offset += (TILE * th + 2) * width
    return xp.reshape(xp.concatenate(tables, axis=1) if len(tables) > 1 else tables[0], (-1,))
