"""mmdetection's light R18 SOLOv2 `predict` at 448×768 (run in the mmdet venv).

`../shared/peer/bench_solov2.py` builds only `solov2_r50_fpn_1x_coco.py`.
This script builds mmdet 3.3's `solov2-light_r18_fpn_ms-3x_coco.py` the way
that script builds R50 (random init by mmdet's own `init_weights`, the
torchvision checkpoint dropped: no model hub here) and measures it with that
script's own `bench_inference` (same warm-up, runs, contention gate and
statistics): data preprocessing, backbone+neck, head, post-processing with
random weights and the full `predict` at the light models' test size
448×768 (mmdet's test pipeline resizes to fit 448×768; the image here is
already that size).

It is the mmdet reference for `bench_solov2.py`'s light R18 rows and is run
by it (`--peer-python`).

Usage (mmdet venv of `../shared/peer/setup_venv.sh`):
    python benchmarks/peer_predict_light.py --sizes 448x768 --out FILE.json
"""

import json
import logging
import os

from peer_predict_candidates import parse_args, start, write_results

CONFIG = "solov2-light_r18_fpn_ms-3x_coco.py"
SIZE = (448, 768)  # the light configs' test size (their test pipeline's Resize scale)


def build_light_r18(peer):
    """mmdet's light R18 SOLOv2 with its own random init (as `peer_env.build_solov2`)."""
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(os.path.join(os.path.dirname(peer.peer_env.solov2_config_path()), CONFIG))
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)  # one line per initialised parameter otherwise
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)
    return model.eval()


def main():
    a = parse_args(__doc__, "x".join(map(str, SIZE)))
    peer, torch = start(a)
    model = build_light_r18(peer)
    res = {"threads": torch.get_num_threads(), "config": f"{CONFIG} (random init)",
           "num_params_M": sum(p.numel() for p in model.parameters()) / 1e6, "inference": {}}
    for s in a.sizes.split(","):
        h, w = map(int, s.split("x"))
        res["inference"][s] = peer.bench_inference(model, h, w, a.warmup, a.runs, [])
        print(s, json.dumps(res["inference"][s]), flush=True)
    write_results(peer, res, a.out)


if __name__ == "__main__":
    main()
