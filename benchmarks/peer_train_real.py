"""mmdetection 3.3 on `train_real.py`'s split: the reference number measured on the same images.

`train_real.py` compares its mask AP with the figure the issue quotes for
mmdetection (DSB2018: 0.099 / AP50 0.303 after ≈60 min), which was measured
on a held-out split we do not have. This script trains mmdetection itself,
in the peer venv (`../shared/peer/setup_venv.sh`), with the same recipe
(`train_real.RECIPES`, `OPTIMIZER`, `TEST_CFG`) on exactly the train / val
split `train_real.py` makes for the same `--seed` and `--val-fraction`, and
evaluates it with mmdet's own `CocoMetric` (pycocotools, segm) on the same
validation images, so the two numbers differ only by the implementation and
the run's randomness.

The mmdet config is mmdet's `solov2-light_r18_fpn_ms-3x_coco.py` with the
recipe's changes: one class; backbone random init (mmdet's from-scratch
init), `frozen_stages=-1`, `norm_eval=False`; keep-ratio resize to the
recipe's scale for training and test, flip 0.5 (padding /32 in the data
preprocessor); batch size, SGD, clip, `LinearLR` warm-up and `MultiStepLR`
as in `train_real.py`; mmdet's `AspectRatioBatchSampler`; `num_workers=0`
(2 cores: torch's two threads do the work); mmengine's seed is `--train-seed`
(default `--seed`, which makes the split).

Usage:
    python benchmarks/peer_train_real.py dsb2018|pennfudan --peer-python /work/peer/venv/bin/python
                                         [--output DIR] [--seed 0] [--train-seed N] [--val-fraction 0.2]
                                         [--max-images N]

Writes the split's COCO JSONs, the config and mmdet's work dir to `--output`
(default `/tmp/peer_train_real_<name>`), prints a table and writes
`benchmarks/results/peer_train_real_<name>.json`.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_real  # noqa: E402

PEER = train_real.ROOT.parent / "shared" / "peer"

CONFIG = """\
_base_ = 'mmdet::solov2/solov2-light_r18_fpn_ms-3x_coco.py'

data_root = {data_root!r}
metainfo = dict(classes=({category!r},))
model = dict(
    backbone=dict(frozen_stages=-1, norm_eval=False, init_cfg=None),
    mask_head=dict(num_classes=1, test_cfg=dict({test_cfg})))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale={scale!r}, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale={scale!r}, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size={batch_size}, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file={train_json!r},
                 data_prefix=dict(img={image_root!r}), filter_cfg=dict(filter_empty_gt=True),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file={val_json!r},
                 data_prefix=dict(img={image_root!r}), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='CocoMetric', ann_file={val_json_abs!r}, metric='segm', format_only=False)
test_evaluator = val_evaluator
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr={base_lr}, momentum=0.9, weight_decay=0.0001),
    clip_grad=dict(max_norm=35, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor={warmup_ratio}, by_epoch=False, begin=0, end={warmup_steps}),
    dict(type='MultiStepLR', begin=0, end={epochs}, by_epoch=True, milestones={milestones!r}, gamma=0.1),
]
# val_interval past the end: no validation between epochs (mmengine still
# validates after the last one; the driver subtracts that from the training
# time). _delete_: the 3x base sets by_epoch beside its parent's loop type,
# which the runner refuses.
train_cfg = dict(_delete_=True, type='EpochBasedTrainLoop', max_epochs={epochs}, val_interval={epochs_plus_one})
auto_scale_lr = dict(enable=False)
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval={epochs}), logger=dict(interval=25))
randomness = dict(seed={seed})
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
"""

# Runs in the peer venv: trains, then evaluates, and prints one JSON line.
DRIVER = """\
import importlib.machinery, json, sys, time
sys.path.insert(0, {peer!r})
import peer_env
# mmengine's runner asks pkgutil whether compiled mmcv ops exist; the stand-in
# needs a spec without a loader to answer "no".
sys.modules['mmcv._ext'].__spec__ = importlib.machinery.ModuleSpec('mmcv._ext', None)
import torch
from mmengine.config import Config
from mmengine.runner import Runner

cfg = Config.fromfile({config!r})
cfg.work_dir = {work_dir!r}
runner = Runner.from_cfg(cfg)
t = time.perf_counter()
runner.train()
train_s = time.perf_counter() - t
t = time.perf_counter()
metrics = runner.val()
print('PEER_RESULT ' + json.dumps(dict(train_seconds=train_s, eval_seconds=time.perf_counter() - t,
      threads=torch.get_num_threads(), versions=peer_env.versions(),
      metrics={{k: float(v) for k, v in metrics.items()}})), flush=True)
"""


def subset(coco_json, ids):
    """The COCO dict restricted to `ids` (images and their annotations)."""
    keep = set(ids)
    return dict(coco_json, images=[im for im in coco_json["images"] if im["id"] in keep],
                annotations=[a for a in coco_json["annotations"] if a["image_id"] in keep])


def epoch_losses(work_dir):
    """Mean logged `loss`/`loss_cls`/`loss_mask` per epoch (0-based, as train_real's) from mmengine's scalars.json."""
    files = sorted(Path(work_dir).glob("*/vis_data/scalars.json"))
    if not files:
        return []
    by_epoch = {}
    for line in files[-1].read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            by_epoch.setdefault(r["epoch"] - 1, []).append(r)
    return [{"epoch": e, **{k: round(sum(r[k] for r in rs) / len(rs), 5) for k in ("loss", "loss_cls", "loss_mask")},
             "lr": rs[-1]["lr"]} for e, rs in sorted(by_epoch.items())]


def run(name, peer_python, output=None, seed=0, val_fraction=0.2, max_images=None, train_seed=None):
    from keras_solov2.data.coco_folder import split_ids

    recipe = train_real.RECIPES[name]
    smoke = max_images is not None
    train_seed, tag = train_real.train_seed_and_tag(seed, train_seed)
    tag += "_smoke" if smoke else ""
    out = Path(output or f"/tmp/peer_train_real_{name}{tag}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    ann, image_root, _ = train_real.import_dataset(name, out)
    coco_json = json.loads(Path(ann).read_text())
    ids = sorted(im["id"] for im in coco_json["images"])
    ids = ids[:max_images] if smoke else ids
    # The same function and arguments as train_real.run: the same split.
    train_ids, val_ids = split_ids(ids, val_fraction, seed)
    for split, split_ids_ in (("train", train_ids), ("val", val_ids)):
        (out / f"{split}.json").write_text(json.dumps(subset(coco_json, split_ids_)))
    (out / "split.json").write_text(json.dumps({"train": train_ids, "val": val_ids}))

    test_cfg = ", ".join(f"{k}={v!r}" for k, v in train_real.TEST_CFG.items())
    config = out / "config.py"
    config.write_text(CONFIG.format(
        data_root=str(out) + "/", category=recipe["category"], test_cfg=test_cfg, scale=tuple(recipe["scale"]),
        batch_size=recipe["batch_size"], train_json="train.json", val_json="val.json",
        val_json_abs=str(out / "val.json"), image_root=str(Path(image_root).resolve()) + "/",
        base_lr=recipe["base_lr"], warmup_ratio=recipe["warmup_ratio"], warmup_steps=recipe["warmup_steps"],
        epochs=recipe["epochs"], epochs_plus_one=recipe["epochs"] + 1, milestones=list(recipe["milestones"]),
        seed=train_seed))
    driver = DRIVER.format(peer=str(PEER), config=str(config), work_dir=str(out / "work"))
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    print(f"{name}: {len(train_ids)} train / {len(val_ids)} val images; mmdet run in {out / 'work'} "
          f"(log there)", flush=True)
    t = time.perf_counter()
    proc = subprocess.Popen([peer_python, "-c", driver], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=out)
    peer = None
    with open(out / "peer.log", "w") as log:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if line.startswith("PEER_RESULT "):
                peer = json.loads(line[len("PEER_RESULT "):])
            elif ("Epoch(train)" in line and "loss" in line) or "segm_mAP_copypaste" in line:
                print(line.rstrip()[-160:], flush=True)
    if proc.wait() != 0 or peer is None:
        raise SystemExit(f"the mmdet run failed (exit {proc.returncode}); see {out / 'peer.log'}")
    wall = time.perf_counter() - t

    m = peer["metrics"]
    result = {
        "dataset": name,
        "smoke": smoke,
        "implementation": "mmdetection 3.3 (peer venv), solov2-light R18, random init, frozen_stages=-1, "
                          "norm_eval=False",
        "recipe": {k: (list(v) if isinstance(v, tuple) else v) for k, v in recipe.items()
                   if k in ("scale", "batch_size", "base_lr", "warmup_steps", "warmup_ratio", "epochs", "milestones")},
        "test_cfg": train_real.TEST_CFG,
        "train_seed": train_seed,
        "split": {"seed": seed, "val_fraction": val_fraction, "train_images": len(train_ids),
                  "val_images": len(val_ids), "same_as": "benchmarks/train_real.py with the same seed / val fraction"},
        # runner.train() ends with one validation pass as long as the driver's.
        "train_seconds": round(peer["train_seconds"] - peer["eval_seconds"], 1),
        "eval_seconds": round(peer["eval_seconds"], 1),
        "wall_seconds": round(wall, 1),
        "threads": peer["threads"],
        "versions": peer["versions"],
        "epochs": epoch_losses(out / "work"),
        "mask": {"AP": round(m["coco/segm_mAP"], 4), "AP50": round(m["coco/segm_mAP_50"], 4),
                 "AP75": round(m["coco/segm_mAP_75"], 4), "APs": round(m["coco/segm_mAP_s"], 4),
                 "APm": round(m["coco/segm_mAP_m"], 4), "APl": round(m["coco/segm_mAP_l"], 4)},
    }
    train_real.RESULTS.mkdir(parents=True, exist_ok=True)
    path = train_real.RESULTS / f"peer_train_real_{name}{tag}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nmmdetection 3.3 on train_real's {name} split (seed {seed}, train seed {train_seed}): "
          f"{len(train_ids)} / {len(val_ids)} images")
    print(f"  train time  {result['train_seconds'] / 60:.1f} min ({peer['threads']} threads)")
    for k in ("AP", "AP50", "AP75"):
        print(f"  mask {k:<5}  {result['mask'][k]:.3f}")
    print(f"wrote {path}")
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=sorted(train_real.RECIPES))
    ap.add_argument("--peer-python", default=os.environ.get("SOLOV2_PEER_PYTHON"),
                    help="python of the mmdet venv (or $SOLOV2_PEER_PYTHON)")
    ap.add_argument("--output", help="run folder; default /tmp/peer_train_real_<name>")
    ap.add_argument("--seed", type=int, default=0, help="the split's seed (and mmengine's, by default)")
    ap.add_argument("--train-seed", type=int, help="mmengine's seed: init, sampler order, flips (default: --seed)")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--max-images", type=int, help="first N images only (smoke run)")
    args = ap.parse_args()
    if not args.peer_python:
        ap.error("--peer-python (or SOLOV2_PEER_PYTHON) is required: see ../shared/peer/README.md")
    run(args.dataset, args.peer_python, args.output, args.seed, args.val_fraction, args.max_images,
        args.train_seed)


if __name__ == "__main__":
    sys.exit(main())
