"""CPU benchmark of the data side of keras-solov2.

Prints a table and writes JSON. Measures, on the read-only shared data:

* the tfds build of `../shared/data/coco_train_mini` (builder `solov2_coco`
  with a `SOLOv2CocoConfig` pointing at that folder, built into a temporary
  data dir): wall time and on-disk size of the prepared dataset;
* the DSB2018 import (`importers.import_instance_folders` over
  `../shared/data/dsb2018/stage1_train` → a COCO JSON with RLE masks, in a
  temporary dir): wall time and JSON size;
* `tf.data` throughput in images/s at 512 px (`scale=(512, 512)`, padded
  512×512, `max_instances=100`, batch 2, training stream: shuffled and
  flipped) of `make_dataset` (COCO JSON + image folder) and
  `make_tfds_dataset` (the tfds build above) over coco_train_mini, after a
  warm-up; and of both with the optional augmentation on (multi-scale,
  random crop, photometric distortion);
* the pipeline's memory at mmdet's training scale (`scale=(1333, 800)`,
  padded as `make_dataset` pads by default: each batch of one orientation
  to its largest image, rounded up to 32; `max_instances=100`, batch 2,
  training stream):
  TensorFlow's tensor peak (`tf.config.experimental.get_memory_info`)
  while iterating, with each batch's instance slots padded to its image
  with most instances (the default) and to `max_instances`
  (`static_slots=True`), and the mean slot count of the batches.

Usage: python benchmarks/bench_data.py [--warmup 5] [--batches 40] [--skip build,import,throughput,memory]
       [--dsb-limit N] [--out FILE]
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
COCO_MINI = DATA / "coco_train_mini"
AUGMENT = dict(scale=[(512, 512), (512, 480), (512, 448), (512, 416), (512, 384)], crop_size=(0.6, 0.6),
               crop_type="relative_range", photometric_distortion=True)


def dir_size(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def bench_build(data_dir):
    """tfds build of coco_train_mini into `data_dir` → (builder, result dict)."""
    import tensorflow_datasets as tfds

    from keras_solov2.data import SOLOv2CocoConfig

    config = SOLOv2CocoConfig(name="coco_train_mini",
                              annotation_file=str(COCO_MINI / "annotations" / "instances_train2017.json"),
                              image_dir=str(COCO_MINI / "train2017"))
    builder = tfds.builder("solov2_coco", config=config, data_dir=str(data_dir))
    t = time.perf_counter()
    builder.download_and_prepare()
    seconds = time.perf_counter() - t
    return builder, {"seconds": seconds, "examples": builder.info.splits["train"].num_examples,
                     "bytes": dir_size(data_dir), "source_image_bytes": dir_size(COCO_MINI / "train2017")}


def bench_import(out_dir, limit=None):
    """DSB2018 instance folders → COCO JSON."""
    from keras_solov2.data.importers import import_instance_folders

    root = DATA / "dsb2018" / "stage1_train"
    if limit:  # a subset through symlinks, never copies
        sub = Path(out_dir) / "subset"
        sub.mkdir()
        for name in sorted(p.name for p in root.iterdir())[:limit]:
            (sub / name).symlink_to(root / name)
        root = sub
    out = Path(out_dir) / "dsb2018.json"
    t = time.perf_counter()
    report = import_instance_folders(root, out, category="nucleus")
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "images": report["images"], "instances": report["instances"],
            "skipped": len(report["skipped"]), "json_bytes": out.stat().st_size}


def throughput(ds, batch_size, warmup, batches):
    """Images/s of iterating `ds` for `batches` batches after `warmup` ones."""
    it = iter(ds)
    t0 = time.perf_counter()
    for _ in range(warmup):
        next(it)
    first = time.perf_counter() - t0
    t = time.perf_counter()
    for _ in range(batches):
        x, _ = next(it)
    seconds = time.perf_counter() - t
    return {"images_per_s": batches * batch_size / seconds, "seconds": seconds, "images": batches * batch_size,
            "warmup_seconds": first, "batch_shape": list(x["images"].shape)}


def bench_throughput(builder, warmup, batches, batch_size=2):
    from keras_solov2.data import describe, make_dataset, make_tfds_dataset

    info = describe(COCO_MINI / "annotations" / "instances_train2017.json", COCO_MINI / "train2017")
    steps = warmup + batches  # one stream long enough, no epoch boundary inside the timing
    results = {}
    for name, kw in [("plain", {"scale": (512, 512)}), ("augmented", AUGMENT)]:
        ds = make_dataset(info, batch_size=batch_size, max_instances=100, training=True, pad_to=(512, 512),
                          steps_per_epoch=steps, **kw)
        results[f"make_dataset_{name}"] = throughput(ds, batch_size, warmup, batches)
        if builder is not None:
            split = builder.as_dataset(split="train", shuffle_files=False).repeat()
            ds = make_tfds_dataset(split, batch_size=batch_size, max_instances=100, training=True,
                                   pad_to=(512, 512), **kw)
            results[f"make_tfds_dataset_{name}"] = throughput(ds, batch_size, warmup, batches)
    return results


def bench_memory(batches, batch_size=2):
    """TensorFlow's tensor peak while iterating the training stream at 1333×800."""
    import tensorflow as tf

    from keras_solov2.data import describe, make_dataset

    info = describe(COCO_MINI / "annotations" / "instances_train2017.json", COCO_MINI / "train2017")
    results = {}
    for static_slots in (False, True):
        ds = make_dataset(info, scale=(1333, 800), batch_size=batch_size, max_instances=100, training=True,
                          steps_per_epoch=batches, static_slots=static_slots)
        tf.config.experimental.reset_memory_stats("CPU:0")
        slots = [int(y["gt_masks"].shape[1]) for _, y in ds]
        results["static_slots" if static_slots else "slots_per_batch"] = {
            "tensor_peak_mb": tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**20,
            "mean_slots": float(np.mean(slots)), "batches": len(slots)}
    return results


def table(r):
    rows = []
    if "tfds_build" in r:
        b = r["tfds_build"]
        rows.append(("tfds build coco_train_mini", f"{b['seconds']:.1f} s",
                     f"{b['examples']} images, {b['bytes'] / 2**20:.1f} MiB on disk "
                     f"(source JPEGs {b['source_image_bytes'] / 2**20:.1f} MiB)"))
    if "dsb_import" in r:
        d = r["dsb_import"]
        rows.append(("DSB2018 import → COCO JSON", f"{d['seconds']:.1f} s",
                     f"{d['images']} images, {d['instances']} instances, JSON {d['json_bytes'] / 2**20:.2f} MiB"))
    for name, t in r.get("throughput", {}).items():
        ok = "meets" if t["images_per_s"] >= r["target_images_per_s"] else "below"
        rows.append((f"{name} 512px b2", f"{t['images_per_s']:.1f} img/s",
                     f"{t['images']} images in {t['seconds']:.1f} s ({ok} the {r['target_images_per_s']} img/s target)"))
    for name, m in r.get("memory", {}).items():
        rows.append((f"pipeline {name} 1333×800 b2", f"{m['tensor_peak_mb']:.0f} MB",
                     f"TensorFlow's tensor peak over {m['batches']} batches, {m['mean_slots']:.1f} slots per batch"))
    width = max(len(a) for a, _, _ in rows)
    lines = [f"{'what':<{width}}  {'result':>12}  notes", "-" * (width + 60)]
    lines += [f"{a:<{width}}  {b:>12}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=5, help="batches before timing")
    ap.add_argument("--batches", type=int, default=40, help="batches timed")
    ap.add_argument("--skip", default="", help="comma list of build,import,throughput,memory")
    ap.add_argument("--dsb-limit", type=int, default=None, help="import only the first N DSB2018 folders")
    ap.add_argument("--target", type=float, default=20.0, help="images/s target for the pipeline")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_data.json"))
    a = ap.parse_args()
    skip = {s for s in a.skip.split(",") if s}
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    import keras_solov2  # noqa: F401  (registers the tfds builder)

    from bench_solov2 import _machine  # the script's folder is on sys.path

    r = {"machine": {**_machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                     "tensorflow": tf.__version__, "load_average_at_start": list(os.getloadavg())},
         "target_images_per_s": a.target, "warmup_batches": a.warmup, "timed_batches": a.batches}
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        builder = None
        if "build" not in skip:
            print("tfds build ...", flush=True)
            builder, r["tfds_build"] = bench_build(Path(tmp) / "tfds")
        if "import" not in skip:
            print("DSB2018 import ...", flush=True)
            (Path(tmp) / "dsb").mkdir()
            r["dsb_import"] = bench_import(Path(tmp) / "dsb", a.dsb_limit)
        if "throughput" not in skip:
            print("tf.data throughput ...", flush=True)
            r["throughput"] = bench_throughput(builder, a.warmup, a.batches)
        if "memory" not in skip:
            print("tf.data memory ...", flush=True)
            r["memory"] = bench_memory(a.warmup + a.batches)
    r["machine"]["load_average_at_end"] = list(os.getloadavg())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(r, indent=1))
    print(table(r))
    print("load average (1, 5, 15 min) at start / end:", r["machine"]["load_average_at_start"],
          r["machine"]["load_average_at_end"])
    print("wrote", a.out)


if __name__ == "__main__":
    main()
