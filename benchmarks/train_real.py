"""Real-data check: the light R18 SOLOv2 trained from random init, COCO mask AP on a held-out split.

Datasets (read-only, `../shared/data/`), imported to COCO JSON with the
project's importers into the run folder (never into the data folder):

* `dsb2018`: DSB2018 nuclei, `stage1_train/<id>/{images,masks}` (one class).
  The recipe mmdetection 3.3 was run with on this machine (≈60 min of
  training, mask AP 0.099 / AP50 0.303 on a held-out split): keep-ratio resize
  to (640, 384), flip 0.5, pad /32, batch 4, SGD lr 0.0025 momentum 0.9,
  weight decay 1e-4, grad clip 35, linear warm-up 200 iterations from 1/3,
  8 epochs with ×0.1 at epochs 5 and 7; solov2-light test settings.
* `pennfudan`: Penn-Fudan pedestrians, `PNGImages/` + `PedMasks/` (one
  class). The same model, resize and optimiser; only ~100 training images,
  so 3× the epochs (24, ×0.1 at 16 and 22: mmdet's 1x milestone fractions).

Model: `SOLOv2.from_architecture("solov2_light_r18", num_classes=1,
frozen_stages=-1, norm_eval=False)`: random init, every BatchNorm trained,
nothing frozen (no pretrained weights on this machine).

Batches. mmdet draws batches at random within two orientation groups
(`AspectRatioBatchSampler`) and pads each to its largest image (/32).
SOLOv2 training here needs static shapes, so batches are drawn the same way
(shuffled passes with deterministic flips as `coco_folder.make_dataset`;
a group's partial batch carries over to the next pass) and each is padded
to the smallest of a few shape buckets `(H, W)` (multiples of 32) that holds
all its images. Each bucket's shape gets its own trace of
`model.train_step`, so the loop is written here rather than with `fit` (one
trace for the dataset's element spec). Batching by exact shape instead
(the first version) made every DSB2018 batch one image type and cost
two thirds of the mask AP through BatchNorm's test-time statistics (see
`batch_plan`).

`max_instances` (384) is above the densest image (DSB: 375 nuclei), so no
instance is dropped. The stream is built from the project's pieces
(`load_coco`, `validate_images`, `resize_flip_pad`) with one difference to
`make_dataset`: a batch's instance slots are padded to its densest image
rather than to `max_instances` (a typical DSB batch uses a fifth of them;
the model's loss trims unused slots either way, so the sums are the same).
`max_pos_pairs` (the per-image cap on positive (instance, cell) pairs whose
masks enter the dice loss) is set above the densest training image's count,
measured before training (flipped and not), so the loss is mmdet's exact sum.
Evaluation: batch 1 (as mmdet's test loop), pycocotools over every
validation image (`evaluation.evaluate_coco`).

Usage:
    python benchmarks/train_real.py dsb2018|pennfudan [--epochs N] [--output DIR]
                                    [--max-images N] [--val-fraction 0.2] [--seed 0]
                                    [--dtype mixed_bfloat16] [--train-seed N]

`--output` (default `/tmp/train_real_<name>`) receives the COCO JSON, the
split, `log.csv` and the final weights. `--max-images N` keeps the first N
images (sorted ids) for a smoke run and writes `train_real_<name>_smoke.json`.
Prints a table; writes `benchmarks/results/train_real_<name>.json`.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"

# mmdet solov2-light test_cfg.
TEST_CFG = dict(nms_pre=500, score_thr=0.1, mask_thr=0.5, filter_thr=0.05, kernel="gaussian", sigma=2.0,
                max_per_img=100)

# mmdet's DSB2018 run on this machine: batch 4, SGD lr 0.0025, linear warm-up
# over 200 iterations from 1/3. Penn-Fudan uses the same.
OPTIMIZER = dict(batch_size=4, base_lr=0.0025, warmup_steps=200, warmup_ratio=1.0 / 3)

RECIPES = {
    "dsb2018": dict(
        OPTIMIZER,
        category="nucleus",
        scale=(640, 384),
        # Padded sizes of the resized images: 384×384 (301), 384×480 (94),
        # 384×544 (57), 384×512 (3), 320×640 (5); a batch mixing the last
        # two needs 384×640.
        buckets=((384, 384), (384, 480), (384, 544), (384, 640)),
        epochs=8,
        milestones=(5, 7),
        max_instances=384,
        reference={"implementation": "mmdetection 3.3 (same recipe, same machine)", "train_minutes": 60,
                   "mask_AP": 0.099, "mask_AP50": 0.303},
    ),
    "pennfudan": dict(
        OPTIMIZER,
        category="pedestrian",
        scale=(640, 384),
        # Padded sizes: landscape 384×416 … 384×640 (and 320/352×640),
        # portrait 416…576×384.
        buckets=((384, 448), (384, 544), (384, 640), (448, 384), (576, 384)),
        epochs=24,
        milestones=(16, 22),
        max_instances=16,
        reference=None,
    ),
}


def train_seed_and_tag(seed, train_seed):
    """`train_seed` (default: the split's `seed`) and the `_train_seed<N>` file-name tag it adds
    (empty for the default), shared with `peer_train_real.py` so both name their results alike.

    The split is `seed`'s; `train_seed` draws the init, batch order and flips, so several runs
    on one split measure the run-to-run spread."""
    train_seed = seed if train_seed is None else train_seed
    return train_seed, "" if train_seed == seed else f"_train_seed{train_seed}"


def import_dataset(name, out_dir):
    """The dataset as a COCO JSON in `out_dir` → `(annotation_file, image_root, report)`."""
    from keras_solov2.data.importers import import_instance_folders, import_instance_png

    ann = out_dir / f"{name}.json"
    if name == "dsb2018":
        report = import_instance_folders(DATA / "dsb2018" / "stage1_train", ann, category="nucleus", overwrite=True)
    else:
        report = import_instance_png(DATA / "pennfudan" / "PNGImages", DATA / "pennfudan" / "PedMasks", ann,
                                     category="pedestrian", overwrite=True)
    return ann, report["image_root"], report


def open_dataset(ann, image_root, recipe):
    """An imported dataset → `(info, coco, bucket_of)`; `bucket_of[image_id]` indexes `recipe["buckets"]`."""
    from keras_solov2.data.coco_folder import describe, load_coco

    info = describe(ann, image_root)
    coco = load_coco(ann)
    return info, coco, assign_buckets(coco, info.image_ids, recipe["scale"], recipe["buckets"])


def val_batches(coco, info, val_ids, bucket_of, recipe):
    """Evaluation batches: batch 1 (as mmdet's test loop), each image padded to its own bucket."""
    plan = [(bucket_of[i], [(i, False)]) for i in val_ids]
    streams = bucket_streams(coco, info, plan, dict(recipe, batch_size=1), with_targets=False)
    return (next(streams[b]) for b, _ in plan)


def instance_counts(coco, ids):
    return np.array([sum(1 for a in coco.imgToAnns.get(i, []) if not a.get("iscrowd", 0)) for i in ids])


def padded_shape(height, width, scale):
    """The keep-ratio resize of `resize_flip_pad` (mmcv rounding), padded up to /32."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    h, w = int(height * factor + 0.5), int(width * factor + 0.5)
    return -(-h // 32) * 32, -(-w // 32) * 32


def smallest_bucket(height, width, buckets):
    """Index of the smallest-area bucket `(H, W)` holding `height × width`.

    Anything larger than every bucket goes to the largest one and is shrunk
    to fit it (`resize_flip_pad` caps the factor at `pad_to`).
    """
    order = sorted(range(len(buckets)), key=lambda b: buckets[b][0] * buckets[b][1])
    fits = [b for b in order if height <= buckets[b][0] and width <= buckets[b][1]]
    return fits[0] if fits else order[-1]


def assign_buckets(coco, ids, scale, buckets):
    """Image id → index of the smallest bucket holding its padded size."""
    return {i: smallest_bucket(*padded_shape(coco.imgs[i]["height"], coco.imgs[i]["width"], scale), buckets)
            for i in ids}


def batch_plan(ids, shape_of, buckets, batch_size, num_batches, seed, flip_prob=0.5):
    """The training run's batches: `[(bucket, [(image_id, flip), ...]), ...]`, as mmdet batches.

    Pass `p` over the images is a permutation seeded by `(seed, p)` and the
    flip of its `i`-th example is seeded by `(seed, p, i)`, as
    `coco_folder.make_dataset`. Images are grouped only by orientation
    (portrait vs landscape/square; partial batches carry over to the next
    pass), as mmdet's `AspectRatioBatchSampler`, and each batch is padded to
    the smallest bucket holding all its images, as mmdet pads a batch to
    its largest image. (Batching by exact shape instead makes DSB2018's
    batches one image type each, fluorescent 256² or stained larger
    images: BatchNorm then learns per-type batch statistics that its
    running averages, used at test time, match poorly; that run scored
    mask AP 0.016-0.029 instead of mmdet's 0.099.)
    """
    def bucket(examples):
        return smallest_bucket(max(shape_of[i][0] for i, _ in examples),
                               max(shape_of[i][1] for i, _ in examples), buckets)

    n = len(ids)
    pending = {False: [], True: []}
    plan, passes = [], 0
    while len(plan) < num_batches:
        perm = np.random.default_rng([seed, passes]).permutation(n)
        for i, j in enumerate(perm):
            flip = bool(np.random.default_rng([seed, passes, i]).random() < flip_prob)
            portrait = shape_of[ids[j]][0] > shape_of[ids[j]][1]
            pending[portrait].append((ids[j], flip))
            if len(pending[portrait]) == batch_size:
                plan.append((bucket(pending[portrait]), pending[portrait]))
                pending[portrait] = []
                if len(plan) == num_batches:
                    break
        passes += 1
    return plan


def make_stream(coco, info, examples, scale, pad_to, batch_size, max_instances, with_targets=True,
                fixed_slots=False):
    """`(x, y)` batches of one static image shape `pad_to`, as `coco_folder.make_dataset`.

    `examples`: `[(image_id, flip), ...]` in stream order. Only the image's
    real instances (at most `max_instances`) are resized
    (`resize_flip_pad`). A batch's instance slots are padded to its densest
    image (`gt_masks` `(B, None, H, W)`; the loss trims to the used slots
    anyway, and padding every DSB image to 384 slots cost the input
    pipeline ≈0.3 s of CPU per batch), or to `max_instances` with
    `fixed_slots`. Without `with_targets` (evaluation) `y` holds one empty
    slot.
    """
    import tensorflow as tf

    from keras_solov2.data.coco_folder import read_rgb, resize_flip_pad, safe_image_path

    label_of = {c: i for i, c in enumerate(info.category_ids)}
    slots = max_instances if with_targets else 1

    def load(image_id):
        path = safe_image_path(info.image_root, coco.imgs[image_id]["file_name"], info.annotation_file)
        image = read_rgb(path, image_id, info.annotation_file)
        h, w = image.shape[:2]
        masks, labels = [], []
        if with_targets:
            for ann in coco.imgToAnns.get(image_id, []):
                if ann.get("iscrowd", 0):
                    continue  # ignore regions for COCOeval, not positives
                m = coco.annToMask(ann)
                if m.any():
                    masks.append(m)
                    labels.append(label_of[ann["category_id"]])
        masks, labels = masks[:slots], labels[:slots]
        if not masks:  # one ignored empty slot keeps the resize well defined
            masks, labels = [np.zeros((h, w), np.uint8)], [-1]
        return image, np.stack(masks), np.array(labels, np.int32)

    def generate():
        for image_id, flip in examples:
            image, masks, labels = load(image_id)
            yield image, masks, labels, np.array(image.shape[:2], np.int32), np.int64(image_id), flip

    sig = (
        tf.TensorSpec((None, None, 3), tf.uint8),
        tf.TensorSpec((None, None, None), tf.uint8),
        tf.TensorSpec((None,), tf.int32),
        tf.TensorSpec((2,), tf.int32),
        tf.TensorSpec((), tf.int64),
        tf.TensorSpec((), tf.bool),
    )

    fixed = fixed_slots or not with_targets

    def transform(image, masks, labels, original_shape, image_id, flip):
        x, y = resize_flip_pad(image, masks, labels, original_shape, image_id, flip, scale, pad_to,
                               slots if fixed else None)
        if not fixed:  # at least one (padding) slot, as the fixed layout has
            short = tf.maximum(1 - tf.shape(y["gt_labels"])[0], 0)
            y = {"gt_masks": tf.pad(y["gt_masks"], [[0, short], [0, 0], [0, 0]]),
                 "gt_labels": tf.pad(y["gt_labels"], [[0, short]], constant_values=-1)}
        return x, y

    ds = tf.data.Dataset.from_generator(generate, output_signature=sig)
    ds = ds.map(transform, num_parallel_calls=2, deterministic=True)
    if fixed:
        return ds.batch(batch_size).prefetch(2)
    x_pad = {k: None for k in ds.element_spec[0]}
    return ds.padded_batch(batch_size, padding_values=(x_pad, {"gt_masks": None, "gt_labels": -1})).prefetch(2)


def bucket_streams(coco, info, plan, recipe, with_targets=True):
    """One iterator per bucket over its examples, in plan order."""
    per_bucket = {}
    for b, examples in plan:
        per_bucket.setdefault(b, []).extend(examples)
    return {b: iter(make_stream(coco, info, ex, recipe["scale"], tuple(recipe["buckets"][b]), recipe["batch_size"],
                                recipe["max_instances"], with_targets))
            for b, ex in per_bucket.items()}


def positive_pairs(coco, info, ids, bucket_of, recipe, num_grids, scale_ranges, pos_scale):
    """Positive (instance, cell) pairs of each training image, unflipped and flipped, as the loss sees them."""
    import tensorflow as tf

    from keras_solov2 import targets

    def count(m, lab):
        return tf.reduce_sum(tf.cast(targets.assign_targets(
            m, lab, 1, num_grids, scale_ranges, pos_scale)["pair_valid"], tf.int32), axis=[1, 2, 3])

    traced = {}  # one tf.function per bucket
    counts = []
    for flip in (False, True):
        plan = []
        for b in sorted(set(bucket_of[i] for i in ids)):
            chunk = [(i, flip) for i in ids if bucket_of[i] == b]
            plan += [(b, chunk[k:k + recipe["batch_size"]]) for k in range(0, len(chunk), recipe["batch_size"])]
        streams = bucket_streams(coco, info, plan, recipe)
        for b, _ in plan:
            batch = next(streams[b])
            if b not in traced:
                spec = any_slot_count(batch, any_batch_size=True)[1]  # a bucket's last batch may be short
                traced[b] = tf.function(count, input_signature=[spec["gt_masks"], spec["gt_labels"]])
            counts.extend(np.asarray(traced[b](batch[1]["gt_masks"], batch[1]["gt_labels"])).tolist())
    return np.array(counts)


def any_slot_count(batch, any_batch_size=False):
    """The `TensorSpec`s of a batch with the instance-slot axis left open.

    A bucket's batches differ only in their slot count (each is padded to
    its densest image); one trace per bucket covers them all.
    """
    import tensorflow as tf

    x, y = tf.nest.map_structure(tf.TensorSpec.from_tensor, batch)
    b = None if any_batch_size else y["gt_labels"].shape[0]
    return x, {"gt_masks": tf.TensorSpec((b, None) + tuple(y["gt_masks"].shape[2:]), tf.uint8),
               "gt_labels": tf.TensorSpec((b, None), tf.int32)}


def build_model(recipe, max_pos_pairs, dtype=None, winograd=True):
    from keras_solov2.models.solov2 import SOLOv2

    return SOLOv2.from_architecture("solov2_light_r18", num_classes=1, class_names=[recipe["category"]],
                                    frozen_stages=-1, norm_eval=False, max_pos_pairs=max_pos_pairs, dtype=dtype,
                                    winograd=winograd, **TEST_CFG)


def train_loop(model, plan, streams, epochs, steps, log_path):
    """`model.train_step` over the planned batches, one trace per bucket shape.

    (`fit` traces one function for the dataset's element spec, so it needs
    a single static batch shape; here each bucket's image shape gets its
    own trace, with any slot count.) Stops at the first non-finite loss, as
    `TerminateOnNaN`.
    """
    import tensorflow as tf

    model.optimizer.build(model.trainable_variables)
    step_fns = {}
    times, epoch_logs, nan_step = [], [], None
    with open(log_path, "w") as log:
        log.write("epoch,loss,loss_cls,loss_mask,lr,seconds\n")
        for epoch in range(epochs):
            for m in model.metrics:
                m.reset_state()
            t_epoch = time.perf_counter()
            for s in range(steps):
                b, _ = plan[epoch * steps + s]
                batch = next(streams[b])
                if b not in step_fns:
                    step_fns[b] = tf.function(model.train_step, autograph=False,
                                              input_signature=[any_slot_count(batch)])
                t = time.perf_counter()
                logs = step_fns[b](batch)
                loss = float(logs["loss"])  # waits for the step
                times.append(time.perf_counter() - t)
                if not np.isfinite(loss):
                    nan_step = epoch * steps + s
                    print(f"non-finite loss at step {nan_step}; stopping", flush=True)
                    break
                if (s + 1) % 20 == 0:
                    print(f"  epoch {epoch + 1} step {s + 1}/{steps}: {times[-1]:.2f} s/step, running loss "
                          f"{loss:.4f}", flush=True)
            if nan_step is not None:
                break
            row = {k: float(v) for k, v in logs.items()}
            row["lr"] = float(model.optimizer.learning_rate)
            row["seconds"] = time.perf_counter() - t_epoch
            # Other processes on the machine make the times meaningless: record the load.
            row["loadavg_1min"] = os.getloadavg()[0]
            epoch_logs.append(row)
            log.write(f"{epoch},{row['loss']},{row['loss_cls']},{row['loss_mask']},{row['lr']},{row['seconds']}\n")
            log.flush()
            print(f"epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f} (cls {row['loss_cls']:.4f}, mask "
                  f"{row['loss_mask']:.4f}), lr {row['lr']:.6f}, {row['seconds']:.0f} s", flush=True)
    return times, epoch_logs, nan_step


def run(name, epochs=None, output=None, max_images=None, val_fraction=0.2, seed=0, dtype=None, train_seed=None):
    import keras
    import tensorflow as tf

    from keras_solov2.data.coco_folder import split_ids, validate_images
    from keras_solov2.evaluation import evaluate_coco
    from keras_solov2.models.architectures import ARCHITECTURES
    from keras_solov2.schedules import WarmupMultiStepDecay

    recipe = dict(RECIPES[name])
    smoke = max_images is not None
    if epochs is not None and epochs != recipe["epochs"]:
        # Keep the milestones at the same fractions of the run.
        recipe["milestones"] = tuple(m * epochs / recipe["epochs"] for m in recipe["milestones"])
        recipe["epochs"] = epochs
    train_seed, seed_tag = train_seed_and_tag(seed, train_seed)
    tag = ("" if dtype in (None, "float32") else f"_{dtype}") + seed_tag
    out = Path(output or f"/tmp/train_real_{name}{tag}{'_smoke' if smoke else ''}")
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(train_seed)

    ann, image_root, _ = import_dataset(name, out)
    info, coco, bucket_of = open_dataset(ann, image_root, recipe)
    ids = info.image_ids[:max_images] if smoke else info.image_ids
    train_ids, val_ids = split_ids(ids, val_fraction, seed)
    (out / "split.json").write_text(json.dumps({"train": train_ids, "val": val_ids}))
    validate_images(coco, info, ids)
    n_train, n_val = instance_counts(coco, train_ids), instance_counts(coco, val_ids)
    dropped = int(np.maximum(n_train - recipe["max_instances"], 0).sum())
    print(f"{name}: {len(ids)} images, {len(train_ids)} train ({int(n_train.sum())} instances, max "
          f"{int(n_train.max())}/image), {len(val_ids)} val ({int(n_val.sum())} instances, max "
          f"{int(n_val.max())}/image); {dropped} training instances over max_instances={recipe['max_instances']}",
          flush=True)
    bucket_sizes = {str(tuple(recipe["buckets"][b])): sum(1 for i in train_ids if bucket_of[i] == b)
                    for b in range(len(recipe["buckets"]))}
    print(f"train images by the bucket of their own padded size: {bucket_sizes}", flush=True)

    arch = ARCHITECTURES["solov2_light_r18"]
    t = time.perf_counter()
    pairs = positive_pairs(coco, info, train_ids, bucket_of, recipe, arch["num_grids"], arch["scale_ranges"],
                           arch["pos_scale"])
    # The cap covers the densest image (flipped or not) with a margin for
    # the larger padded shapes of mixed batches (cells are fractions of the
    # padded size): mmdet's exact dice sum.
    max_pos_pairs = int(-(-pairs.max() * 1.25 // 64) * 64)
    print(f"positive pairs per training image (unflipped and flipped): median {int(np.median(pairs))}, max "
          f"{int(pairs.max())} -> max_pos_pairs={max_pos_pairs} ({time.perf_counter() - t:.0f} s)", flush=True)

    model = build_model(recipe, max_pos_pairs, dtype)
    bs = recipe["batch_size"]
    steps = len(train_ids) // bs
    milestone_steps = [int(round(m * steps)) for m in recipe["milestones"]]
    lr = WarmupMultiStepDecay(recipe["base_lr"], milestone_steps, gamma=0.1,
                              warmup_steps=recipe["warmup_steps"], warmup_ratio=recipe["warmup_ratio"])
    model.compile(keras.optimizers.SGD(lr, momentum=0.9), weight_decay=1e-4, grad_clip_norm=35.0)
    shape_of = {i: padded_shape(coco.imgs[i]["height"], coco.imgs[i]["width"], recipe["scale"]) for i in train_ids}
    plan = batch_plan(train_ids, shape_of, recipe["buckets"], bs, recipe["epochs"] * steps, train_seed)
    streams = bucket_streams(coco, info, plan, recipe)
    print(f"training {recipe['epochs']} epochs x {steps} steps (batch {bs}), lr {recipe['base_lr']} "
          f"x0.1 at steps {milestone_steps}", flush=True)
    t0 = time.perf_counter()
    times, epoch_logs, nan_step = train_loop(model, plan, streams, recipe["epochs"], steps, out / "log.csv")
    train_s = time.perf_counter() - t0
    model.save_weights(out / "final.weights.h5")

    # Evaluation: batch 1 (as mmdet's test loop), each image padded to its bucket.
    t0 = time.perf_counter()
    stats = evaluate_coco(model, val_batches(coco, info, val_ids, bucket_of, recipe), str(ann),
                          info.label_to_category_id)
    eval_s = time.perf_counter() - t0
    shapes = sorted({b for b, _ in plan})
    first_steps = {}
    for i, (b, _) in enumerate(plan[: len(times)]):
        first_steps.setdefault(b, i)
    traced = set(first_steps.values())
    steady = [t for i, t in enumerate(times) if i not in traced]
    per_bucket = {}
    for i, (b, _) in enumerate(plan[: len(times)]):
        if i not in traced:
            per_bucket.setdefault(b, []).append(times[i])
    per_bucket = {str(tuple(recipe["buckets"][b])): {"steps": len(v), "median_s": round(statistics.median(v), 3)}
                  for b, v in sorted(per_bucket.items())}
    result = {
        "dataset": name,
        "smoke": smoke,
        "model": "solov2_light_r18, random init, frozen_stages=-1, norm_eval=False",
        "dtype_policy": model.dtype_policy.name,
        "init": "mmdet 3.3's from-scratch init (backbone Kaiming fan-out + zero_init_residual; FPN Xavier; "
                "head Normal(0.01), conv_pred Kaiming)",
        "recipe": {k: ([list(v) for v in val] if k == "buckets" else list(val) if isinstance(val, tuple) else val)
                   for k, val in recipe.items() if k != "reference"},
        "milestone_steps": milestone_steps,
        "max_pos_pairs": max_pos_pairs,
        "test_cfg": TEST_CFG,
        "train_seed": train_seed,
        "split": {"seed": seed, "val_fraction": val_fraction, "train_images": len(train_ids),
                  "val_images": len(val_ids), "train_instances": int(n_train.sum()),
                  "val_instances": int(n_val.sum()), "max_instances_per_train_image": int(n_train.max()),
                  "max_instances_per_val_image": int(n_val.max()),
                  "val_images_over_max_per_img": int((n_val > TEST_CFG["max_per_img"]).sum()),
                  "val_instances_over_max_per_img": int(np.maximum(n_val - TEST_CFG["max_per_img"], 0).sum())},
        "train_images_per_bucket": bucket_sizes,
        "dropped_train_instances": dropped,
        "positive_pairs_per_train_image": {"median": float(np.median(pairs)), "max": int(pairs.max())},
        "steps": len(times),
        "traced_shapes": len(shapes),
        "train_seconds": round(train_s, 1),
        "seconds_per_step_median": round(statistics.median(steady or times), 3),
        "seconds_per_step_mean": round(train_s / max(1, len(times)), 3),
        "seconds_per_step_by_bucket": per_bucket,
        "first_step_seconds": {str(tuple(recipe["buckets"][b])): round(times[i], 1) for b, i in first_steps.items()},
        "eval_seconds": round(eval_s, 1),
        "max_loadavg_1min_at_epoch_ends": round(max((r["loadavg_1min"] for r in epoch_logs), default=0.0), 2),
        "epochs": [{k: round(v, 5) for k, v in row.items()} for row in epoch_logs],
        "nan_loss_step": nan_step,
        "mask": {k: round(v, 4) for k, v in stats.items()},
        "reference": RECIPES[name]["reference"],
        "environment": {"cpus": os.cpu_count(), "python": platform.python_version(), "tensorflow": tf.__version__,
                        "keras": keras.__version__},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"train_real_{name}{tag}{'_smoke' if smoke else ''}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"wrote {path}")
    return result


def print_table(r):
    s = r["split"]
    rows = [
        ("images train / val", f"{s['train_images']} / {s['val_images']}"),
        ("instances train / val", f"{s['train_instances']} / {s['val_instances']}"),
        ("dropped train instances", str(r["dropped_train_instances"])),
        ("epochs x steps", f"{r['recipe']['epochs']} x {r['steps'] // max(1, r['recipe']['epochs'])} (batch "
                           f"{r['recipe']['batch_size']}), max_pos_pairs {r['max_pos_pairs']}"),
        ("train time", f"{r['train_seconds'] / 60:.1f} min"),
        ("s/step (median, mean)", f"{r['seconds_per_step_median']:.2f}, {r['seconds_per_step_mean']:.2f}"),
        ("eval time", f"{r['eval_seconds']:.0f} s"),
        ("max load avg (2 CPUs)", f"{r['max_loadavg_1min_at_epoch_ends']:.1f}"),
        ("mask AP", f"{r['mask']['AP']:.3f}"),
        ("mask AP50", f"{r['mask']['AP50']:.3f}"),
        ("mask AP75", f"{r['mask']['AP75']:.3f}"),
        ("non-finite loss", "none" if r["nan_loss_step"] is None else f"at step {r['nan_loss_step']}"),
    ]
    ref = r["reference"]
    if ref:
        rows.append(("reference", f"{ref['implementation']}: ~{ref['train_minutes']} min, "
                                  f"AP {ref['mask_AP']}, AP50 {ref['mask_AP50']}"))
    print(f"\n{r['dataset']}{' (smoke)' if r['smoke'] else ''}: {r['dtype_policy']}, init as mmdet's, "
          f"split seed {s['seed']}, train seed {r['train_seed']}")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=sorted(RECIPES))
    ap.add_argument("--epochs", type=int, help="override the recipe's epochs (milestones scaled)")
    ap.add_argument("--output", help="run folder (COCO JSON, split, weights, log); default /tmp/train_real_<name>")
    ap.add_argument("--max-images", type=int, help="first N images only (smoke run)")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0, help="the split's seed (and the training's, by default)")
    ap.add_argument("--train-seed", type=int, help="init, batch order and flips (default: --seed)")
    ap.add_argument("--dtype", default=None, help="dtype policy, e.g. mixed_bfloat16 (default float32)")
    args = ap.parse_args()
    run(args.dataset, args.epochs, args.output, args.max_images, args.val_fraction, args.seed, args.dtype,
        args.train_seed)


if __name__ == "__main__":
    sys.exit(main())
