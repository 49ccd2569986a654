"""mmdetection's resident memory before its train step (run in the mmdet venv).

`../shared/peer/bench_solov2.py` reports only the peak RSS of the process that
ran mmdet's train step. This script builds the same process up to the step,
as that script's `main` does (the peer module's imports, mmdet's registry,
`peer_env.build_solov2()` with the same seed and threads), and records the
resident set (VmRSS) after the imports and with the model built. With the
peak of the peer's own run, `bench_solov2.py` splits each side's peak into
what the process holds before the step and what the step adds, the same
split it records for ours (`rss_before_step_mb`). Run by
`bench_solov2.py --peer-python` with the train section.

Usage (mmdet venv of `../shared/peer/setup_venv.sh`):
    python benchmarks/peer_train_memory.py --threads 2 --out FILE.json
"""

import argparse
import json
import logging
import os
from pathlib import Path

from bench_solov2 import resident_mb  # (standard library only at module level)
from peer_predict_candidates import load_peer_bench


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    peer = load_peer_bench()
    import torch
    from mmdet.utils import register_all_modules

    torch.set_num_threads(a.threads)
    logging.getLogger("mmengine").setLevel(logging.WARNING)
    register_all_modules(init_default_scope=True)
    after_imports = resident_mb()
    torch.manual_seed(0)  # the peer script's random init
    model, _ = peer.peer_env.build_solov2()
    model.eval()
    res = {"threads": torch.get_num_threads(),
           "rss_before_step_mb": {"after_imports": after_imports, "model_built": resident_mb()}}
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res), "wrote", os.path.abspath(a.out))


if __name__ == "__main__":
    main()
