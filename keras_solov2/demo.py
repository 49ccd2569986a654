"""`keras-solov2 demo`: train a light SOLOv2 on synthetic shapes, score it, draw it.

Runs offline in a few minutes on a CPU: a deterministic set of flat-coloured
squares, disks and triangles (occluding each other, on textured backgrounds) is
generated in memory; a light ResNet-18 SOLOv2 sized for 128-px images is
trained from random init with `model.fit` (Adam with warm-up and step decay:
from scratch, SGD needs far more steps than a CPU demo has), scored with
pycocotools' COCO mask mAP on held-out images, and its predictions are
written as PNG overlays.
"""

import time
from pathlib import Path

import numpy as np

CLASS_NAMES = ["square", "disk", "triangle"]


def make_shapes(num_images, size=128, max_instances=5, seed=0):
    """Deterministic synthetic instance-segmentation images.

    Returns:
        `images` `(N, size, size, 3)` uint8 RGB, `masks` `(N, M, size, size)`
        uint8 (visible parts, occlusion applied), `labels` `(N, M)` int32 with
        -1 padding (M = `max_instances`).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.zeros((num_images, size, size, 3), np.uint8)
    masks = np.zeros((num_images, max_instances, size, size), np.uint8)
    labels = -np.ones((num_images, max_instances), np.int32)
    base_colours = np.array([[220, 60, 50], [60, 190, 80], [70, 90, 220]], np.float32)
    for i in range(num_images):
        bg = rng.uniform(60, 160, 3) + rng.normal(0, 12, (size, size, 3))
        img = bg.clip(0, 255)
        for k in range(int(rng.integers(1, max_instances + 1))):
            c = int(rng.integers(0, 3))
            r = rng.uniform(0.08, 0.25) * size
            cy, cx = rng.uniform(r, size - r, 2)
            if c == 0:
                m = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
            elif c == 1:
                m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            else:
                m = (yy >= cy - r) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - (cy - r)) * 0.6)
            masks[i, :k] &= ~m[None]
            masks[i, k] = m
            labels[i, k] = c
            img[m] = (base_colours[c] + rng.normal(0, 20, 3)).clip(0, 255)
        images[i] = img.astype(np.uint8)
    return images, masks, labels


def coco_ground_truth(masks, labels, image_ids=None):
    """In-memory COCO ground truth (pycocotools `COCO`) for arrays from `make_shapes`."""
    import contextlib
    import io

    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    n, _, h, w = masks.shape
    image_ids = list(range(1, n + 1)) if image_ids is None else list(image_ids)
    images, anns = [], []
    for i, iid in enumerate(image_ids):
        images.append({"id": int(iid), "height": h, "width": w, "file_name": f"{iid}.png"})
        for m, lab in zip(masks[i], labels[i]):
            if lab < 0 or not m.any():
                continue
            rle = mask_utils.encode(np.asfortranarray(m))
            ys, xs = np.nonzero(m)
            anns.append({
                "id": len(anns) + 1, "image_id": int(iid), "category_id": int(lab) + 1, "iscrowd": 0,
                "area": float(m.sum()), "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)],
            })
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": k + 1, "name": c} for k, c in enumerate(CLASS_NAMES)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def demo_model(num_classes=3):
    """Light SOLOv2 (ResNet-18) scaled for 128-px images: narrower FPN/head, smaller grids."""
    from keras_solov2.models import SOLOv2

    return SOLOv2.from_architecture(
        "solov2_light_r18",
        num_classes=num_classes,
        class_names=CLASS_NAMES,
        fpn_channels=128,
        feat_channels=128,
        mask_feat_channels=64,
        mask_out_channels=64,
        num_grids=[24, 20, 16, 12, 8],
        frozen_stages=-1,  # trained from scratch: nothing to freeze
        norm_eval=False,
    )


def run_demo(output_dir="solov2_demo", epochs=10, num_train=192, num_val=48, batch_size=8, seed=0):
    """Trains, evaluates and draws; returns the COCO mask AP dict."""
    import keras
    import tensorflow as tf

    from keras_solov2.atomic_files import write_json_atomically
    from keras_solov2.data.coco_folder import _finished
    from keras_solov2.evaluation import evaluate_coco
    from keras_solov2.schedules import WarmupMultiStepDecay
    from keras_solov2.visualize import draw_instances

    start = time.time()
    keras.utils.set_random_seed(seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, masks, labels = make_shapes(num_train + num_val, seed=seed)
    tr = (images[:num_train], masks[:num_train], labels[:num_train])
    va = (images[num_train:], masks[num_train:], labels[num_train:])
    print(f"synthetic shapes: {num_train} train / {num_val} val images of 128x128, classes {CLASS_NAMES}")

    def flip(img, m, lab):
        do = tf.random.uniform(()) < 0.5
        img = tf.where(do, img[:, ::-1], img)
        m = tf.where(do, m[:, :, ::-1], m)
        return tf.cast(img, tf.float32), {"gt_masks": m, "gt_labels": lab}

    steps = num_train // batch_size
    # `_finished`: prefetched, tf.data's autotuning model off; with it, some
    # epochs began 9–10 s late, waiting on the last epoch's iterator.
    train_ds = _finished(tf.data.Dataset.from_tensor_slices(tr).shuffle(num_train, seed=seed)
                         .map(flip).batch(batch_size, drop_remainder=True))
    val_ids = np.arange(1, num_val + 1)
    val_ds = _finished(tf.data.Dataset.from_tensor_slices({
        "images": va[0].astype("float32"), "image_shape": np.full((num_val, 2), 128, np.int32),
        "original_shape": np.full((num_val, 2), 128, np.int32), "image_id": val_ids,
    }).batch(16))
    coco_gt = coco_ground_truth(va[1], va[2], val_ids)

    model = demo_model()
    # Adam, not mmdet's SGD: from random init, SGD's dice gradients need far
    # more steps than a CPU demo has before the masks start to form.
    schedule = WarmupMultiStepDecay(1e-3, [int(epochs * 0.75) * steps], warmup_steps=steps // 2)
    model.compile(keras.optimizers.Adam(schedule), weight_decay=0.0)
    model.fit(train_ds, epochs=epochs, verbose=2, shuffle=False,  # train_ds is shuffled; fit only warns
              callbacks=[keras.callbacks.TerminateOnNaN()])
    train_time = time.time() - start
    stats = evaluate_coco(model, val_ds, coco_gt, [1, 2, 3])
    print("COCO mask AP on held-out images: " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))

    pred = model.predict(va[0][:6].astype("float32"), verbose=0)
    for i in range(6):
        n = int(pred["num_detections"][i])
        keep = pred["scores"][i, :n] >= 0.3
        draw_instances(va[0][i], pred["masks"][i, :n][keep], pred["labels"][i, :n][keep],
                       pred["scores"][i, :n][keep], CLASS_NAMES).resize((256, 256)).save(out / f"val_{i}.png")
    model.save(out / "model.keras")
    write_json_atomically(out / "metrics.json", {
        "mask_AP": stats, "train_seconds": train_time, "total_seconds": time.time() - start}, indent=1)
    print(f"trained in {train_time:.0f} s; wrote {out}/val_*.png, model.keras, metrics.json")
    return stats
