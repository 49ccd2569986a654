"""Diagnosis for `train_real.py dsb2018`: mask AP before/after re-estimating BatchNorm statistics.

Loads a finished run's weights (`RUN/final.weights.h5`, `RUN/split.json`,
`RUN/dsb2018.json`), then:

* compares the loss in training mode (batch statistics) and in test mode
  (running averages) on a few training batches: a large gap means the
  running averages do not describe the batches the weights were trained on;
* re-estimates the running averages from `--batches` batches of 4 random
  training images (mixed image types, padded to 384×544) by forward passes
  in training mode (BatchNorm momentum 0.9), and reports the validation mask
  AP before and after, as `train_real.py` evaluates it.

Nothing is trained: the weights other than the BatchNorm running averages
are unchanged. Prints the numbers; writes nothing.

Usage:
    python benchmarks/bn_recalibration.py /tmp/train_real_dsb2018 [--batches 40]
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_real as tr  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from keras_solov2.evaluation import evaluate_coco

    recipe = dict(tr.RECIPES["dsb2018"])
    ann = a.run / "dsb2018.json"
    info, coco, bucket_of = tr.open_dataset(ann, str(tr.DATA / "dsb2018" / "stage1_train"), recipe)
    split = json.loads((a.run / "split.json").read_text())
    model = tr.build_model(recipe, 1024)
    model(np.zeros((1, 384, 384, 3), "float32"))
    model.load_weights(a.run / "final.weights.h5")

    def val_ap():
        batches = tr.val_batches(coco, info, split["val"], bucket_of, recipe)
        return {k: round(v, 4) for k, v in evaluate_coco(model, batches, str(ann), info.label_to_category_id).items()}

    rng = np.random.default_rng(a.seed)
    ids = [int(i) for i in rng.permutation(split["train"])]
    probe = tr.make_stream(coco, info, [(i, False) for i in ids[:12]], recipe["scale"], (384, 544), 4,
                           recipe["max_instances"])
    for x, y in probe:
        out = {mode: model.compute_solov2_loss(model(x["images"], training=mode == "train"), y["gt_masks"],
                                               y["gt_labels"])["loss"] for mode in ("train", "test")}
        print(f"training batch: loss with batch statistics {float(out['train']):.3f}, "
              f"with running averages {float(out['test']):.3f}", flush=True)
    before = val_ap()
    print("val mask AP, running averages from training:", before, flush=True)
    stream = tr.make_stream(coco, info, [(i, False) for i in ids[: 4 * a.batches]], recipe["scale"], (384, 544), 4,
                            1, with_targets=False)
    for x, _ in stream:
        model(x["images"], training=True)  # updates only the BatchNorm running averages
    after = val_ap()
    print(f"val mask AP, running averages re-estimated on {a.batches} mixed batches:", after, flush=True)


if __name__ == "__main__":
    main()
