"""mmdetection's whole `predict` on an image with K candidates (run in the mmdet venv).

`../shared/peer/bench_solov2.py` times mmdet's full `model.predict` with
random weights, where no cell passes `score_thr`, and times its
post-processing with K forced candidates on its own. This script times the
whole `model.predict` (data preprocessor, backbone+neck, the dense head,
post-processing with Matrix NMS and masks pasted at the original size, as
`rescale=True` does) with the head's outputs replaced by those same forced
ones: K (cell, class) logits +2 (others -6) and kernels 0.2·N(0, 1), drawn
with the peer script's generator and seed, so the same cells are forced.
The head still computes its real outputs first (mmdet's head is dense
whatever the image holds); only what it returns is swapped.

It is the mmdet reference for `bench_solov2.py`'s "full, as predict, 100
candidates on every level" row, and is run by it (`--peer-python`); the
contention gate and statistics are the peer script's own.

Usage (mmdet venv of `../shared/peer/setup_venv.sh`):
    python benchmarks/peer_predict_candidates.py --sizes 512x512,800x1333 --forced-k 100 --out FILE.json
"""

import argparse
import importlib.util
import json
import logging
import os
from pathlib import Path

PEER = Path(__file__).resolve().parents[2] / "shared" / "peer"


def load_peer_bench():
    # Loaded by path: its module name is also our own benchmark's.
    spec = importlib.util.spec_from_file_location("peer_bench_solov2", PEER / "bench_solov2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def forced_outputs(outs, k, ncls, generator):
    """The peer script's forced head outputs for K candidates (same draws)."""
    import torch

    sizes = [c.shape[-1] ** 2 for c in outs[1]]
    total = sum(sizes)
    kernels = [0.2 * torch.randn(x.shape, generator=generator) for x in outs[0]]
    cls = [torch.full(c.shape, -6.0) for c in outs[1]]
    flat = torch.randperm(total * ncls, generator=generator)[:k]
    loc, lab = flat // ncls, flat % ncls
    offset = 0
    for level, size in enumerate(sizes):
        sel = (loc >= offset) & (loc < offset + size)
        cells = loc[sel] - offset
        grid = outs[1][level].shape[-1]
        cls[level][0, lab[sel], cells // grid, cells % grid] = 2.0
        offset += size
    return kernels, cls


def bench(peer, model, h, w, ks, warmup, runs):
    import torch

    torch.manual_seed(0)
    img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    data = dict(inputs=[img], data_samples=[peer.make_sample(h, w)])
    head = model.mask_head
    results = {}
    with torch.no_grad():
        d = model.data_preprocessor(data, False)
        outs = head(model.extract_feat(d["inputs"]))
        for k in ks:
            # Reseeded per K: for the first K (the peer script's first draw
            # after seeding) the forced cells are the peer script's.
            kernels, cls = forced_outputs(outs, k, head.num_classes, torch.Generator().manual_seed(1))

            def forward(x, real=head.forward, kernels=kernels, cls=cls):
                mask_feats = real(x)[2]
                # fresh lists: predict_by_feat writes into the ones it gets
                return list(kernels), list(cls), mask_feats

            def full():
                dd = model.data_preprocessor(data, False)
                return model.predict(dd["inputs"], dd["data_samples"], rescale=True)

            head.forward = forward
            try:
                ts = peer.timeit(full, warmup, runs, f"{h}x{w} full forced {k}")
                dets = int(len(full()[0].pred_instances.scores))
            finally:
                del head.forward
            results[str(k)] = dict(full_predict_ms=peer.stats_ms(ts), num_dets=dets)
    return results


def parse_args(description, sizes, forced_k=None):
    """The peer predict scripts' options (`--forced-k` if given a default)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sizes", default=sizes)
    if forced_k is not None:
        ap.add_argument("--forced-k", default=forced_k)
    ap.add_argument("--out", required=True)
    return ap.parse_args()


def start(a):
    """The peer script, loaded, and torch set up as it sets itself up
    (threads, mmengine's log level, the seed of its random init)."""
    peer = load_peer_bench()
    import torch

    torch.set_num_threads(a.threads)
    logging.getLogger("mmengine").setLevel(logging.WARNING)
    torch.manual_seed(0)
    return peer, torch


def write_results(peer, res, out):
    """`res` with the peer contention gate's counts, written to `out` as JSON."""
    res["contention_gate"] = dict(accepted=peer.LOG["accepted"], discarded=peer.LOG["discarded"],
                                  unclean=peer.LOG["unclean_measurements"])
    Path(out).write_text(json.dumps(res, indent=1))
    print("wrote", os.path.abspath(out))


def main():
    a = parse_args(__doc__, "512x512,800x1333", forced_k="100")
    peer, torch = start(a)
    model, _ = peer.peer_env.build_solov2()
    model.eval()
    ks = [int(k) for k in a.forced_k.split(",") if k]
    res = {"threads": torch.get_num_threads(), "inference": {}}
    for s in a.sizes.split(","):
        h, w = map(int, s.split("x"))
        res["inference"][s] = {"full_predict_forced_candidates": bench(peer, model, h, w, ks, a.warmup, a.runs)}
        print(s, json.dumps(res["inference"][s]), flush=True)
    write_results(peer, res, a.out)


if __name__ == "__main__":
    main()
