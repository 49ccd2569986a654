"""Presets: mmdetection's released COCO SOLOv2 checkpoints, converted on first use.

`SOLOv2.from_preset(name)` downloads the official checkpoint once into the
Keras cache (`~/.keras/keras_solov2/`, or `$KERAS_HOME`), checks it against
the hash in its file name, converts it (`keras_solov2.convert`), and caches
the converted preset in keras-hub's layout (`config.json`,
`model.weights.h5`, `metadata.json`); later calls load that. Offline, it
fails within seconds with the URL it needs and where to put the file.

The mask APs are mmdetection's (COCO val2017), reproduced here through weight
equality: the converter is tested against mmdet's own forward pass.
DCN variants (R101-DCN 41.2, X101-DCN 42.4) are out of scope: Keras has no
deformable convolution.
"""

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

_BASE = "https://download.openmmlab.com/mmdetection/v2.0/solov2"

PRESETS = {
    "resnet50_coco": dict(architecture="solov2_r50", mask_ap=37.5, mmdet_config="solov2_r50_fpn_ms-3x_coco",
                          url=f"{_BASE}/solov2_r50_fpn_3x_coco/solov2_r50_fpn_3x_coco_20220512_125856-fed092d4.pth"),
    "resnet50_1x_coco": dict(architecture="solov2_r50", mask_ap=34.8, mmdet_config="solov2_r50_fpn_1x_coco",
                             url=f"{_BASE}/solov2_r50_fpn_1x_coco/solov2_r50_fpn_1x_coco_20220512_125858-a357fa23.pth"),
    "resnet101_coco": dict(architecture="solov2_r101", mask_ap=39.1, mmdet_config="solov2_r101_fpn_ms-3x_coco",
                           url=f"{_BASE}/solov2_r101_fpn_3x_coco/solov2_r101_fpn_3x_coco_20220511_095119-c559a076.pth"),
    "light_resnet18_coco": dict(architecture="solov2_light_r18", mask_ap=29.7,
                                mmdet_config="solov2-light_r18_fpn_ms-3x_coco",
                                url=f"{_BASE}/solov2_light_r18_fpn_3x_coco/solov2_light_r18_fpn_3x_coco_20220511_083717-75fa355b.pth"),
    "light_resnet34_coco": dict(architecture="solov2_light_r34", mask_ap=31.9,
                                mmdet_config="solov2-light_r34_fpn_ms-3x_coco",
                                url=f"{_BASE}/solov2_light_r34_fpn_3x_coco/solov2_light_r34_fpn_3x_coco_20220511_091839-e51659d3.pth"),
    "light_resnet50_coco": dict(architecture="solov2_light_r50", mask_ap=33.7,
                                mmdet_config="solov2-light_r50_fpn_ms-3x_coco",
                                url=f"{_BASE}/solov2_light_r50_fpn_3x_coco/solov2_light_r50_fpn_3x_coco_20220512_165256-c93a6074.pth"),
}

COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
]


def cache_dir():
    """`$KERAS_HOME/keras_solov2` (default `~/.keras/keras_solov2`)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "keras_solov2"


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _expected_prefix(url):
    return Path(urlparse(url).path).stem.rsplit("-", 1)[-1]


def fetch_checkpoint(name, timeout=5.0):
    """The preset's `.pth` in the cache, downloading it if needed (hash-checked)."""
    spec = PRESETS[name]
    url = spec["url"]
    target = cache_dir() / Path(urlparse(url).path).name
    prefix = _expected_prefix(url)
    if target.is_file():
        if _sha256(target).startswith(prefix):
            return target
        raise ValueError(f"{target} does not match the sha256 prefix {prefix} of {url}; delete it and retry.")
    host = urlparse(url).hostname
    how = (
        f"Download it elsewhere and either call SOLOv2.from_preset('/path/to/{target.name}') or place it at "
        f"{target}."
    )
    try:  # a fast, single reachability check: no long retry loops offline
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"Preset {name!r} needs {url}, but {host} is unreachable ({e}). {how}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    os.close(fd)
    try:
        import urllib.request

        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
        if not _sha256(tmp).startswith(prefix):
            raise ValueError(f"the file downloaded from {url} does not match its sha256 prefix {prefix}.")
        os.replace(tmp, target)
    except OSError as e:
        raise ConnectionError(f"Downloading {url} failed ({e}). {how}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def save_to_preset(model, directory):
    """Writes keras-hub's preset layout, atomically (temp folder, then rename)."""
    import keras

    import keras_solov2

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        (tmp / "config.json").write_text(json.dumps(keras.saving.serialize_keras_object(model), indent=1))
        model.save_weights(tmp / "model.weights.h5")
        (tmp / "metadata.json").write_text(json.dumps({
            "keras_version": keras.__version__,
            "keras_solov2_version": keras_solov2.__version__,
            "parameter_count": model.count_params(),
            "date_saved": time.strftime("%Y-%m-%d@%H:%M:%S"),
        }, indent=1))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _load_preset_dir(directory, load_weights=True):
    import keras

    config = json.loads((Path(directory) / "config.json").read_text())
    model = keras.saving.deserialize_keras_object(config, safe_mode=True)
    if load_weights:
        model.load_weights(Path(directory) / "model.weights.h5")
    return model


def _with_num_classes(model, num_classes, class_names=None):
    """A copy with a new, re-initialised class-logit conv; every other weight kept."""
    from keras_solov2.models.solov2 import SOLOv2

    config = model.get_config()
    config.update(num_classes=int(num_classes), class_names=class_names)
    new = SOLOv2.from_config(config)
    head_cls = {id(v) for v in model.instance_head.conv_cls.weights}
    new_cls = {id(v) for v in new.instance_head.conv_cls.weights}
    old_vars = [v for v in model.weights if id(v) not in head_cls]
    new_vars = [v for v in new.weights if id(v) not in new_cls]
    for src, dst in zip(old_vars, new_vars):
        dst.assign(src)
    return new


def from_preset(cls, preset, num_classes=None, load_weights=True, class_names=None, **kwargs):
    """See `SOLOv2.from_preset`."""
    from keras_solov2.convert import convert

    path = Path(str(preset))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a preset folder (no config.json).")
        model = _load_preset_dir(path, load_weights)
    elif path.suffix == ".pth":
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist.")
        model = convert(path, **kwargs)
    elif preset in PRESETS:
        spec = PRESETS[preset]
        converted = cache_dir() / "presets" / preset
        if (converted / "config.json").is_file():
            model = _load_preset_dir(converted, load_weights)
        elif not load_weights:
            model = cls.from_architecture(spec["architecture"], class_names=COCO_CLASSES)
        else:
            model = convert(fetch_checkpoint(preset), class_names=COCO_CLASSES, **kwargs)
            save_to_preset(model, converted)
    else:
        raise ValueError(
            f"Unknown preset {preset!r}: expected one of {sorted(PRESETS)}, a preset folder or a .pth file."
        )
    if num_classes is not None and num_classes != model.num_classes:
        model = _with_num_classes(model, num_classes, class_names)
    return model
