"""CPU benchmark of keras-solov2 (and, optionally, mmdetection 3.3 in the same run).

Prints a table and writes JSON. Measures, as `../shared/peer/bench_solov2.py`
does for mmdet (same sizes, same thread count, medians after warm-up):

* predict, batch 1: R50 standard at 512×512 and 800×1333 (padded 800×1344),
  light R18 at 448×768; split into backbone+neck, head (instance head +
  mask-feature branch), post-processing with random weights and with K
  forced candidates (K (cell, class) logits set to +2, the rest -6, kernels
  0.2·N(0,1), so K candidates reach Matrix NMS), and the full `predict_step`;
* one train step, R50 batch 2 at 512×512 with 2–4 instances per image
  (median step time and the process's peak RSS);
* Matrix NMS alone: N = 100, 500 box masks at 200×336, gaussian and linear.

Comparison: `--peer-python /path/to/mmdet-venv/bin/python` (or the
SOLOV2_PEER_PYTHON environment variable) runs the peer script in a
subprocess after ours and prints ours/mmdet ratios. See benchmarks/README.md.

Usage: python benchmarks/bench_solov2.py [--threads 2] [--skip train] [--out FILE]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_SCRIPT = ROOT.parent / "shared" / "peer" / "bench_solov2.py"


def timeit(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return {"median": 1e3 * statistics.median(ts), "min": 1e3 * min(ts), "max": 1e3 * max(ts)}


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def forced_outputs(outputs, k, seed=1):
    import numpy as np

    rng = np.random.default_rng(seed)
    cls = [np.full(c.shape, -6.0, "float32") for c in outputs["cls_logits"]]
    sizes = [c.shape[1] * c.shape[2] for c in cls]
    num_classes = cls[0].shape[-1]
    flat = rng.permutation(sum(sizes) * num_classes)[:k]
    offsets = np.cumsum([0] + sizes)
    for f in flat:
        cell, label = divmod(int(f), num_classes)
        lvl = int(np.searchsorted(offsets, cell, side="right") - 1)
        r, c = divmod(cell - int(offsets[lvl]), cls[lvl].shape[2])
        cls[lvl][0, r, c, label] = 2.0
    kernels = [0.2 * rng.standard_normal(kk.shape).astype("float32") for kk in outputs["kernels"]]
    return {"cls_logits": cls, "kernels": kernels, "mask_features": outputs["mask_features"]}


def bench_predict(model, h, w, warmup, runs, forced_ks, jit_compile=False):
    import numpy as np
    import tensorflow as tf

    images = np.random.default_rng(0).integers(0, 256, (1, h, w, 3)).astype("float32")
    ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
    padded = np.pad(images, [(0, 0), (0, ph - h), (0, pw - w), (0, 0)])
    kw = {"jit_compile": jit_compile, "reduce_retracing": True}
    backbone = tf.function(lambda x: model.neck(model.feature_extractor(x)), **kw)
    head = tf.function(lambda p: (model.instance_head(p), model.mask_feature_head(p[:4])), **kw)
    post = tf.function(lambda o: model.decode(o))
    full = tf.function(lambda x: model.predict_step(x), **kw)
    normalised = (padded - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
    pyramid = backbone(normalised.astype("float32"))
    (cls, kernels), feats = head(pyramid)
    outputs = {"cls_logits": cls, "kernels": kernels, "mask_features": feats}
    res = {"input_hw": [h, w], "padded_hw": [ph, pw]}
    res["backbone_neck_ms"] = timeit(lambda: backbone(normalised.astype("float32")), warmup, runs)
    res["head_forward_ms"] = timeit(lambda: head(pyramid), warmup, runs)
    res["postprocess_ms_random_weights"] = timeit(lambda: post(outputs), warmup, runs)
    res["num_dets_random_weights"] = int(post(outputs)["num_detections"][0])
    res["full_predict_ms"] = timeit(lambda: full(images), warmup, runs)
    res["forced"] = {}
    for k in forced_ks:
        o = forced_outputs(outputs, k)
        res["forced"][str(k)] = {
            "postprocess_ms": timeit(lambda: post(o), warmup, runs),
            "num_dets": int(post(o)["num_detections"][0]),
        }
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def bench_train(model, warmup, runs, batch=2, h=512, w=512):
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, h, w, 3)).astype("float32")
    masks = np.zeros((batch, 4, h, w), np.uint8)
    labels = -np.ones((batch, 4), np.int32)
    yy, xx = np.mgrid[:h, :w]
    for b in range(batch):
        for i in range(int(rng.integers(2, 5))):
            cy, cx = rng.integers(64, h - 64, 2)
            ry, rx = rng.integers(16, 120, 2)
            masks[b, i] = ((yy - cy) ** 2 / ry**2 + (xx - cx) ** 2 / rx**2) <= 1
            labels[b, i] = rng.integers(0, model.num_classes)
    model.compile()
    data = (tf.constant(images), {"gt_masks": tf.constant(masks), "gt_labels": tf.constant(labels)})
    step = tf.function(model.train_step)
    return {
        "batch": batch,
        "input_hw": [h, w],
        "train_step_ms": timeit(lambda: step(data), warmup, runs),
        "peak_rss_mb": peak_rss_mb(),
    }


def bench_matrix_nms(warmup, runs, ns=(100, 500), hw=(200, 336)):
    import numpy as np
    import tensorflow as tf

    from keras_solov2.layers import MatrixNMS

    out = {}
    for n in ns:
        rng = np.random.default_rng(n)
        H, W = hw
        masks = np.zeros((n, H, W), bool)
        for i in range(n):
            y, x = rng.integers(0, H - 20), rng.integers(0, W - 20)
            masks[i, y:y + rng.integers(10, H // 2), x:x + rng.integers(10, W // 2)] = True
        labels = rng.integers(0, 80, n)
        scores = (rng.random(n) * 0.9 + 0.1).astype("float32")
        area = masks.sum((1, 2)).astype("float32")
        for kernel in ("gaussian", "linear"):
            nms = MatrixNMS(kernel=kernel, filter_thr=0.05, nms_pre=500, max_per_img=100)
            f = tf.function(lambda m, l, s, a: nms(m, l, s, mask_area=a))
            args = (tf.constant(masks), tf.constant(labels), tf.constant(scores), tf.constant(area))
            out[f"N{n}_{H}x{W}_boxmasks_{kernel}"] = {"ms": timeit(lambda: f(*args), warmup, runs)}
    return out


def run_ours(a):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(a.threads)
    tf.config.threading.set_inter_op_parallelism_threads(a.threads)
    import keras_solov2
    from keras_solov2 import SOLOv2

    skip = set(a.skip.split(",")) if a.skip else set()
    res = {"versions": {"keras_solov2": keras_solov2.__version__, "tensorflow": tf.__version__},
           "threads": a.threads, "jit_compile": a.jit_compile}
    forced = [int(k) for k in a.forced_k.split(",") if k]
    if "nms" not in skip:
        res["matrix_nms"] = bench_matrix_nms(a.warmup, a.runs)
    if "infer" not in skip:
        model = SOLOv2.from_architecture("solov2_r50")
        res["inference"] = {}
        for s in a.sizes.split(","):
            h, w = map(int, s.split("x"))
            res["inference"][s] = bench_predict(model, h, w, a.warmup, a.runs, forced, a.jit_compile)
        light = SOLOv2.from_architecture("solov2_light_r18")
        res["inference_light_r18"] = {"448x768": bench_predict(light, 448, 768, a.warmup, a.runs, [], a.jit_compile)}
    if "train" not in skip:
        model = SOLOv2.from_architecture("solov2_r50")
        res["train"] = bench_train(model, a.train_warmup, a.train_runs)
    return res


def run_peer(a):
    python = a.peer_python or os.environ.get("SOLOV2_PEER_PYTHON")
    if not python:
        return None
    out = Path(a.out).with_suffix(".mmdet.json")
    cmd = [python, str(PEER_SCRIPT), "--threads", str(a.threads), "--warmup", str(a.warmup),
           "--runs", str(a.runs), "--sizes", a.sizes, "--forced-k", a.forced_k, "--out", str(out)]
    if a.skip:
        cmd += ["--skip", a.skip]
    print("running mmdet peer:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def table(ours, peer):
    rows = []

    def add(name, value, ref=None):
        ratio = f"{value / ref:.2f}" if ref else ""
        rows.append((name, f"{value:.0f}", f"{ref:.0f}" if ref else "", ratio))

    def get(d, *keys):
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d

    for s, r in (ours.get("inference") or {}).items():
        p = get(peer, "inference", s)
        add(f"predict R50 {s} full", r["full_predict_ms"]["median"], get(p, "full_predict_ms", "median"))
        add(f"  backbone+neck", r["backbone_neck_ms"]["median"], get(p, "backbone_neck_ms", "median"))
        add(f"  head", r["head_forward_ms"]["median"], get(p, "head_forward_ms", "median"))
        for k, f in r["forced"].items():
            add(f"  post-processing, {k} forced", f["postprocess_ms"]["median"],
                get(p, "postprocess_forced_candidates", k, "postprocess_ms", "median"))
        rows.append((f"  peak RSS MB (process)", f"{r['peak_rss_mb']:.0f}", "", ""))
    for s, r in (ours.get("inference_light_r18") or {}).items():
        add(f"predict light R18 {s} full", r["full_predict_ms"]["median"])
    if "train" in ours:
        add("train step R50 b2 512²", ours["train"]["train_step_ms"]["median"],
            get(peer, "train", "train_step_ms", "median"))
        rows.append(("  peak RSS MB (process)", f"{ours['train']['peak_rss_mb']:.0f}", "", ""))
    for k, r in (ours.get("matrix_nms") or {}).items():
        add(f"Matrix NMS {k}", r["ms"]["median"], get(peer, "matrix_nms", k, "ms", "median"))
    width = max(len(r[0]) for r in rows) if rows else 10
    lines = [f"{'measurement':<{width}}  {'ours ms':>9}  {'mmdet ms':>9}  {'ratio':>6}"]
    lines += [f"{a:<{width}}  {b:>9}  {c:>9}  {d:>6}" for a, b, c, d in rows]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--train-warmup", type=int, default=1)
    ap.add_argument("--train-runs", type=int, default=3)
    ap.add_argument("--sizes", default="512x512,800x1333")
    ap.add_argument("--forced-k", default="100,500")
    ap.add_argument("--skip", default="", help="comma list of: infer,train,nms")
    ap.add_argument("--jit-compile", action="store_true", help="XLA for backbone/head/predict")
    ap.add_argument("--peer-python", default=None, help="python of an mmdet 3.3 venv (../shared/peer)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench.json"))
    a = ap.parse_args()
    ours = run_ours(a)
    peer = run_peer(a)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"ours": ours, "mmdet": peer}, indent=1))
    print(table(ours, peer))
    print("wrote", a.out)


if __name__ == "__main__":
    sys.exit(main())
