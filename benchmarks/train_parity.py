"""Training-step parity with mmdetection 3.3: same initial weights, same batches, N SGD steps.

Forward, targets and loss already match mmdet's fixtures per stage (tests);
this checks the whole training step over several updates, where a wrong
gradient, optimizer, clipping or BatchNorm detail shows up as diverging
losses:

1. Ours: the first `--steps` batches of 4 DSB2018 training images of the
   384×384 shape bucket (`train_real.py`'s split and stream, unflipped) are
   written to `--work/batches.npz`.
2. mmdet (`--peer-python`, a venv made with `../shared/peer/setup_venv.sh`):
   solov2-light R18, one class, `init_weights()` under `torch.manual_seed(0)`
   (its from-scratch init), saved as `init.pth`; then `--steps` steps of
   `model.loss` → backward → `clip_grad_norm_(35)` → SGD(lr 0.0025,
   momentum 0.9, wd 1e-4), logging the losses.
3. Ours: `init.pth` converted (`keras_solov2.convert`), the same steps
   through `SOLOv2.train_step` (same optimizer settings; our weight decay
   skips norm/bias parameters, ≈ 2.5e-7 relative per step here).

Also compares the step-0 gradient tensor by tensor (before clipping).
Prints both loss sequences and their relative differences; writes
`benchmarks/results/train_parity.json` (`train_parity_direct.json` with
`--no-winograd`). Step 0 is the forward pass on
identical weights; later steps diverge slowly through float rounding
(chaotic, amplified by the clipped steps) unless something is wrong.
≈ 4 min in all at 12 steps on 2 cores.

Usage:
    python benchmarks/train_parity.py --peer-python /work/peer/venv/bin/python [--steps 20]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PEER_ENV = ROOT.parent / "shared" / "peer"
RESULTS = ROOT / "benchmarks" / "results"

MMDET_CFG = """
cfg = dict(type='SOLOv2',
    data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_mask=True, pad_size_divisor=32),
    backbone=dict(type='ResNet', depth=18, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=-1,
                  norm_eval=False, style='pytorch'),
    neck=dict(type='FPN', in_channels=[64, 128, 256, 512], out_channels=256, start_level=0, num_outs=5),
    mask_head=dict(type='SOLOV2Head', num_classes=1, in_channels=256, feat_channels=256, stacked_convs=2,
        strides=[8, 8, 16, 32, 32], scale_ranges=((1, 56), (28, 112), (56, 224), (112, 448), (224, 896)),
        pos_scale=0.2, num_grids=[40, 36, 24, 16, 12], cls_down_index=0,
        mask_feature_head=dict(feat_channels=128, start_level=0, end_level=3, out_channels=128, mask_stride=4,
                               norm_cfg=dict(type='GN', num_groups=32, requires_grad=True)),
        loss_mask=dict(type='DiceLoss', use_sigmoid=True, loss_weight=3.0),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        norm_cfg=dict(type='GN', num_groups=32, requires_grad=True)),
    test_cfg=dict(nms_pre=500, score_thr=0.1, mask_thr=0.5, filter_thr=0.05, kernel='gaussian', sigma=2.0,
                  max_per_img=100))
"""

# Runs in the mmdet venv: argv = peer_env dir, work dir, steps.
MMDET_SCRIPT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import peer_env  # noqa: F401  (stand-in for mmcv's compiled ops)
import numpy as np, torch
torch.set_num_threads(2)
from mmdet.utils import register_all_modules
register_all_modules()
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.structures.mask import BitmapMasks
from mmengine.structures import InstanceData
work, steps = sys.argv[2], int(sys.argv[3])
exec(CFG)
torch.manual_seed(0)
model = MODELS.build(cfg)
model.init_weights()
torch.save(model.state_dict(), f"{work}/init.pth")
d = np.load(f"{work}/batches.npz")
mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.SGD(params, lr=0.0025, momentum=0.9, weight_decay=1e-4)
model.train()
log = []
for s in range(steps):
    images = torch.from_numpy(d["images"][s]).permute(0, 3, 1, 2).float()
    h, w = images.shape[2:]
    samples = []
    for b in range(images.shape[0]):
        labels = d["labels"][s, b]
        k = int((labels >= 0).sum())
        masks = d["masks"][s, b, :k].astype(np.uint8)
        boxes = []
        for m in masks:
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), pad_shape=(h, w), batch_input_shape=(h, w)))
        gt = InstanceData()
        gt.bboxes = torch.tensor(np.array(boxes), dtype=torch.float32).reshape(-1, 4)
        gt.labels = torch.from_numpy(labels[:k].astype(np.int64))
        gt.masks = BitmapMasks(masks, h, w)
        sample.gt_instances = gt
        samples.append(sample)
    t = time.perf_counter()
    losses = model.loss((images - mean) / std, samples)
    loss = sum(losses.values())
    opt.zero_grad()
    loss.backward()
    if s == 0:
        np.savez(f"{work}/mmdet_grads_step0.npz",
                 **{n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None})
    grad_norm = torch.nn.utils.clip_grad_norm_(params, 35.0)
    opt.step()
    log.append(dict(loss=loss.item(), loss_cls=losses["loss_cls"].item(), loss_mask=losses["loss_mask"].item(),
                    grad_norm=grad_norm.item(), seconds=time.perf_counter() - t))
    print(s, log[-1], flush=True)
json.dump(log, open(f"{work}/mmdet_log.json", "w"))
"""


def dump_batches(work, steps, seed=0):
    """The first `steps` unflipped batches of 4 from the 384×384 bucket of train_real's DSB split."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_real as tr

    from keras_solov2.data.coco_folder import split_ids

    recipe = tr.RECIPES["dsb2018"]
    ann, image_root, _ = tr.import_dataset("dsb2018", work)
    info, coco, bucket_of = tr.open_dataset(ann, image_root, recipe)
    train_ids, _ = split_ids(info.image_ids, 0.2, seed)
    ids = [i for i in train_ids if bucket_of[i] == 0][: 4 * steps]
    slots = max(int(n) for n in tr.instance_counts(coco, ids))
    stream = tr.make_stream(coco, info, [(i, False) for i in ids], recipe["scale"], (384, 384), 4, slots,
                            fixed_slots=True)
    images, masks, labels = [], [], []
    for x, y in stream.take(steps):
        images.append(x["images"].numpy())
        masks.append(y["gt_masks"].numpy())
        labels.append(y["gt_labels"].numpy())
    np.savez(work / "batches.npz", images=np.stack(images), masks=np.stack(masks), labels=np.stack(labels))
    return slots


def run_ours(work, steps, slots, winograd=True):
    import keras
    import tensorflow as tf

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_real as tr

    from keras_solov2.convert.mmdet_checkpoint import load_into_model, load_state_dict

    d = np.load(work / "batches.npz")
    model = tr.build_model(dict(tr.RECIPES["dsb2018"]), max_pos_pairs=slots * 5 * 9, winograd=winograd)
    model(d["images"][0])
    load_into_model(model, load_state_dict(work / "init.pth"))
    model.compile(keras.optimizers.SGD(0.0025, momentum=0.9), weight_decay=1e-4, grad_clip_norm=35.0)
    model.optimizer.build(model.trainable_variables)
    step = tf.function(model.train_step, autograph=False)
    n = d["images"].shape[1]
    grads = step0_gradient_diffs(model, d, work)
    log = []
    for s in range(steps):
        for m in model.metrics:
            m.reset_state()
        x = {"images": tf.constant(d["images"][s]), "image_shape": tf.constant([[384, 384]] * n, tf.int32),
             "original_shape": tf.constant([[256, 256]] * n, tf.int32),
             "image_id": tf.constant(np.arange(n), tf.int64)}
        y = {"gt_masks": tf.constant(d["masks"][s]), "gt_labels": tf.constant(d["labels"][s])}
        t = time.perf_counter()
        out = step((x, y))
        log.append({k: float(out[k]) for k in ("loss", "loss_cls", "loss_mask")})
        log[-1]["seconds"] = time.perf_counter() - t
        print(s, log[-1], flush=True)
    return log, grads


def step0_gradient_diffs(model, d, work):
    """Per-tensor `|g_ours - g_mmdet| / |g_mmdet|` of the step-0 loss gradient, worst first."""
    import tensorflow as tf

    from keras_solov2.convert.mmdet_checkpoint import weight_map

    keys = {id(v): (k, kind) for k, v, kind in weight_map(model) if v is not None}
    y = {"gt_masks": tf.constant(d["masks"][0]), "gt_labels": tf.constant(d["labels"][0])}
    with tf.GradientTape() as tape:
        loss = model.compute_solov2_loss(model(tf.constant(d["images"][0]), training=True), y["gt_masks"],
                                         y["gt_labels"])["loss"]
    ref = np.load(work / "mmdet_grads_step0.npz")
    rows = []
    for v, g in zip(model.trainable_variables, tape.gradient(loss, model.trainable_variables)):
        key, kind = keys[id(v)]
        g = np.asarray(tf.convert_to_tensor(g)) if g is not None else np.zeros(v.shape, "float32")
        if kind == "conv":
            g = g.transpose(3, 2, 0, 1)  # (kh, kw, I, O) -> torch (O, I, kh, kw)
        r = ref[key]
        rows.append({"tensor": key, "rel_diff": float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)),
                     "mmdet_norm": float(np.linalg.norm(r))})
    return sorted(rows, key=lambda r: -r["rel_diff"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer-python", default=os.environ.get("SOLOV2_PEER_PYTHON"), required=False)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--work", default="/tmp/train_parity")
    ap.add_argument("--no-winograd", action="store_true",
                    help="direct 3x3 convs instead of float32 Winograd (SOLOv2(winograd=False))")
    a = ap.parse_args()
    if not a.peer_python:
        sys.exit("--peer-python (or SOLOV2_PEER_PYTHON): the python of an mmdet 3.3 venv, see ../shared/peer")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    slots = dump_batches(work, a.steps)
    subprocess.run([a.peer_python, "-c", f"CFG = {MMDET_CFG!r}\n" + MMDET_SCRIPT, str(PEER_ENV), str(work),
                    str(a.steps)], check=True, stdout=subprocess.DEVNULL)
    mmdet = json.loads((work / "mmdet_log.json").read_text())
    ours, grads = run_ours(work, a.steps, slots, winograd=not a.no_winograd)
    grad_rel = np.array([g["rel_diff"] for g in grads])
    print(f"\nstep-0 gradients, {len(grads)} tensors: relative difference median {np.median(grad_rel):.2e}, "
          f"max {grad_rel.max():.2e} ({grads[0]['tensor']})")
    rows = []
    print(f"\n{'step':>4}  {'mmdet loss':>10} {'ours':>8} {'rel':>7}   {'mmdet cls':>9} {'ours':>7}   "
          f"{'mmdet mask':>10} {'ours':>7}   mmdet grad norm")
    for s, (m, o) in enumerate(zip(mmdet, ours)):
        rel = (o["loss"] - m["loss"]) / m["loss"]
        rows.append(dict(step=s, mmdet=m, ours=o, rel_loss_diff=rel))
        print(f"{s:>4}  {m['loss']:>10.4f} {o['loss']:>8.4f} {rel:>+7.2%}   {m['loss_cls']:>9.4f} "
              f"{o['loss_cls']:>7.4f}   {m['loss_mask']:>10.4f} {o['loss_mask']:>7.4f}   {m['grad_norm']:.1f}"
              f"{' (clipped)' if m['grad_norm'] > 35 else ''}")
    rels = np.array([r["rel_loss_diff"] for r in rows])
    summary = {"steps": a.steps, "winograd": not a.no_winograd, "step0_rel_diff": float(rels[0]),
               "step0_grad_rel_diff_median": float(np.median(grad_rel)),
               "step0_grad_rel_diff_max": float(grad_rel.max()),
               "max_abs_rel_diff_first_5": float(np.abs(rels[:5]).max()),
               "mean_rel_diff": float(rels.mean()), "max_abs_rel_diff": float(np.abs(rels).max()),
               "mmdet_mean_loss_last_5": float(np.mean([m["loss"] for m in mmdet[-5:]])),
               "ours_mean_loss_last_5": float(np.mean([o["loss"] for o in ours[-5:]]))}
    print("\n" + "  ".join(f"{k} {v:.4g}" for k, v in summary.items()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"train_parity{'_direct' if a.no_winograd else ''}.json").write_text(
        json.dumps({"summary": summary, "step0_gradients": grads, "steps": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
