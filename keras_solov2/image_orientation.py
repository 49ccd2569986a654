"""EXIF orientation: images are read turned as they are displayed, as mmdet reads them.

mmdet's `LoadImageFromFile` decodes with OpenCV's `IMREAD_COLOR` (mmcv's
`color` flag), which applies a JPEG's EXIF orientation tag; so do LabelMe,
CVAT and Label Studio when they show an image to annotate. A phone photo
stored as 4000×3000 pixels with orientation 6 is a 3000×4000 image, and its
COCO `height`/`width` and polygons are of that turned image. Every reader
here (training, the tfds builder, the importers, `predict`) turns it the
same way, with PIL's `ImageOps.exif_transpose`.
"""

ORIENTATION_TAG = 0x0112
# Orientations whose display swaps width and height (transpose, 90° turns, transverse).
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


def exif_orientation(image):
    """The EXIF orientation (1–8; 1 = as stored) of an open PIL image.

    A missing, malformed or out-of-range tag reads as 1, as OpenCV reads it.
    Only the file's header is read: a PNG's `eXIf` chunk counts if it comes
    before the pixel data, where the PNG specification puts it (PIL would
    otherwise decode the whole image to look for it).

    Example:
    >>> from PIL import Image
    >>> exif_orientation(Image.new("RGB", (4, 2)))
    1
    """
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        value = image.getexif().get(ORIENTATION_TAG, 1)
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

    Example:
    >>> from PIL import Image
    >>> image = Image.new("RGB", (4, 2))
    >>> exif = image.getexif()
    >>> exif[ORIENTATION_TAG] = 6  # stored turned 90° counter-clockwise
    >>> apply_exif_orientation(image).size
    (2, 4)
    """
    if exif_orientation(image) == 1:
        return image
    from PIL import ImageOps

    return ImageOps.exif_transpose(image)


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
