"""CPU benchmark of keras-solov2 (and, optionally, mmdetection 3.3 in the same run).

Prints a table and writes JSON. Measures, as `../shared/peer/bench_solov2.py`
does for mmdet (same sizes, same thread count, medians after warm-up):

* predict, batch 1: R50 standard at 512×512 and 800×1333 (padded 800×1344),
  light R18 at 448×768; split into backbone+neck, head (instance head +
  mask-feature branch), post-processing with random weights and with K
  forced candidates (K (cell, class) logits set to +2, the rest -6, kernels
  0.2·N(0,1), so K candidates reach Matrix NMS), and the full predict: as
  `predict_step` runs it (random weights: no level has a candidate, so every
  kernel branch is skipped), as `predict_step` runs it with 100 candidates
  spread over every level (class 0's logit bias set to 0, `max_candidates`
  100: every kernel tower runs, the final kernel conv at the 100 cells only;
  their masks are decoded and pasted at the input size; mmdet's reference
  for this row is its whole `predict` with 100 forced candidates,
  `peer_predict_candidates.py`), and with every branch computed (mmdet's way);
  mmdet's light R18 reference comes from `peer_predict_light.py` (the peer
  script builds only R50);
  the FLOPs of the backbone+neck and head graphs (TensorFlow's profiler) and
  the GFLOP/s they reach; for every `--dtypes` policy (`float32`, and
  `mixed_bfloat16`: the bfloat16 inference path);
* one train step, R50 batch 2 at 512×512 with 4 instances per image (the
  peer's shapes and sizes)
  (median step time; the peak RSS after the timed steps, and after
  `--train-memory-steps` steps in all in a plain loop on both sides (mmdet's
  from `peer_train_memory.py --steps`: the peer script keeps every step's
  loss dict, which inflates its own peak); that peak split into what the
  process held before the step, after its imports and with the model built
  (and how much of it is file-backed: shared libraries' pages), and what the
  step added; TensorFlow's tensor peak), per policy;
  with `compile(step_executor="sequential")` too (`--step-executors`: the
  step's ops one at a time); with `--with-cp` also with
  `SOLOv2(with_cp=True)` (backbone stages recomputed in the backward pass), with `--micro-batch-size N` also with
  `compile(micro_batch_size=N)` (the batch's gradient summed over
  micro-batches of N images; `none`: the whole batch in one pass, where
  compile's default `"auto"` micro-batches), and with both;
* Matrix NMS alone: N = 100, 500 box masks at 200×336, gaussian and linear;
* retracing: `model.predict` on several image sizes in one process, and the
  number of graphs it compiled.

Each section runs in its own subprocess, so every peak RSS is that section's
alone (mmdet's too: its train step and its inference run as separate
processes). Timed runs disturbed by other processes of the machine are
discarded and repeated, with the peer script's contention gate (counts in
the JSON's `contention_gate`). Comparison: `--peer-python /path/to/mmdet-venv/bin/python` (or
SOLOV2_PEER_PYTHON) runs the peer script after ours, then
`peer_predict_candidates.py` (mmdet's whole predict with 100 forced
candidates), `peer_predict_light.py` (mmdet's light R18) and
`peer_train_memory.py` in that venv, and prints ours/mmdet ratios. See
benchmarks/README.md.

Usage: python benchmarks/bench_solov2.py [--threads 2] [--inter-op-threads N] [--dtypes float32,mixed_bfloat16]
       [--skip infer,train,nms,retrace] [--jit-compile] [--with-cp] [--micro-batch-size N|none] [--no-winograd]
       [--defer-tensorflow-text] [--train-memory-steps 12] [--step-executors sequential]
       [--peer-python P]
       [--rounds N] [--out FILE]
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_SCRIPT = ROOT.parent / "shared" / "peer" / "bench_solov2.py"
PEER_CANDIDATES_SCRIPT = ROOT / "benchmarks" / "peer_predict_candidates.py"
PEER_MEMORY_SCRIPT = ROOT / "benchmarks" / "peer_train_memory.py"
PEER_LIGHT_SCRIPT = ROOT / "benchmarks" / "peer_predict_light.py"
LIGHT_SIZE = (448, 768)
# Train step: as is, with_cp, micro-batched, both (run_section parses the name).
TRAIN_SECTIONS = ("train", "train_cp", "train_mb", "train_cp_mb")


# The peer script's contention gate, so that both sides are timed alike: a
# run during which other processes of this VM used more than 5 % of the CPU
# capacity (VM-wide busy ticks in /proc/stat minus this process's own) is
# discarded and repeated, up to 6× the runs; past that the fastest disturbed
# runs fill in and the measurement is marked unclean.
FOREIGN_MAX_FRAC = 0.05
MAX_ATTEMPT_FACTOR = 6
GATE = {"accepted": 0, "discarded": 0, "unclean": 0}


def _busy_ticks():
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:  # not Linux: no gate
        return 0, 0
    return sum(v) - v[3] - v[4], sum(v)  # busy (without idle and iowait), total


def _own_ticks():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return (r.ru_utime + r.ru_stime) * os.sysconf("SC_CLK_TCK")


def _wait_quiet(max_wait=120.0, probe=0.5, threshold=0.15):
    """Waits (at most `max_wait` s) until other processes use < `threshold` of the CPUs."""
    end = time.time() + max_wait
    while time.time() < end:
        b0, t0, o0 = *_busy_ticks(), _own_ticks()
        time.sleep(probe)
        b1, t1, o1 = *_busy_ticks(), _own_ticks()
        if t1 <= t0 or ((b1 - b0) - (o1 - o0)) / (t1 - t0) < threshold:
            return


def timeit(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    ts, disturbed = [], []
    for _ in range(runs * MAX_ATTEMPT_FACTOR):
        if len(ts) == runs:
            break
        _wait_quiet()
        b0, t0, o0 = *_busy_ticks(), _own_ticks()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        b1, t1, o1 = *_busy_ticks(), _own_ticks()
        foreign = max(0.0, (b1 - b0) - (o1 - o0))
        if foreign <= max(2.0, FOREIGN_MAX_FRAC * max(1.0, t1 - t0)):
            ts.append(elapsed)
            GATE["accepted"] += 1
        else:
            disturbed.append(elapsed)
            GATE["discarded"] += 1
    if len(ts) < runs:
        GATE["unclean"] += 1
        ts += sorted(disturbed)[: runs - len(ts)]
    return {"median": 1e3 * statistics.median(ts), "min": 1e3 * min(ts), "max": 1e3 * max(ts), "n": runs}


def timeit_graph(fn, warmup, runs, jit_compile):
    """`timeit`; under XLA, a function that does not compile gives `{"error": ...}`
    (a result, not a crash)."""
    if not jit_compile:
        return timeit(fn, warmup, runs)
    try:
        return timeit(fn, warmup, runs)
    except Exception as e:  # noqa: BLE001 - any compile failure is the measurement
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        return {"error": f"{type(e).__name__}: {first[:200]}"}


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mb(field="VmRSS"):
    """This process's resident set now, in MB; None without /proc.

    `field`: a `/proc/self/status` line, e.g. `"RssFile"`, the part of the
    resident set that is pages of mapped files (mostly the shared libraries'
    code and read-only data: clean, reclaimable, but counted in RSS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def graph_gflop(fn, *specs):
    """FLOPs of one call of `fn` on inputs of `specs` (TensorFlow's op statistics)."""
    import tensorflow as tf

    graph = tf.function(fn).get_concrete_function(*specs).graph
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    return tf.compat.v1.profiler.profile(graph, options=opts).total_float_ops / 1e9


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
    dtype = outputs["kernels"][0].dtype
    kernels = [(0.2 * rng.standard_normal(kk.shape)).astype("float32") for kk in outputs["kernels"]]
    import tensorflow as tf

    return {"cls_logits": [tf.cast(c, dtype) for c in cls], "kernels": [tf.cast(kk, dtype) for kk in kernels],
            "mask_features": outputs["mask_features"]}


def bench_predict(model, h, w, warmup, runs, forced_ks, jit_compile=False):
    import numpy as np
    import tensorflow as tf

    images = np.random.default_rng(0).integers(0, 256, (1, h, w, 3)).astype("float32")
    ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
    padded = np.pad(images, [(0, 0), (0, ph - h), (0, pw - w), (0, 0)])
    kw = {"jit_compile": jit_compile, "reduce_retracing": True}
    dtype = model.compute_dtype

    def backbone_fn(x):
        return model.pyramid_features(x)

    def head_fn(p):
        return model.instance_head(p), model.mask_feature_head(p[:4])

    backbone = tf.function(backbone_fn, **kw)
    head = tf.function(head_fn, **kw)
    post = tf.function(lambda o: model.decode(o))
    full = tf.function(lambda x: model.predict_step(x), **kw)
    normalised = tf.cast((padded - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375]), dtype)
    pyramid = backbone(normalised)
    (cls, kernels), feats = head(pyramid)
    outputs = {"cls_logits": cls, "kernels": kernels, "mask_features": feats}
    res = {"input_hw": [h, w], "padded_hw": [ph, pw], "dtype_policy": model.dtype_policy.name}
    res["gflop_backbone_neck"] = graph_gflop(backbone_fn, tf.TensorSpec(normalised.shape, dtype))
    res["gflop_head"] = graph_gflop(head_fn, [tf.TensorSpec(p.shape, p.dtype) for p in pyramid])
    res["backbone_neck_ms"] = timeit_graph(lambda: backbone(normalised), warmup, runs, jit_compile)
    res["head_forward_ms"] = timeit_graph(lambda: head(pyramid), warmup, runs, jit_compile)
    res["postprocess_ms_random_weights"] = timeit(lambda: post(outputs), warmup, runs)
    res["num_dets_random_weights"] = int(post(outputs)["num_detections"][0])
    res["full_predict_ms"] = timeit_graph(lambda: full(images), warmup, runs, jit_compile)
    # The same with every kernel branch computed (random weights leave every
    # level without a candidate, so `predict` skips all of them): the cost
    # for images with candidates on every level, and mmdet's way.
    dense = tf.function(lambda x: model.decode(model(x, training=False)), **kw)
    res["full_predict_all_branches_ms"] = timeit_graph(lambda: dense(padded), warmup, runs, jit_compile)
    # `predict` on an image with candidates on every level: class 0's logit
    # bias set to 0 (score ≈ 0.5 at every cell), the top 100 of them get
    # masks (`max_candidates`). Every kernel tower runs; the final kernel
    # conv only at those 100 cells; decoding them and pasting their masks at
    # the input size are included, as in this row's mmdet reference
    # (`peer_predict_candidates.py`: its predict with 100 forced candidates).
    bias = model.instance_head.conv_cls.bias
    saved_bias, saved_cap = bias.numpy(), model.max_candidates
    busy_bias = saved_bias.copy()
    busy_bias[0] = 0.0
    bias.assign(busy_bias)
    model.max_candidates = 100
    busy = tf.function(lambda x: model.predict_step(x), **kw)
    res["full_predict_candidates_ms"] = timeit_graph(lambda: busy(images), warmup, runs, jit_compile)
    if "error" not in res["full_predict_candidates_ms"]:  # (XLA cannot compile predict)
        res["num_dets_candidates"] = int(busy(images)["num_detections"][0])
    bias.assign(saved_bias)
    model.max_candidates = saved_cap
    for stage in ("backbone_neck", "head"):
        ms = res[f"{stage.replace('head', 'head_forward')}_ms"]
        res[f"gflops_per_s_{stage}"] = res[f"gflop_{stage}"] / (ms["median"] / 1e3) if "median" in ms else 0.0
    res["forced"] = {}
    for k in forced_ks:
        o = forced_outputs(outputs, k)
        res["forced"][str(k)] = {
            "postprocess_ms": timeit(lambda: post(o), warmup, runs),
            "num_dets": int(post(o)["num_detections"][0]),
        }
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def synthetic_instances(h, w, n, rng):
    """`n` ellipses / rectangles (alternating) of side 0.08–0.6 × min(h, w), as
    the peer script's `synthetic_gts`: `(n, h, w)` uint8 masks."""
    import numpy as np

    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((n, h, w), np.uint8)
    for i in range(n):
        side = rng.uniform(0.08, 0.6) * min(h, w)
        bh, bw = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
        cy, cx = rng.uniform(bh / 2, h - bh / 2), rng.uniform(bw / 2, w - bw / 2)
        if i % 2 == 0:
            masks[i] = ((yy - cy) / (bh / 2)) ** 2 + ((xx - cx) / (bw / 2)) ** 2 <= 1
        else:
            masks[i] = (np.abs(yy - cy) <= bh / 2) & (np.abs(xx - cx) <= bw / 2)
    return masks


def bench_train(model, warmup, runs, batch=2, h=512, w=512, instances=4, jit_compile=False, memory_steps=0,
                micro_batch_size="auto", step_executor="parallel"):
    """One train step's time, and the process's peak RSS after the timed steps
    and (`memory_steps` > 0) after that many steps in all, the rest run back to
    back: TensorFlow's allocator touches more of its pool over the first ~10
    steps, so the peak after 4 steps understates a training's.

    The step is Keras's train function, as `fit` calls it (on an iterator
    of one repeated batch), so `compile`'s `step_executor` applies."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, h, w, 3)).astype("float32")
    masks = np.stack([synthetic_instances(h, w, instances, rng) for _ in range(batch)])
    labels = rng.integers(0, model.num_classes, (batch, instances)).astype("int32")
    # jit_compile on the model too: the step leaves out its non-finite-loss
    # report (string formatting), which XLA cannot compile.
    model.compile(jit_compile=jit_compile, micro_batch_size=micro_batch_size, step_executor=step_executor)
    data = (tf.constant(images), {"gt_masks": tf.constant(masks), "gt_labels": tf.constant(labels)})
    iterator = iter(tf.data.Dataset.from_tensors(data).repeat())
    function = model.make_train_function()
    calls = [0]

    def step():
        calls[0] += 1
        return function(iterator)

    result = {
        "batch": batch,
        "input_hw": [h, w],
        "gt_instances_per_img": [instances] * batch,
        "dtype_policy": model.dtype_policy.name,
        "micro_batch_size": micro_batch_size,
        "step_executor": step_executor,
        "runs_sequentially": getattr(function, "runs_sequentially", False),
        "train_step_ms": timeit_graph(step, warmup, runs, jit_compile),
        "peak_rss_mb": peak_rss_mb(),
        "tensor_peak_mb": tensor_peak_mb(),
    }
    if memory_steps and "error" not in result["train_step_ms"]:
        while calls[0] < memory_steps:
            step()
        result["plain_loop"] = {"steps": calls[0], "peak_rss_mb": peak_rss_mb()}
    return result


def tensor_peak_mb():
    """TensorFlow's own count of the largest total of live tensors on the CPU
    (its allocator's statistics; None where it keeps none, e.g. with
    `TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1`). The RSS is above it by the process's
    other memory and what the allocator's pool has touched beyond it."""
    import tensorflow as tf

    try:
        peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    except (ValueError, RuntimeError):
        return None
    return peak / 2**20 if peak else None


def bench_matrix_nms(warmup, runs, ns=(100, 500), hw=(200, 336)):
    import numpy as np
    import tensorflow as tf

    from keras_solov2.layers import MatrixNMS
    from keras_solov2.layers.matrix_nms import bfloat16_matmul_is_fast, packed_pairs_available

    out = {"bfloat16_iou_matmul": bfloat16_matmul_is_fast(), "bit_packed_pairs": packed_pairs_available()}
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


def bench_retrace(model, sizes=((480, 640), (512, 512), (427, 640), (800, 1333), (640, 480))):
    """`model.predict` on images of several sizes: graphs compiled and time per call."""
    import numpy as np

    rows = []
    for h, w in sizes:
        x = np.zeros((1, h, w, 3), "float32")
        t = time.perf_counter()
        model.predict(x, verbose=0)
        first = time.perf_counter() - t
        t = time.perf_counter()
        model.predict(x, verbose=0)
        rows.append({"hw": [h, w], "first_call_ms": 1e3 * first, "second_call_ms": 1e3 * (time.perf_counter() - t)})
    graphs = len(model.predict_function._list_all_concrete_functions())
    return {"calls": rows, "graphs_compiled": graphs}


def run_section(a, section, dtype):
    """One measurement in this process (called in a subprocess by `run_ours`)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(a.threads)
    tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads(a))
    import keras_solov2

    if a.defer_tensorflow_text:
        keras_solov2.defer_tensorflow_text()
    from keras_solov2 import SOLOv2

    forced = [int(k) for k in a.forced_k.split(",") if k]

    def build(architecture, **kwargs):
        return SOLOv2.from_architecture(architecture, dtype=dtype, winograd=not a.no_winograd, **kwargs)

    if section == "nms":
        return bench_matrix_nms(a.warmup, a.runs)
    if section.startswith("infer:"):
        h, w = map(int, section.split(":")[1].split("x"))
        model = build("solov2_r50")
        return bench_predict(model, h, w, a.warmup, a.runs, forced, a.jit_compile)
    if section == "infer_light":
        model = build("solov2_light_r18")
        return bench_predict(model, *LIGHT_SIZE, a.warmup, a.runs, [], a.jit_compile)
    section, _, step_executor = section.partition("@")
    if section in TRAIN_SECTIONS:
        # What the process holds before the step (TensorFlow, keras-hub, the
        # model), to split the peak as `peer_train_memory.py` does for mmdet.
        after_imports = resident_mb()
        model = build(a.train_architecture, with_cp="_cp" in section)
        before = {"after_imports": after_imports, "model_built": resident_mb(),
                  "model_built_file_backed": resident_mb("RssFile")}
        h, w = map(int, a.train_size.split("x"))
        result = bench_train(model, a.train_warmup, a.train_runs, h=h, w=w, jit_compile=a.jit_compile,
                             memory_steps=a.train_memory_steps,
                             micro_batch_size=_micro_batch_size(a.micro_batch_size) if "_mb" in section else "auto",
                             step_executor=step_executor or "parallel")
        return {**result, "architecture": a.train_architecture, "rss_before_step_mb": before}
    if section == "retrace":
        return bench_retrace(build("solov2_r50"))
    raise ValueError(section)


def _micro_batch_size(text):
    """`--micro-batch-size`'s value for `compile`: an int, or `None` for `none`."""
    return None if text.lower() == "none" else int(text)


def _subprocess(cmd, stdout=None):
    """Runs `cmd`; returns the child's peak RSS in MB (its own, via wait4)."""
    proc = subprocess.Popen(cmd, stdout=stdout)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return usage.ru_maxrss / 1024


def run_ours(a):
    import keras_solov2

    skip = set(a.skip.split(",")) if a.skip else set()
    sections = [] if "nms" in skip else [("nms", "float32")]
    for dtype in a.dtypes.split(","):
        if "infer" not in skip:
            sections += [(f"infer:{s}", dtype) for s in a.sizes.split(",")] + [("infer_light", dtype)]
        if "train" not in skip:
            train = ["train"] + ["train_cp"] * a.with_cp
            if a.micro_batch_size:
                train += ["train_mb"] + ["train_cp_mb"] * a.with_cp
            # The default step (compile's step_executor="parallel"), then
            # with each other executor asked for.
            for executor in ["parallel"] + [e for e in a.step_executors.split(",") if e and e != "parallel"]:
                suffix = "" if executor == "parallel" else f"@{executor}"
                sections += [(name + suffix, dtype) for name in train]
        if "retrace" not in skip:
            sections.append(("retrace", dtype))
    import tensorflow as tf

    res = {"versions": {"keras_solov2": keras_solov2.__version__, "tensorflow": tf.__version__,
                        "keras": __import__("keras").__version__, "python": platform.python_version()},
           "machine": _machine(), "threads": a.threads, "inter_op_threads": inter_op_threads(a),
           "jit_compile": a.jit_compile,
           "winograd": not a.no_winograd, "defer_tensorflow_text": a.defer_tensorflow_text, "sections": {}}
    for section, dtype in sections:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [sys.executable, __file__, "--section", section, "--section-dtype", dtype, "--section-out", out,
               "--threads", str(a.threads), "--inter-op-threads", str(inter_op_threads(a)),
               "--warmup", str(a.warmup), "--runs", str(a.runs), "--train-warmup", str(a.train_warmup),
               "--train-runs", str(a.train_runs), "--train-memory-steps", str(a.train_memory_steps),
               "--forced-k", a.forced_k, "--train-architecture", a.train_architecture, "--train-size", a.train_size]
        if a.jit_compile:
            cmd.append("--jit-compile")
        if a.defer_tensorflow_text:
            cmd.append("--defer-tensorflow-text")
        if a.no_winograd:
            cmd.append("--no-winograd")
        if a.micro_batch_size:
            cmd += ["--micro-batch-size", str(a.micro_batch_size)]
        print(f"ours: {section} {dtype}", flush=True)
        rss = _subprocess(cmd)
        payload = json.loads(Path(out).read_text())
        os.remove(out)
        r = payload["result"]
        r["process_peak_rss_mb"] = rss
        res["sections"][f"{section}|{dtype}"] = r
        res.setdefault("contention_gate", {})[f"{section}|{dtype}"] = gate = payload["contention_gate"]
        if gate["discarded"]:
            print(f"  {gate['discarded']} disturbed runs discarded ({gate['unclean']} unclean)", flush=True)
    return res


def _machine():
    # A virtual machine's model name can be just "AMD EPYC": the family and
    # model numbers tell the generation (AMD family 25: Zen 3/4, 26: Zen 5).
    info = {"model name": "?", "cpu family": "?", "model": "?"}
    flags = []
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key = key.strip()
            if key in info and info[key] == "?":
                info[key] = value.strip()
            if key == "flags":
                flags = value.split()
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return {"cpu": info["model name"], "cpu_family": info["cpu family"], "cpu_model": info["model"],
            "cores": os.cpu_count(), "isa": isa}


def inter_op_threads(a):
    return a.threads if a.inter_op_threads is None else a.inter_op_threads


def peer_python(a):
    """The mmdet venv's python (`--peer-python` or SOLOV2_PEER_PYTHON), or None.

    Checked before anything is measured: a wrong path should fail in a second,
    not after our half hour of measurements."""
    python = a.peer_python or os.environ.get("SOLOV2_PEER_PYTHON")
    if not python:
        return None
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise SystemExit(
            f"--peer-python / SOLOV2_PEER_PYTHON: {python!r} is not an executable file. "
            "`bash ../shared/peer/setup_venv.sh DIR` builds the mmdet venv; pass DIR/venv/bin/python."
        )
    if not PEER_SCRIPT.is_file():
        raise SystemExit(f"mmdet's benchmark script {PEER_SCRIPT} is missing (it comes with ../shared/peer/).")
    return python


def run_peer(a, python):
    """mmdet's script, inference+NMS and the train step in separate processes,
    then our peer-venv scripts (candidates, light R18, train memory)."""
    if not python:
        return None
    skip = set(a.skip.split(",")) if a.skip else set()
    merged = {}
    timing = ["--warmup", str(a.warmup), "--runs", str(a.runs)]

    def run(script, name, *args):
        """`script` in the peer venv → (its JSON result, its process's peak RSS in MB)."""
        out = Path(a.out).with_suffix(f".mmdet_{name}.json")
        cmd = [python, str(script), "--threads", str(a.threads), *args, "--out", str(out)]
        print("mmdet:", " ".join(cmd), flush=True)
        rss = _subprocess(cmd, stdout=subprocess.DEVNULL)
        result = json.loads(out.read_text())
        out.unlink()
        return result, rss

    parts = [("infer_nms", "train"), ("train", "infer,nms")]
    for name, peer_skip in parts:
        wanted = {"infer_nms": {"infer", "nms"}, "train": {"train"}}[name]
        if wanted <= skip:
            continue
        r, rss = run(PEER_SCRIPT, name, *timing, "--train-warmup", str(a.train_warmup),
                     "--train-runs", str(a.train_runs), "--sizes", a.sizes, "--forced-k", a.forced_k,
                     "--skip", ",".join(sorted(set(peer_skip.split(",")) | (skip & {"infer", "train", "nms"}))))
        for k, v in r.items():
            merged.setdefault(k, v)
        merged[f"process_peak_rss_mb_{name}"] = rss
    if "infer" not in skip:
        # mmdet's whole predict with 100 forced candidates: the reference of
        # our "100 candidates" row (the peer script times it without any).
        r, _ = run(PEER_CANDIDATES_SCRIPT, "candidates", *timing, "--sizes", a.sizes, "--forced-k", "100")
        for size, v in r["inference"].items():
            merged.setdefault("inference", {}).setdefault(size, {}).update(v)
        merged["contention_gate_candidates"] = r["contention_gate"]
        # mmdet's light R18 (the peer script builds only R50).
        r, _ = run(PEER_LIGHT_SCRIPT, "light", *timing, "--sizes", "x".join(map(str, LIGHT_SIZE)))
        merged["inference_light"] = r["inference"]
        merged["contention_gate_light"] = r["contention_gate"]
    if "train" not in skip:
        # What mmdet's process holds before its step (the peer script reports
        # only the peak): the "before the step" and "the step adds" rows.
        memory, _ = run(PEER_MEMORY_SCRIPT, "memory", "--steps", str(a.train_memory_steps))
        merged["train_rss_before_step_mb"] = memory["rss_before_step_mb"]
        if "plain_loop" in memory:
            merged["train_plain_loop"] = memory["plain_loop"]
    return merged


def table_rows(ours, peer):
    """`(measurement, ours, mmdet, ratio)` strings, one tuple per row of the table."""
    rows = []

    def fmt(ms):
        if "error" in ms:
            return "does not compile"
        return f"{ms['median']:.0f} ({ms['min']:.0f}–{ms['max']:.0f})"

    def ratio(own, ref):
        return f"{own / ref:.2f}" if own and ref else ""

    def add(name, ms=None, ref=None, text=None):
        r = ratio(ms["median"], ref["median"]) if ms and ref and "median" in ms else ""
        rows.append((name, text if text is not None else fmt(ms), fmt(ref) if ref else "", r))

    def get(d, *keys):
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d

    def add_predict(name, r, p):
        add(f"{name} full, every branch", r["full_predict_all_branches_ms"], get(p, "full_predict_ms"))
        add("  full, as predict (no candidate: kernel branch skipped)", r["full_predict_ms"],
            get(p, "full_predict_ms"))
        if "full_predict_candidates_ms" in r:
            add("  full, as predict, 100 candidates on every level", r["full_predict_candidates_ms"],
                get(p, "full_predict_forced_candidates", "100", "full_predict_ms"))
        add(f"  backbone+neck ({r['gflop_backbone_neck']:.0f} GFLOP, "
            f"{r['gflops_per_s_backbone_neck']:.0f} GFLOP/s)", r["backbone_neck_ms"], get(p, "backbone_neck_ms"))
        add(f"  head ({r['gflop_head']:.0f} GFLOP, {r['gflops_per_s_head']:.0f} GFLOP/s)",
            r["head_forward_ms"], get(p, "head_forward_ms"))
        for k, f in r["forced"].items():
            add(f"  post-processing, {k} forced", f["postprocess_ms"],
                get(p, "postprocess_forced_candidates", k, "postprocess_ms"))
        add("  peak RSS MB (process)", text=f"{r['process_peak_rss_mb']:.0f}")

    for key, r in ours["sections"].items():
        section, dtype = key.split("|")
        tag = "" if dtype == "float32" else " bf16"
        if section.startswith("infer:"):
            s = section.split(":")[1]
            add_predict(f"predict R50 {s}{tag}", r, get(peer, "inference", s))
        elif section == "infer_light":
            s = "x".join(map(str, r["input_hw"]))
            add_predict(f"predict light R18 {s}{tag}", r, get(peer, "inference_light", s))
        elif section.partition("@")[0] in TRAIN_SECTIONS:
            cp = " with_cp" if "_cp" in section else ""
            if "_mb" in section:
                cp += f" micro_batch_size={r['micro_batch_size']}"
            # What ran (results/bench_train_step_executor.json asked for
            # "auto", which was sequential in that commit).
            if r.get("runs_sequentially"):
                cp += " step_executor=sequential"
            arch = {"solov2_r50": "R50", "solov2_light_r18": "light R18"}.get(r.get("architecture", "solov2_r50"), r.get("architecture"))
            h, w = r["input_hw"]
            size = f"{h}²" if h == w else f"{h}x{w}"
            # mmdet's train step is R50 at 512² (the peer script's).
            same = peer if (arch, h, w) == ("R50", 512, 512) else None
            add(f"train step {arch} b{r['batch']} {size}{tag}{cp}", r["train_step_ms"],
                get(same, "train", "train_step_ms"))
            # After the timed steps (in results from before 2026-11-25, the
            # process's peak); mmdet's is its script's process, which keeps
            # every step's loss dict (+60–90 MB per step).
            own_rss = r.get("peak_rss_mb", r["process_peak_rss_mb"])
            ref_rss = get(same, "process_peak_rss_mb_train")
            rows.append(("  peak RSS MB (timed steps; mmdet: its script)", f"{own_rss:.0f}",
                         f"{ref_rss:.0f}" if ref_rss else "", ratio(own_rss, ref_rss)))
            loop, ref_loop = r.get("plain_loop"), get(same, "train_plain_loop")
            if loop:
                ref_mb = get(ref_loop, "peak_rss_mb")
                rows.append((f"  peak RSS MB after {loop['steps']} steps (plain loop)",
                             f"{loop['peak_rss_mb']:.0f}", f"{ref_mb:.0f}" if ref_mb else "",
                             ratio(loop["peak_rss_mb"], ref_mb)))
                if ref_mb:  # the split below: of these peaks
                    own_rss, ref_rss = loop["peak_rss_mb"], ref_mb
            before, ref_before = r.get("rss_before_step_mb"), get(same, "train_rss_before_step_mb")
            if before and before["model_built"]:
                rows.append(("  RSS MB before the step: imports, model built",
                             f"{before['after_imports']:.0f}, {before['model_built']:.0f}",
                             f"{ref_before['after_imports']:.0f}, {ref_before['model_built']:.0f}"
                             if ref_before else "", ratio(before["model_built"], get(ref_before, "model_built"))))
                file_backed, ref_file_backed = (before.get("model_built_file_backed"),
                                                get(ref_before, "model_built_file_backed"))
                if file_backed:
                    rows.append(("  of which file-backed pages (shared libraries)", f"{file_backed:.0f}",
                                 f"{ref_file_backed:.0f}" if ref_file_backed else "", ""))
                    if ref_file_backed and ref_rss:
                        own, ref = own_rss - file_backed, ref_rss - ref_file_backed
                        rows.append(("  peak RSS MB − file-backed pages", f"{own:.0f}", f"{ref:.0f}", ratio(own, ref)))
                added = own_rss - before["model_built"]
                ref_added = ref_rss - ref_before["model_built"] if ref_rss and ref_before else None
                rows.append(("  RSS MB the step adds (peak − model built)", f"{added:.0f}",
                             f"{ref_added:.0f}" if ref_added else "", ratio(added, ref_added)))
            if r.get("tensor_peak_mb"):
                add("  TensorFlow's tensor peak MB (allocator statistics)", text=f"{r['tensor_peak_mb']:.0f}")
        elif section == "retrace":
            add(f"predict on {len(r['calls'])} sizes{tag}: graphs compiled", text=str(r["graphs_compiled"]))
        elif section == "nms":
            for k, v in r.items():
                if isinstance(v, dict):
                    add(f"Matrix NMS {k}", v["ms"], get(peer, "matrix_nms", k, "ms"))
    return rows


def table(ours, peer):
    return format_rows(table_rows(ours, peer))


def format_rows(rows, header=("measurement", "ours ms (min–max)", "mmdet ms (min–max)", "ratio")):
    width = max(len(r[0]) for r in rows) if rows else 10
    w2 = max([len(r[1]) for r in rows] + [14])
    w3 = max([len(r[2]) for r in rows] + [14])
    return "\n".join(f"{a:<{width}}  {b:>{w2}}  {c:>{w3}}  {d:>6}" for a, b, c, d in [header, *rows])


def rounds_summary(rounds):
    """Per row with a ratio in every round: each round's ratio, then their median."""
    tables = [table_rows(r["ours"], r["mmdet"]) for r in rounds]
    rows, section = [], ""
    for i, (name, *_) in enumerate(tables[0]):
        if not name.startswith(" "):
            section = name
        ratios = [float(t[i][3]) for t in tables if i < len(t) and t[i][0] == name and t[i][3]]
        if len(ratios) == len(rounds):
            label = name if not name.startswith(" ") else f"{section.split(' full')[0]}:{name}"
            rows.append((label, " ".join(f"{r:.2f}" for r in ratios), "",
                         f"{statistics.median(ratios):.2f}"))
    return format_rows(rows, header=("ratio ours / mmdet", "per round", "", "median"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--inter-op-threads", type=int, default=None,
                    help="TensorFlow ops run at once (default: --threads, as TensorFlow's own default on a "
                         "machine with that many cores); 1 runs one op at a time, as PyTorch's eager mode, "
                         "each op still on --threads threads")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--train-warmup", type=int, default=1)
    ap.add_argument("--train-runs", type=int, default=3)
    ap.add_argument("--train-memory-steps", type=int, default=12,
                    help="train steps in all (timed ones included) after which each side's peak RSS is read "
                         "again, mmdet's in a plain loop (peer_train_memory.py); 0: skip")
    ap.add_argument("--sizes", default="512x512,800x1333")
    ap.add_argument("--forced-k", default="100,500")
    ap.add_argument("--dtypes", default="float32,mixed_bfloat16", help="dtype policies to measure")
    ap.add_argument("--skip", default="", help="comma list of: infer,train,nms,retrace")
    ap.add_argument("--jit-compile", action="store_true", help="XLA for backbone/head/predict/train step")
    ap.add_argument("--with-cp", action="store_true", help="also the train step with SOLOv2(with_cp=True)")
    ap.add_argument("--micro-batch-size", default=None,
                    help="also the train step with compile(micro_batch_size=N) (and with_cp with --with-cp); "
                         "none: with the whole batch in one pass (compile's default is auto)")
    ap.add_argument("--train-architecture", default="solov2_r50",
                    help="the train step's model (mmdet's reference step is solov2_r50's)")
    ap.add_argument("--train-size", default="512x512", help="the train step's images, HxW (mmdet's: 512x512)")
    ap.add_argument("--step-executors", default="sequential",
                    help="the train step also with compile(step_executor=E) for each E, besides the "
                         "default 'parallel'; '' for the default only")
    ap.add_argument("--no-winograd", action="store_true",
                    help="SOLOv2(winograd=False): direct 3x3 convs after the backbone (FPN, mask branch, head; float32)")
    ap.add_argument("--defer-tensorflow-text", action="store_true",
                    help="keras_solov2.defer_tensorflow_text() in each section, as the command line does")
    ap.add_argument("--peer-python", default=None, help="python of an mmdet 3.3 venv (../shared/peer)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat (ours, then mmdet) N times: a ratio per round and their median")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench.json"))
    ap.add_argument("--section", help=argparse.SUPPRESS)
    ap.add_argument("--section-dtype", help=argparse.SUPPRESS)
    ap.add_argument("--section-out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.section:
        result = run_section(a, a.section, a.section_dtype)
        Path(a.section_out).write_text(json.dumps({"result": result, "contention_gate": GATE}))
        return 0
    python = peer_python(a)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    rounds = []

    def write(last):
        # One round: {"ours", "mmdet"} as always; several: {"rounds": [...]}.
        Path(a.out).write_text(json.dumps(last if a.rounds == 1 else {"rounds": rounds + [last]}, indent=1))

    # Rounds alternate the two sides, so that a slow spell of the machine
    # (step times drift by 10–15 % over an hour here) shows up as one round's
    # ratio instead of biasing one side.
    for _ in range(a.rounds):
        ours = run_ours(a)
        # Ours is written first: should mmdet's run fail, our measurements stay.
        write({"ours": ours, "mmdet": None})
        peer = run_peer(a, python)
        write({"ours": ours, "mmdet": peer})
        rounds.append({"ours": ours, "mmdet": peer})
        print(table(ours, peer))
    if a.rounds > 1 and python:
        print(rounds_summary(rounds))
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
