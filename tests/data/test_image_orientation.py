"""EXIF orientation: every reader turns an image as mmdet (OpenCV's
IMREAD_COLOR) and annotation tools display it; the references are the EXIF
specification's turns of the stored pixels, as NumPy `rot90` / flips."""

import json

import numpy as np
import pytest
from PIL import Image

import keras_solov2  # noqa: F401
from keras_solov2.data.coco_folder import describe, make_dataset, read_rgb
from keras_solov2.data.importers import import_dataset
from keras_solov2.image_files import ORIENTATION_TAG

# How to display the stored pixels, for each EXIF orientation.
DISPLAY = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: np.rot90(a, 2),
    4: lambda a: a[::-1],
    5: lambda a: np.transpose(a, (1, 0, 2)),
    6: lambda a: np.rot90(a, -1),  # turned 90° clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),  # turned 90° counter-clockwise
}


def _save_with_orientation(path, pixels, orientation):
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[ORIENTATION_TAG] = orientation
    image.save(path, exif=exif, quality=95)


def _stored(path):
    """The decoded pixels as stored (PIL does not apply the tag)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _corner_image(h=24, w=40):
    """Four flat quadrants of different colours: where each went is clear."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (250, 0, 0)
    a[: h // 2, w // 2:] = (0, 250, 0)
    a[h // 2:, : w // 2] = (0, 0, 250)
    a[h // 2:, w // 2:] = (250, 250, 0)
    return a


@pytest.mark.parametrize("orientation", range(1, 9))
def test_read_rgb_turns_by_the_exif_orientation(tmp_path, orientation):
    path = tmp_path / "photo.jpg"
    _save_with_orientation(path, _corner_image(), orientation)
    want = DISPLAY[orientation](_stored(path))
    np.testing.assert_array_equal(read_rgb(path), want)
    if orientation in (5, 6, 7, 8):
        assert want.shape[:2] == (40, 24)


def test_a_png_exif_chunk_turns_it_too(tmp_path):
    # Lossless: the turned pixels exactly; the tag is read from the header, without a full decode.
    _save_with_orientation(tmp_path / "scan.png", _corner_image(), 8)
    np.testing.assert_array_equal(read_rgb(tmp_path / "scan.png"), np.rot90(_corner_image(), 1))


def test_a_tiff_tag_turns_it_and_an_xmp_orientation_does_not(tmp_path):
    # As OpenCV (mmdet) reads them: a TIFF's own orientation tag counts (PIL applies it when
    # it opens the file: turned once, not twice); an orientation only in XMP metadata does
    # not (PIL's getexif would take it).
    _save_with_orientation(tmp_path / "scan.tif", _corner_image(), 6)
    np.testing.assert_array_equal(read_rgb(tmp_path / "scan.tif"), np.rot90(_corner_image(), -1))
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    Image.fromarray(_corner_image()).save(tmp_path / "xmp.jpg", xmp=xmp, quality=95)
    with Image.open(tmp_path / "xmp.jpg") as im:
        assert im.getexif().get(ORIENTATION_TAG) == 6  # PIL's reading, not OpenCV's
    np.testing.assert_array_equal(read_rgb(tmp_path / "xmp.jpg"), _stored(tmp_path / "xmp.jpg"))


def _one_polygon_dataset(tmp_path, height, width):
    """An orientation-6 JPEG (stored 24x40) and a JSON whose one square is
    drawn on the turned (displayed) image's red quadrant."""
    stored = _corner_image()
    _save_with_orientation(tmp_path / "photo.jpg", stored, 6)
    shown = np.rot90(stored, -1)  # 40x24: red is now the top-right quadrant
    assert tuple(shown[2, 20]) == (250, 0, 0)
    square = [14, 2, 22, 2, 22, 10, 14, 10]  # x, y in the turned image, inside its red quadrant
    ann = {"images": [{"id": 1, "file_name": "photo.jpg", "height": height, "width": width}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 64.0,
                            "bbox": [14, 2, 8, 8], "segmentation": [square]}],
           "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    return tmp_path / "ann.json"


def test_training_reads_the_turned_image_under_the_annotations(tmp_path):
    ann = _one_polygon_dataset(tmp_path, height=40, width=24)
    (x, y), = list(make_dataset(describe(ann, tmp_path), scale=(40, 24), batch_size=1, training=False))
    image, mask = np.asarray(x["images"][0]), np.asarray(y["gt_masks"][0, 0]).astype(bool)
    assert tuple(np.asarray(x["original_shape"][0])) == (40, 24)
    assert mask[:40, :24].sum() > 40 and not mask[40:].any() and not mask[:, 24:].any()
    # Under the polygon the pixels are the red quadrant's (JPEG: within a few levels).
    np.testing.assert_allclose(image[mask].mean(0), (250, 0, 0), atol=12)


def test_a_json_of_the_stored_size_is_refused_with_the_reason(tmp_path):
    ann = _one_polygon_dataset(tmp_path, height=24, width=40)
    with pytest.raises(ValueError, match=r"image 1 \(photo\.jpg\) is 40x24 but the JSON says 24x40\. Its EXIF "
                                         r"orientation 6 turns the stored 24x40 pixels.*exiftool -Orientation=1"):
        make_dataset(describe(ann, tmp_path), scale=(40, 24), batch_size=1, training=False)


def test_tfds_builder_stores_the_turned_pixels(tmp_path):
    import tensorflow_datasets as tfds

    from keras_solov2.data import SOLOv2CocoConfig

    ann = _one_polygon_dataset(tmp_path, height=40, width=24)
    config = SOLOv2CocoConfig(name="turned", annotation_file=str(ann), image_dir=str(tmp_path))
    builder = tfds.builder("solov2_coco", config=config, data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare()
    (example,) = list(tfds.as_numpy(builder.as_dataset(split="train")))
    np.testing.assert_array_equal(example["image"], np.rot90(_stored(tmp_path / "photo.jpg"), -1))
    assert example["objects"]["mask"].shape == (1, 40, 24, 1)


def test_importers_size_images_as_turned(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    _save_with_orientation(images / "a.jpg", _corner_image(), 6)
    ids = np.zeros((40, 24), np.uint8)
    ids[2:10, 14:22] = 1
    Image.fromarray(ids).save(masks / "a_mask.png")
    import_dataset("instance_png", images, masks, tmp_path / "out.json")
    (image,) = json.loads((tmp_path / "out.json").read_text())["images"]
    assert (image["height"], image["width"]) == (40, 24)
    # A mask of the stored pixels: refused, with the reason.
    Image.fromarray(np.zeros((24, 40), np.uint8)).save(masks / "a_mask.png")
    with pytest.raises(ValueError, match=r"a_mask\.png is 24x40 but a\.jpg is 40x24\. Its EXIF orientation 6"):
        import_dataset("instance_png", images, masks, tmp_path / "out2.json")
