"""mmdetection's resident memory before its train step, and after N steps in a plain loop (mmdet venv).

`../shared/peer/bench_solov2.py` reports only the peak RSS of the process that
ran mmdet's train step. This script builds the same process up to the step,
as that script's `main` does (the peer module's imports, mmdet's registry,
`peer_env.build_solov2()` with the same seed and threads), and records the
resident set (VmRSS) after the imports and with the model built, and the
file-backed part of the latter (RssFile: the shared libraries' pages). With the
peak of the peer's own run, `bench_solov2.py` splits each side's peak into
what the process holds before the step and what the step adds, the same
split it records for ours (`rss_before_step_mb`).

With `--steps N` it then runs N train steps on the peer script's batch in
a plain loop, as a training does (each step's outputs dropped), and records
the process's peak: the peer script's own peak is inflated because it keeps
every step's loss dict (60–90 MB per step, measured). `bench_solov2.py`
compares it with ours after as many steps. Run by `bench_solov2.py
--peer-python` with the train section.

Usage (mmdet venv of `../shared/peer/setup_venv.sh`):
    python benchmarks/peer_train_memory.py --threads 2 --steps 12 --out FILE.json
"""

import argparse
import json
import os
from pathlib import Path

from bench_solov2 import peak_rss_mb, resident_mb  # (standard library only at module level)
from peer_predict_candidates import start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0,
                    help="then this many train steps in a plain loop (each step's outputs dropped): their peak RSS")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    peer, torch = start(a)
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    after_imports = resident_mb()
    model, cfg = peer.peer_env.build_solov2()
    model.eval()
    res = {"threads": torch.get_num_threads(),
           "rss_before_step_mb": {"after_imports": after_imports, "model_built": resident_mb(),
                                  "model_built_file_backed": resident_mb("RssFile")}}
    if a.steps:
        res["plain_loop"] = {"steps": a.steps, "peak_rss_mb": plain_loop_peak(peer, model, cfg, a.steps)}
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res), "wrote", os.path.abspath(a.out))


def plain_loop_peak(peer, model, cfg, steps, batch=2, h=512, w=512):
    """Peak RSS (MB) after `steps` of `model.train_step` on the peer script's
    batch (its seeds, sizes and optimiser), as a training loop runs them: each
    step's returned losses dropped. The peer script keeps every step's, which
    grows its process by 60–90 MB per step."""
    import numpy as np
    import torch
    from mmengine.optim import build_optim_wrapper

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model.train()
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    images, samples = [], []
    for _ in range(batch):
        n = int(rng.integers(2, 5))
        images.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
        samples.append(peer.make_sample(h, w, peer.synthetic_gts(h, w, n, rng)))
    data = dict(inputs=images, data_samples=samples)
    for _ in range(steps):
        model.train_step(data, optim_wrapper)
    return peak_rss_mb()


if __name__ == "__main__":
    main()
