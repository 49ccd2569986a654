"""Image files read as mmdet reads them: EXIF orientation applied, 8-bit RGB.

mmdet's `LoadImageFromFile` decodes with OpenCV's `IMREAD_COLOR` (mmcv's
`color` flag), which turns a JPEG, PNG or TIFF by its EXIF orientation tag
(not a WebP, in mmdet 3.3's OpenCV); so do LabelMe, CVAT and Label Studio
when they show an image to annotate. A phone photo stored as 4000×3000
pixels with orientation 6 is a 3000×4000 image, and its COCO `height` /
`width` and polygons are of that turned image. Every reader here (training,
the tfds builder, the importers, `predict`) reads the tag from the file's
EXIF block only (PIL's `getexif` would also take an XMP orientation, which
OpenCV ignores) and turns the image the same way.
"""

import numpy as np

ORIENTATION_TAG = 0x0112
# Orientations whose display swaps width and height (transpose, 90° turns, transverse).
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
# The turn that displays each orientation, as `Image.Transpose` names (EXIF 2.3, tag 274).
_DISPLAY_TURNS = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
                  6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


def exif_orientation(image):
    """The EXIF orientation (1–8; 1 = nothing to turn) of an open PIL image, from its header.

    A missing, malformed or out-of-range tag reads as 1, as OpenCV reads
    it. A PNG's `eXIf` chunk counts if it comes before the pixel data,
    where the PNG specification puts it. A TIFF reads as 1: PIL opens it
    turned by its own tag already.

    Example:
    >>> from PIL import Image
    >>> exif_orientation(Image.new("RGB", (4, 2)))
    1
    """
    from PIL import Image

    if image.format not in ("JPEG", "MPO", "PNG") or "exif" not in image.info:
        return 1
    try:
        exif = Image.Exif()
        exif.load(image.info["exif"])
        value = exif.get(ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block: the pixels as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def oriented_size(image):
    """`(height, width)` in pixels of an open PIL image as displayed (read from its header).

    Example:
    >>> from PIL import Image
    >>> oriented_size(Image.new("RGB", (4, 2)))
    (2, 4)
    """
    width, height = image.size
    return (width, height) if exif_orientation(image) in SWAPPING_ORIENTATIONS else (height, width)


def apply_exif_orientation(image):
    """The open PIL image turned as displayed (the image itself if orientation is 1).

    Only the pixels are turned (PIL's `ImageOps.exif_transpose` also
    rewrites the EXIF block, which fails on some files).

    Example:
    >>> import io
    >>> from PIL import Image
    >>> image = Image.new("RGB", (4, 2))
    >>> exif = image.getexif()
    >>> exif[ORIENTATION_TAG] = 6  # stored turned 90° counter-clockwise
    >>> buffer = io.BytesIO()
    >>> image.save(buffer, "JPEG", exif=exif)
    >>> apply_exif_orientation(Image.open(buffer)).size
    (2, 4)
    """
    from PIL import Image

    turn = _DISPLAY_TURNS.get(exif_orientation(image))
    return image if turn is None else image.transpose(getattr(Image.Transpose, turn))


def stored_size_hint(image, expected):
    """A sentence for a size-mismatch error: why an image whose stored pixels
    are `expected` `(height, width)` reads at another size (its EXIF
    orientation turns it); `""` if that is not the reason."""
    width, height = image.size
    orientation = exif_orientation(image)
    if orientation not in SWAPPING_ORIENTATIONS or tuple(expected) != (height, width):
        return ""
    return (f" Its EXIF orientation {orientation} turns the stored {height}x{width} pixels: images are read "
            "turned, as mmdet (OpenCV) and annotation tools show them, so sizes and annotations must be of "
            "the turned image. If yours were made on the stored pixels, drop the tag without turning the "
            "pixels (e.g. `exiftool -Orientation=1 -n FILE`).")


def read_rgb(path, image_id=None, annotation_file="annotations"):
    """Decodes an image file completely to `(H, W, 3)` uint8 RGB.

    The pixels are turned by the file's EXIF orientation, as mmdet's
    OpenCV decoding turns them. Grayscale, palette, CMYK and RGBA/LA files
    become RGB through PIL (alpha is dropped, as cv2/mmcv do). 16-bit
    files: PIL already keeps the high byte of 16-bit RGB(A) PNGs, but its
    `convert("RGB")` *clips* 16-bit grayscale (modes `I;16*`, and `I`, read
    as 16-bit data) at 255, which turns most of such an image white; those
    are scaled to 8 bits here the way cv2's `IMREAD_COLOR` does
    (`value >> 8`). Float images (mode `F`) have no agreed 0..255 scale and
    are refused.

    Raises:
        FileNotFoundError / ValueError naming `annotation_file`, the image id
        (when given) and the file, for a missing, unreadable, truncated or float image
        (the decoder's own error is the `ValueError`'s `__cause__`).
        (`validate_images` reads headers only, so a file whose pixel data is
        corrupt fails when `make_dataset` reads it: this message then is the
        first line of the `tf.errors.InvalidArgumentError` of the iterator.)
    """
    from PIL import Image

    where = f"{annotation_file}: image {image_id} file {path}" if image_id is not None else str(path)
    try:
        with Image.open(path) as im:
            im = apply_exif_orientation(im)  # its tag read from the header, as validate_images reads it
            im.load()  # the full decode: a truncated file fails here, with its name
            if im.mode.startswith("I;16") or im.mode == "I":
                gray = (np.clip(np.asarray(im).astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=-1)
            if im.mode == "F":
                raise ValueError("float (mode F) images have no 0..255 scale; convert it to 8 or 16 bits")
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{where} does not exist.") from None
    except Exception as e:  # PIL's UnidentifiedImageError, OSError("image file is truncated"), ...
        raise ValueError(f"{where} is not a readable image ({type(e).__name__}: {e}).") from e
