"""Importers: common custom instance-mask layouts → a COCO instances JSON.

Each writes `out` (a JSON file whose `file_name`s are relative to the image
root it reports), refuses to overwrite an existing file unless
`overwrite=True`, and returns a report of what it wrote and what it skipped
(with the file and the reason). Masks are stored as compressed RLE;
LabelMe's shapes keep their polygons.

Formats (`FORMATS`):
* `instance_png`: one instance-id PNG per image (0 = background, k =
  instance k), e.g. Penn-Fudan `PNGImages/` + `PedMasks/<stem>_mask.png`;
* `instance_folders`: one folder per image holding `images/<id>.png` and
  `masks/*.png` (one 0/255 PNG per instance), e.g. the DSB2018 nuclei;
* `labelme`: LabelMe JSON files (polygons and rectangles; the label
  `__ignore__` becomes a crowd/ignore region of every category).
"""

import json
import logging
import os
from pathlib import Path

import numpy as np

from keras_solov2.atomic_files import write_json_atomically
from keras_solov2.image_files import oriented_size, stored_size_hint

log = logging.getLogger(__name__)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _rle(mask):
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


class _Writer:
    def __init__(self, out, image_root, categories, overwrite):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out} exists; pass overwrite=True (--overwrite) to replace it.")
        self.image_root = Path(image_root)
        self.categories = [{"id": i + 1, "name": n} for i, n in enumerate(categories)]
        self.cat_id = {n: i + 1 for i, n in enumerate(categories)}
        self.images, self.annotations, self.skipped = [], [], []

    def add_image(self, path, height, width):
        # abspath, not resolve: symlinked image folders stay under the root.
        rel = Path(os.path.abspath(path)).relative_to(Path(os.path.abspath(self.image_root))).as_posix()
        self.images.append({"id": len(self.images) + 1, "file_name": rel, "height": int(height), "width": int(width)})
        return self.images[-1]["id"]

    def add_mask(self, image_id, mask, category, source, iscrowd=0, polygons=None):
        """A binary mask (stored as RLE), or polygons `[[x0, y0, x1, y1, ...], ...]`
        stored as such so pycocotools rasterises them as any COCO polygon."""
        if not mask.any():
            self.skipped.append(f"{source}: empty mask")
            return
        segmentation = [list(map(float, p)) for p in polygons] if polygons is not None else _rle(mask)
        if polygons is not None:
            from pycocotools import mask as mask_utils

            h, w = mask.shape
            area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))))
        else:
            area = float(mask.sum())
        self.annotations.append({
            "id": len(self.annotations) + 1, "image_id": image_id, "category_id": self.cat_id[category],
            "segmentation": segmentation, "area": area, "bbox": _bbox(mask), "iscrowd": int(iscrowd),
        })

    def write(self):
        write_json_atomically(self.out, {"images": self.images, "annotations": self.annotations,
                                         "categories": self.categories})
        for s in self.skipped:
            log.warning("skipped %s", s)
        return {"output": str(self.out), "image_root": str(self.image_root), "images": len(self.images),
                "instances": len(self.annotations), "categories": len(self.categories),
                "skipped": list(self.skipped)}


def _read_image_size(path):
    """`(height, width)` as the image is read (after EXIF orientation)."""
    from PIL import Image

    with Image.open(path) as im:
        return oriented_size(im)


def _size_hint(path, mask_shape):
    """Why `path` reads at another size than its mask, if its EXIF orientation is the reason."""
    from PIL import Image

    with Image.open(path) as im:
        return stored_size_hint(im, mask_shape[:2])


def import_instance_png(images_dir, masks_dir, out, category="object", mask_suffix="_mask", overwrite=False):
    """Instance-id PNGs (0 = background, k = instance k) → COCO JSON.

    The mask of `images_dir/<stem>.<ext>` is `masks_dir/<stem><mask_suffix>.png`
    (or `<stem>.png`). Images without a mask file are skipped and reported.
    """
    from PIL import Image

    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    w = _Writer(out, images_dir, [category], overwrite)
    for img in sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        candidates = [masks_dir / f"{img.stem}{mask_suffix}.png", masks_dir / f"{img.stem}.png"]
        mask_path = next((c for c in candidates if c.is_file()), None)
        if mask_path is None:
            w.skipped.append(f"{img}: no mask file ({candidates[0].name})")
            continue
        ids = np.asarray(Image.open(mask_path))
        if ids.ndim != 2:
            raise ValueError(f"{mask_path}: an instance-id mask must be single-channel, got shape {ids.shape}.")
        h, w_ = _read_image_size(img)
        if ids.shape != (h, w_):
            raise ValueError(f"{mask_path} is {ids.shape[0]}x{ids.shape[1]} but {img.name} is {h}x{w_}."
                             f"{_size_hint(img, ids.shape)}")
        image_id = w.add_image(img, h, w_)
        for k in np.unique(ids):
            if k != 0:
                w.add_mask(image_id, ids == k, category, f"{mask_path} instance {k}")
    return w.write()


def import_instance_folders(root, out, category="object", overwrite=False):
    """`root/<id>/images/<id>.png` + `root/<id>/masks/*.png` (one binary PNG per instance) → COCO JSON."""
    from PIL import Image

    root = Path(root)
    w = _Writer(out, root, [category], overwrite)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted((folder / "images").glob("*")) if (folder / "images").is_dir() else []
        if len(images) != 1:
            w.skipped.append(f"{folder}: expected one file in images/, found {len(images)}")
            continue
        h, w_ = _read_image_size(images[0])
        image_id = w.add_image(images[0], h, w_)
        for mask_path in sorted((folder / "masks").glob("*.png")):
            m = np.asarray(Image.open(mask_path))
            if m.ndim == 3:
                m = m[..., 0]
            if m.shape != (h, w_):
                raise ValueError(f"{mask_path} is {m.shape[0]}x{m.shape[1]} but {images[0].name} is {h}x{w_}."
                                 f"{_size_hint(images[0], m.shape)}")
            w.add_mask(image_id, m > 0, category, str(mask_path))
    return w.write()


def import_labelme(json_dir, out, overwrite=False):
    """LabelMe JSON files (polygon / rectangle shapes) → COCO JSON.

    Categories are the sorted labels (without `__ignore__`, whose shapes
    become crowd/ignore regions); polygons with fewer than 3 points are
    skipped and reported.
    """
    from PIL import Image, ImageDraw

    json_dir = Path(json_dir)
    files = sorted(json_dir.glob("*.json"))
    docs = []
    for f in files:
        try:
            docs.append((f, json.loads(f.read_text())))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{f}: not a LabelMe JSON file ({e}).") from e
    labels = sorted({s["label"] for _, d in docs for s in d.get("shapes", []) if s["label"] != "__ignore__"})
    w = _Writer(out, json_dir, labels, overwrite)
    for f, d in docs:
        img = (json_dir / d["imagePath"]).resolve()
        if json_dir.resolve() not in img.parents:
            raise ValueError(f"{f}: imagePath {d['imagePath']!r} escapes {json_dir}.")
        if not img.is_file():
            w.skipped.append(f"{f}: image {d['imagePath']} not found")
            continue
        h, w_ = _read_image_size(img)
        if (d.get("imageHeight"), d.get("imageWidth")) not in ((None, None), (h, w_)):
            raise ValueError(f"{f}: imageHeight/Width {d.get('imageHeight')}x{d.get('imageWidth')} but the image is "
                             f"{h}x{w_}.{_size_hint(img, (d.get('imageHeight'), d.get('imageWidth')))}")
        image_id = w.add_image(img, h, w_)
        # Shapes sharing a (label, group_id) are one instance (labelme's rule).
        instances = {}
        for k, s in enumerate(d.get("shapes", [])):
            pts = [tuple(map(float, p)) for p in s["points"]]
            kind = s.get("shape_type") or "polygon"
            if kind == "rectangle" and len(pts) == 2:
                (x0, y0), (x1, y1) = pts
                pts = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
            elif kind != "polygon":
                w.skipped.append(f"{f} shape {k}: shape_type {kind!r} not supported")
                continue
            if len(pts) < 3:
                w.skipped.append(f"{f} shape {k}: polygon with {len(pts)} points")
                continue
            key = (s["label"], k if s.get("group_id") is None else ("group", s["group_id"]))
            instances.setdefault(key, (k, []))[1].append(pts)
        for (label, _), (k, polygons) in instances.items():
            canvas = Image.new("L", (w_, h), 0)
            for pts in polygons:
                ImageDraw.Draw(canvas).polygon(pts, outline=1, fill=1)
            mask = np.asarray(canvas, np.uint8)
            flat = [[c for p in pts for c in p] for pts in polygons]
            if label == "__ignore__":
                # COCOeval matches crowd regions per category: one per
                # category makes the region ignored for every class.
                for name in labels:
                    w.add_mask(image_id, mask, name, f"{f} shape {k}", iscrowd=1, polygons=flat)
                continue
            w.add_mask(image_id, mask, label, f"{f} shape {k}", polygons=flat)
    return w.write()


FORMATS = {
    "instance_png": import_instance_png,
    "instance_folders": import_instance_folders,
    "labelme": import_labelme,
}


def import_dataset(fmt, *args, **kwargs):
    """Dispatches to the importer of `fmt` (one of `FORMATS`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(FORMATS)}.")
    return FORMATS[fmt](*args, **kwargs)


def add_import_subcommand(sub):
    """`keras-solov2 import FORMAT SRC... OUT.json [--category NAME] [--overwrite]`."""

    def run(args):
        kwargs = {"overwrite": args.overwrite}
        if args.format != "labelme":
            kwargs["category"] = args.category
        report = import_dataset(args.format, *args.sources, args.output, **kwargs)
        print(json.dumps({k: v for k, v in report.items() if k != "skipped"}, indent=1))
        for s in report["skipped"]:
            print("skipped:", s)

    p = sub.add_parser("import", help="custom instance masks -> COCO JSON (" + ", ".join(FORMATS) + ")")
    p.add_argument("format", choices=sorted(FORMATS))
    p.add_argument("sources", nargs="+", help="instance_png: IMAGES_DIR MASKS_DIR; others: ROOT")
    p.add_argument("output", help="COCO JSON to write")
    p.add_argument("--category", default="object")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)
