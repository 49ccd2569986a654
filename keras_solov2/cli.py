"""`keras-solov2` command line: demo, train, evaluate, predict, import, convert, assign."""

import argparse
import os
import sys
from pathlib import Path

from keras_solov2.atomic_files import write_json_atomically


def _load_model(spec, num_classes=None, class_names=None):
    """A model from a `.keras` file, a preset (name, folder or .pth) or an
    architecture name; with `num_classes`, for data of that many classes (a
    trained model of another count gets a new class-logit conv, as
    `from_preset(..., num_classes=K)` gives it)."""
    from keras_solov2.models import ARCHITECTURES, SOLOv2
    from keras_solov2.models.presets import PRESETS, _with_num_classes

    path = Path(spec).expanduser()
    if spec in ARCHITECTURES:
        kwargs = {} if num_classes is None else {"num_classes": num_classes, "class_names": class_names}
        return SOLOv2.from_architecture(spec, **kwargs)
    if spec not in PRESETS and not path.exists():
        raise ValueError(f"--model {spec!r} is neither a file or folder nor a name: architectures "
                         f"{sorted(ARCHITECTURES)}, presets {sorted(PRESETS)}.")
    if path.suffix == ".keras":
        import keras

        model = keras.saving.load_model(path, safe_mode=True)
        if num_classes is not None and num_classes != model.num_classes:
            print(f"{spec} has {model.num_classes} classes, the data {num_classes}: "
                  "training a new class-logit conv, every other weight kept")
            return _with_num_classes(model, num_classes, class_names)
        if class_names is not None:
            model.class_names = list(class_names)
        return model
    return SOLOv2.from_preset(spec, num_classes=num_classes, class_names=class_names)


def _image_files(paths):
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in exts)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p} is neither an image file nor a folder.")
    if not files:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, paths))}.")
    return files


def predict_images(model, files, out_dir, score_thr=0.3, class_names=None, category_ids=None, image_ids=None):
    """Predicts each image at its own size; writes `<stem>.png` overlays and `results.json`.

    Args:
        category_ids: contiguous label → COCO `category_id` for the results.
            Default: the COCO ids for a model with the 80 COCO classes (the
            presets), otherwise the contiguous label itself (pass the ids of
            your annotation file, e.g. `describe(...).category_ids`).
        image_ids: optional file name → COCO `image_id` (an annotation
            file's), so that the results can be scored against it; files
            not in it get their index in `files`.

    Returns:
        The COCO-style result dicts (`image_id`, `file_name`, `category_id`,
        `label`, `category_name`, `score`, RLE `segmentation`).

    Raises:
        ValueError: after the others are done and `results.json` written,
            naming the files that are not readable images (each is also
            reported on stderr as it is skipped).
    """
    import numpy as np
    import tensorflow as tf

    from keras_solov2.evaluation import encode_instances
    from keras_solov2.image_files import read_rgb
    from keras_solov2.models.presets import COCO_CATEGORY_IDS, COCO_CLASSES
    from keras_solov2.visualize import draw_instances

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = class_names or model.class_names
    if category_ids is None:
        category_ids = COCO_CATEGORY_IDS if names == COCO_CLASSES else list(range(model.num_classes))
    # One graph for every image size (predict_step pads to /32 inside).
    predict = tf.function(model.predict_step, reduce_retracing=True)
    results, unreadable = [], []
    for i, f in enumerate(files):
        try:
            image = read_rgb(f)  # as training reads it: EXIF orientation, 16-bit scaled
        except (OSError, ValueError) as e:  # not an image, truncated, unsupported mode
            print(f"{f}: skipped, not a readable image ({e.__cause__ or e})", file=sys.stderr)
            unreadable.append(str(f))
            continue
        out = predict(tf.constant(image[None], tf.float32))
        n = int(out["num_detections"][0])
        scores = np.asarray(out["scores"][0, :n])
        keep = scores >= score_thr
        masks = np.asarray(out["masks"][0, :n])[keep]
        labels = np.asarray(out["labels"][0, :n])[keep]
        draw_instances(image, masks, labels, scores[keep], names).save(out_dir / f"{f.stem}.png")
        image_id = image_ids.get(f.name, i) if image_ids else i
        for r, label in zip(encode_instances(masks, scores[keep], labels, image_id, category_ids), labels):
            r["file_name"] = f.name
            r["label"] = int(label)
            if names:
                r["category_name"] = names[int(label)]
            results.append(r)
        print(f"{f.name}: {int(keep.sum())} instances (score >= {score_thr})")
    write_json_atomically(out_dir / "results.json", results)
    if unreadable:
        raise ValueError(f"{len(unreadable)} of {len(files)} files are not readable images and were skipped: "
                         f"{', '.join(unreadable)} (the results of the others are written)")
    return results


def _cmd_predict(args):
    files = _image_files(args.images)
    model = _load_model(args.model)
    category_ids = image_ids = None
    if args.annotations:
        from keras_solov2.data.coco_folder import load_coco

        coco = load_coco(args.annotations)
        category_ids = sorted(coco.cats)  # contiguous labels in category-id order, as `describe`
        if len(category_ids) != model.num_classes:
            raise ValueError(f"{args.annotations} has {len(category_ids)} categories, the model "
                             f"{model.num_classes} classes.")
        image_ids = {Path(im["file_name"]).name: image_id for image_id, im in coco.imgs.items()}
    predict_images(model, files, args.output, args.score_thr, category_ids=category_ids, image_ids=image_ids)
    print(f"wrote overlays and results.json to {args.output}")


def _cmd_assign(args):
    import numpy as np
    from PIL import Image

    from keras_solov2.image_files import read_rgb
    from keras_solov2.visualize import visualize_assignment

    model = _load_model(args.model)
    image = read_rgb(args.image)
    with Image.open(args.instance_mask) as mask_file:
        ids = np.asarray(mask_file)
    if ids.ndim != 2 or ids.shape != image.shape[:2]:
        raise ValueError(f"{args.instance_mask} must be a single-channel id map of the image's size.")
    labels = [k for k in np.unique(ids) if k != 0]
    masks = np.stack([(ids == k).astype(np.uint8) for k in labels]) if labels else np.zeros((0,) + ids.shape, np.uint8)
    visualize_assignment(model, image, masks, np.zeros(len(labels), np.int32)).save(args.output)
    print(f"wrote {args.output}")


def main(argv=None):
    # TensorFlow's C++ info and warning logs (CPU features, tf.data patches)
    # are noise on a command line; an explicit TF_CPP_MIN_LOG_LEVEL still
    # wins. It works because TensorFlow is not loaded yet (the package loads
    # it at first use); TensorFlow 2.21's first lines (oneDNN, CUDA stub)
    # print before it reads the variable.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # This process loads no SavedModel with tensorflow-text ops: keras-hub's
    # import of tensorflow-text can wait for a use that never comes (≈ 116 MB).
    from keras_solov2.lazy_tensorflow_text import defer_tensorflow_text

    defer_tensorflow_text()
    parser = argparse.ArgumentParser(prog="keras-solov2", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from keras_solov2 import training

    training.add_subcommands(sub)

    p = sub.add_parser("predict", help="image files/folder -> PNG overlays + COCO results JSON")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", required=True, help=".keras file, preset name/folder/.pth, or architecture")
    p.add_argument("--output", default="predictions")
    p.add_argument("--score-thr", type=float, default=0.3)
    p.add_argument("--annotations", default=None,
                   help="COCO JSON whose category ids (default: COCO ids for COCO presets) and, by file "
                        "name, image ids the results use")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("assign", help="picture of the grid cells each instance is assigned to")
    p.add_argument("image")
    p.add_argument("instance_mask", help="instance-id PNG (0 = background)")
    p.add_argument("--model", default="solov2_r50")
    p.add_argument("--output", default="assignment.png")
    p.set_defaults(func=_cmd_assign)

    try:
        from keras_solov2.data import importers

        importers.add_import_subcommand(sub)
    except (ImportError, AttributeError):  # pragma: no cover - data extras missing
        pass
    try:
        from keras_solov2.convert import add_convert_subcommand

        add_convert_subcommand(sub)
    except ImportError:  # pragma: no cover
        pass

    return run_reporting_errors(parser, parser.parse_args(argv))


def run_reporting_errors(parser, args):
    """`args.func(args)`; bad input exits 1 with one line, `keras-solov2 CMD: error: …`.

    Bad input (a file, a field, an option; a missing optional extra) is
    named in the message; its traceback would only bury it.
    `KERAS_SOLOV2_TRACEBACK=1` shows it.
    """
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as e:
        if os.environ.get("KERAS_SOLOV2_TRACEBACK"):
            raise
        parser.exit(1, f"keras-solov2 {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
