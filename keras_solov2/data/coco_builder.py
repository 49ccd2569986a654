"""A tensorflow-datasets builder for COCO-format instance segmentation (with masks).

tfds's own `coco/2017` has boxes but no instance masks; `solov2_coco` keeps
one PNG mask per instance. Registered when `keras_solov2.data` is imported.

* `coco2017` config: the official layout in the manual dir
  (`annotations/instances_{train,val}2017.json`, `train2017/`, `val2017/`).
* Any COCO JSON + image folder: pass a config,
  `tfds.builder("solov2_coco", config=SOLOv2CocoConfig(name="mydata",
  annotation_file=..., image_dir=...), data_dir=...)`; it has one `train`
  split (make validation splits with `split_ids` or tfds slicing).

Per example: `image` (RGB), `image/id`, `image/filename`, and `objects`
with `mask` (H, W, 1) {0,1}, contiguous `label`, original `category_id`,
`bbox` (tfds normalised), `area` (pixels) and `is_crowd` (crowds are kept
for evaluation; `make_tfds_dataset` leaves them out of the training
targets). `info.metadata` holds `category_ids` and `class_names` in label
order. Bad inputs get the same checks as `coco_folder`'s: clear errors
naming the file or annotation (missing, unreadable or wrongly sized
images, paths escaping the root, unknown ids, malformed segmentations),
logged skips for polygons with fewer than 3 points and zero-area masks,
every image decoded completely at build time (grayscale, RGBA and 16-bit
files converted to 8-bit RGB), images without annotations kept.
"""

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from keras_solov2.atomic_files import write_json_atomically
from keras_solov2.data.coco_folder import (
    check_annotations,
    clean_segmentation,
    describe,
    instance_mask,
    load_coco,
    read_rgb,
    safe_image_path,
    validate_images,
)
from keras_solov2.image_files import exif_orientation

log = logging.getLogger(__name__)


def _is_8bit_rgb_file(path):
    """Whether tfds can store the file's bytes as they are: an RGB JPEG, or a
    PNG of 8-bit truecolour (its IHDR; PIL reports 16-bit PNGs as "RGB" too,
    and tfds' NumPy decoder would truncate their 16-bit values), without an
    EXIF orientation to apply (TensorFlow's decoders ignore it)."""
    from PIL import Image

    with Image.open(path) as im:
        fmt, mode = im.format, im.mode
        if exif_orientation(im) != 1:
            return False
    if fmt == "JPEG":
        return mode == "RGB"
    if fmt == "PNG":
        with open(path, "rb") as f:
            header = f.read(26)
        return len(header) == 26 and header[24] == 8 and header[25] == 2  # bit depth 8, colour type RGB
    return False


@dataclasses.dataclass
class SOLOv2CocoConfig(tfds.core.BuilderConfig):
    """`annotation_file` + `image_dir` for custom data (empty for `coco2017`)."""

    annotation_file: str = ""
    image_dir: str = ""


class SOLOv2Coco(tfds.core.GeneratorBasedBuilder):
    """COCO-format instance segmentation with per-instance PNG masks (`"solov2_coco"`).

    Example (custom data; the builder is registered on import of
    `keras_solov2.data`):
    ```python
    cfg = SOLOv2CocoConfig(name="mydata", annotation_file="ann.json", image_dir="images")
    builder = tfds.builder("solov2_coco", config=cfg)
    builder.download_and_prepare()
    ds = builder.as_dataset(split="train")
    ```
    """

    name = "solov2_coco"  # tfds would derive "so_lov2_coco" from the class name

    # A new version is a new build: builds of 1.0.0 stored EXIF-oriented JPEGs as stored.
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Images turned by their EXIF orientation, as mmdet (OpenCV) reads them.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place COCO 2017 in the manual dir (default ~/tensorflow_datasets/downloads/manual/): "
        "annotations/instances_train2017.json, annotations/instances_val2017.json, train2017/, val2017/ "
        "(from cocodataset.org). For your own data pass SOLOv2CocoConfig(annotation_file=..., image_dir=...)."
    )
    BUILDER_CONFIGS = [SOLOv2CocoConfig(name="coco2017", description="Official COCO 2017 layout (manual dir).")]

    def download_and_prepare(self, *args, **kwargs):
        """tfds' `download_and_prepare`, refusing a stale build.

        tfds keys a prepared dataset by config name and version only, so a
        config naming an edited (or another) annotation file would silently
        load the old build. The annotation file's sha256 and the image
        folder are recorded beside a build made here and compared on every
        later call; a mismatch raises, naming both. A build with no record
        (made by an earlier version, or interrupted before the record was
        written) cannot be vouched for and raises too. The file is re-hashed
        only when its size or modification time changed. (Edited image
        files with unchanged annotations are not detected.)
        """
        cfg = self.builder_config
        existed = self.is_prepared()
        super().download_and_prepare(*args, **kwargs)
        if not cfg.annotation_file:
            return
        stamp = Path(str(self.data_dir)) / "solov2_source.json"
        if existed and not stamp.exists():
            raise ValueError(
                f"{self.data_dir} (config {cfg.name!r}) has no record of the annotation file it was prepared "
                f"from (built by an earlier keras-solov2, or interrupted), so it may not match "
                f"{cfg.annotation_file}. Delete {self.data_dir} to rebuild, or use another config name."
            )
        ann = Path(cfg.annotation_file)
        st = ann.stat()
        source = {
            "annotation_file": str(ann.resolve()),
            "annotation_sha256": None,
            "image_dir": str(Path(cfg.image_dir).resolve()),
        }
        file_state = {"annotation_size": st.st_size, "annotation_mtime_ns": st.st_mtime_ns}
        built = json.loads(stamp.read_text()) if stamp.exists() else None
        unchanged = built is not None and {k: built.get(k) for k in file_state} == file_state
        if unchanged:
            source["annotation_sha256"] = built["annotation_sha256"]  # skip the hash
        else:
            source["annotation_sha256"] = hashlib.sha256(ann.read_bytes()).hexdigest()
        if built is not None:
            if {k: built.get(k) for k in source} != source:
                raise ValueError(
                    f"{self.data_dir} was prepared for config {cfg.name!r} from {built['annotation_file']} "
                    f"(sha256 {built['annotation_sha256'][:12]}…, images {built['image_dir']}), but the config "
                    f"now names {source['annotation_file']} (sha256 {source['annotation_sha256'][:12]}…, images "
                    f"{source['image_dir']}). Delete {self.data_dir} to rebuild, or use another config name."
                )
            if unchanged:
                return
        write_json_atomically(stamp, {**source, **file_state}, indent=1)

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "image/id": np.int64,
                "image/filename": tfds.features.Text(),
                "objects": tfds.features.Sequence({
                    "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                    "label": np.int64,
                    "category_id": np.int64,
                    "bbox": tfds.features.BBoxFeature(),
                    "area": np.float32,
                    "is_crowd": np.bool_,
                }),
            }),
            metadata=tfds.core.MetadataDict(),
            homepage="https://cocodataset.org",
        )

    def _sources(self, dl_manager):
        cfg = self.builder_config
        if cfg.annotation_file:
            return {"train": (cfg.annotation_file, cfg.image_dir)}
        root = Path(dl_manager.manual_dir)
        return {split: (root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017")
                for split in ("train", "val")}

    def _split_generators(self, dl_manager):
        sources = self._sources(dl_manager)
        info = describe(*next(iter(sources.values())))
        self.info.metadata["category_ids"] = [int(c) for c in info.category_ids]
        self.info.metadata["class_names"] = list(info.class_names)
        return {split: self._generate_examples(ann, img) for split, (ann, img) in sources.items()}

    def _generate_examples(self, annotation_file, image_dir):
        info = describe(annotation_file, image_dir)
        coco = load_coco(annotation_file)
        validate_images(coco, info, info.image_ids)
        check_annotations(coco, info.image_ids, annotation_file)  # malformed ones fail before any work
        label_of = {c: i for i, c in enumerate(info.category_ids)}
        for image_id in info.image_ids:
            img = coco.imgs[image_id]
            path = safe_image_path(image_dir, img["file_name"], annotation_file)
            pixels = read_rgb(path, image_id, annotation_file)  # full decode: corrupt files fail here
            # 8-bit RGB JPEG/PNG files are stored as they are (no re-encoding);
            # anything else as the converted pixels.
            image = str(path) if _is_8bit_rgb_file(path) else pixels
            h, w = img["height"], img["width"]
            objects = []
            for ann in coco.imgToAnns.get(image_id, []):
                segmentation, reason = clean_segmentation(ann, h, w, annotation_file)
                if reason is not None:
                    continue  # counted and logged by check_annotations
                m = instance_mask(coco, ann, segmentation, annotation_file)
                if not m.any():
                    log.warning("%s: annotation %s has a zero-area mask; skipped.", annotation_file, ann.get("id"))
                    continue  # nothing to learn or match
                ys, xs = np.nonzero(m)
                objects.append({
                    "mask": m[..., None],
                    "label": label_of[ann["category_id"]],
                    "category_id": ann["category_id"],
                    "bbox": tfds.features.BBox(ys.min() / h, xs.min() / w, (ys.max() + 1) / h, (xs.max() + 1) / w),
                    "area": float(m.sum()),
                    "is_crowd": bool(ann.get("iscrowd", 0)),
                })
            yield int(image_id), {"image": image, "image/id": int(image_id),
                                  "image/filename": img["file_name"], "objects": objects}
