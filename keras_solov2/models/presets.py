"""Presets: mmdetection's released COCO SOLOv2 checkpoints, converted on first use.

`SOLOv2.from_preset(name)` downloads the official checkpoint once into the
Keras cache (`$KERAS_HOME/keras_solov2/checkpoints/`, default `~/.keras`),
checks it against the sha256 prefix in its file name, converts it
(`keras_solov2.convert`) and caches the converted preset in keras-hub's layout
(`$KERAS_HOME/keras_solov2/presets/<name>/`: `config.json`,
`model.weights.h5`, `metadata.json`); later calls load that and need neither
the network nor torch. Offline or behind a firewall it fails within seconds
with the URL it needs and where to put the file by hand.

The mask APs are mmdetection's (COCO val2017, `configs/solov2/README.md`),
reproduced here through weight equality: the converter is tested against
mmdet's own forward pass. Inputs are expected at mmdet's test scale
(`test_scale`: shorter side, longer side limit, aspect kept).

DCN variants (`UNSUPPORTED_PRESETS`) are out of scope: Keras has no
deformable convolution.
"""

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
import urllib.request
import warnings
from pathlib import Path
from urllib.parse import urlparse

from keras_solov2.atomic_files import write_directory_atomically

_BASE = "https://download.openmmlab.com/mmdetection/v2.0/solov2"
# Bump when the conversion changes: cached converted presets are then rebuilt.
CONVERTER_VERSION = 1


def _spec(architecture, mmdet_config, folder, stamp, sha256_prefix, mask_ap, test_scale, description):
    return dict(
        architecture=architecture,
        mmdet_config=mmdet_config,
        url=f"{_BASE}/{folder}/{folder}_{stamp}-{sha256_prefix}.pth",
        sha256_prefix=sha256_prefix,
        mask_ap=mask_ap,
        test_scale=test_scale,
        description=description,
    )


PRESETS = {
    "resnet50_coco": _spec(
        "solov2_r50", "solov2_r50_fpn_ms-3x_coco", "solov2_r50_fpn_3x_coco", "20220512_125856", "fed092d4",
        37.5, (800, 1333), "SOLOv2 R-50-FPN, 3x multi-scale training, COCO (the best R-50)."),
    "resnet50_1x_coco": _spec(
        "solov2_r50", "solov2_r50_fpn_1x_coco", "solov2_r50_fpn_1x_coco", "20220512_125858", "a357fa23",
        34.8, (800, 1333), "SOLOv2 R-50-FPN, 1x schedule, COCO."),
    "resnet101_coco": _spec(
        "solov2_r101", "solov2_r101_fpn_ms-3x_coco", "solov2_r101_fpn_3x_coco", "20220511_095119", "c559a076",
        39.1, (800, 1333), "SOLOv2 R-101-FPN, 3x multi-scale training, COCO."),
    "light_resnet18_coco": _spec(
        "solov2_light_r18", "solov2-light_r18_fpn_ms-3x_coco", "solov2_light_r18_fpn_3x_coco", "20220511_083717",
        "75fa355b", 29.7, (448, 768), "Light SOLOv2 R-18-FPN, 3x multi-scale training, COCO."),
    "light_resnet34_coco": _spec(
        "solov2_light_r34", "solov2-light_r34_fpn_ms-3x_coco", "solov2_light_r34_fpn_3x_coco", "20220511_091839",
        "e51659d3", 31.9, (448, 768), "Light SOLOv2 R-34-FPN, 3x multi-scale training, COCO."),
    "light_resnet50_coco": _spec(
        "solov2_light_r50", "solov2-light_r50_fpn_ms-3x_coco", "solov2_light_r50_fpn_3x_coco", "20220512_165256",
        "c93a6074", 33.7, (448, 768), "Light SOLOv2 R-50-FPN, 3x multi-scale training, COCO."),
}
"""Name → `architecture` (in `ARCHITECTURES`), `mmdet_config`, `url`,
`sha256_prefix` (first 8 hex digits of the file's sha256, as in its name),
`mask_ap` (COCO val2017, mmdet's), `test_scale` (shorter side, longer side
limit, pixels) and `description`. Optional keys: `config` (extra `SOLOv2`
arguments) and `class_names` (default `COCO_CLASSES`)."""

UNSUPPORTED_PRESETS = {
    "resnet101_dcn_coco": dict(
        mmdet_config="solov2_r101-dcn_fpn_ms-3x_coco", mask_ap=41.2,
        url=f"{_BASE}/solov2_r101_dcn_fpn_3x_coco/solov2_r101_dcn_fpn_3x_coco_20220513_214734-16c966cb.pth"),
    "resnext101_dcn_coco": dict(
        mmdet_config="solov2_x101-dcn_fpn_ms-3x_coco", mask_ap=42.4,
        url=f"{_BASE}/solov2_x101_dcn_fpn_3x_coco/solov2_x101_dcn_fpn_3x_coco_20220513_214337-aef41095.pth"),
}
"""mmdetection's DCN checkpoints: out of scope (no deformable convolution in Keras)."""

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
"""The 80 COCO names in mmdet's label order (label `i` ↔ `COCO_CATEGORY_IDS[i]`)."""

COCO_CATEGORY_IDS = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33,
    34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61,
    62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
]
"""COCO category id of each label (ids run 1–90 with gaps: never `label + 1`)."""


# ------------------------------------------------------------------ cache
def cache_dir():
    """`$KERAS_HOME/keras_solov2` (default `~/.keras/keras_solov2`; `/tmp/.keras/...` if read-only)."""
    root = Path(os.environ.get("KERAS_HOME") or Path("~/.keras").expanduser())
    with contextlib.suppress(OSError):
        root.mkdir(parents=True, exist_ok=True)
    if not os.access(root, os.W_OK):  # as keras.utils.get_file
        root = Path(tempfile.gettempdir()) / ".keras"
    return root / "keras_solov2"


def checkpoint_path(name):
    """Where the cache keeps preset `name`'s `.pth` (it may not exist yet)."""
    return cache_dir() / "checkpoints" / Path(urlparse(PRESETS[name]["url"]).path).name


def converted_preset_dir(name):
    """Where the cache keeps preset `name` converted to keras-hub's layout."""
    return cache_dir() / "presets" / name


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------- download
def _probe_target(url):
    """`(host, port)` a download of `url` connects to first: its host, or the proxy's."""
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname, p.port or (443 if p.scheme == "https" else 80)
    return host, port


def _check_reachable(url, timeout):
    """Raises `OSError` unless a TCP connection (DNS included) opens within `timeout` s."""
    host, port = _probe_target(url)
    outcome = {}

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            outcome["error"] = e

    thread = threading.Thread(target=probe, name="keras_solov2-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)  # bounds DNS look-ups too, which ignore socket timeouts
    if thread.is_alive():
        raise OSError(f"no answer from {host}:{port} within {timeout:g} s")
    if "error" in outcome:
        raise OSError(f"cannot connect to {host}:{port}: {outcome['error']}")


@contextlib.contextmanager
def _socket_timeout(seconds):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def fetch_checkpoint(name, timeout=10.0):
    """Preset `name`'s official `.pth` in the Keras cache, downloading it if needed.

    Downloads with `keras.utils.get_file` (no retries; `timeout` seconds per
    connection attempt or stalled read) into a `.part` file, checks the
    sha256 prefix from the file name, then renames: the cache never holds a
    partial checkpoint under its real name.

    Args:
        name: a key of `PRESETS`.
        timeout: seconds, for the reachability probe and each socket operation.

    Returns:
        The `Path` of the verified checkpoint.

    Raises:
        ConnectionError: the host (or proxy) is unreachable or the download
            failed; the message names the URL and where to put the file.
        ValueError: the downloaded file does not match its sha256 prefix.
    """
    import keras

    spec = PRESETS[name]
    url, prefix = spec["url"], spec["sha256_prefix"]
    target = checkpoint_path(name)
    how = (
        f"To install it by hand, download {url} on a machine with access, then either "
        f"call SOLOv2.from_preset('/path/to/{target.name}') or copy the file to {target} "
        f"and call SOLOv2.from_preset({name!r}) again."
    )
    stale = ""
    if target.is_file():
        if _sha256(target).startswith(prefix):
            return target
        stale = f"{target} is in the cache but its sha256 does not start with {prefix} (interrupted or corrupt). "
        warnings.warn(stale + "Downloading it again.", stacklevel=2)
    try:
        _check_reachable(url, timeout)
    except OSError as e:
        raise ConnectionError(f"{stale}Preset {name!r} needs {url}, which is unreachable ({e}). {how}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _socket_timeout(timeout):
            part = Path(keras.utils.get_file(
                fname=f"{target.name}.part", origin=url, cache_dir=str(target.parent), cache_subdir=".",
                force_download=True,
            ))
    except Exception as e:  # get_file wraps HTTP and socket errors in a bare Exception
        raise ConnectionError(f"{stale}Downloading {url} failed ({e}). {how}") from None
    digest = _sha256(part)
    if not digest.startswith(prefix):
        part.unlink()
        raise ValueError(f"The file downloaded from {url} has sha256 {digest}, not {prefix}...; not using it.")
    os.replace(part, target)
    return target


# ------------------------------------------------------------ preset folders
def save_to_preset(model, directory, metadata=None):
    """Writes `model` in keras-hub's preset layout, atomically.

    The files are written into a temporary sibling folder that is then
    renamed to `directory` (an existing folder is replaced), so a crash never
    leaves a half-written preset.

    Args:
        model: a `SOLOv2`.
        directory: the preset folder to create or replace.
        metadata: optional extra JSON-serialisable entries for
            `metadata.json` (e.g. the source checkpoint).

    Returns:
        `Path(directory)`, holding `config.json` (`keras.saving.
        serialize_keras_object(model)`), `model.weights.h5` and
        `metadata.json` (`keras_version`, `keras_hub_version`,
        `keras_solov2_version`, `parameter_count`, `date_saved`, ...).
    """
    import keras
    import keras_hub

    import keras_solov2

    def write(tmp):
        (tmp / "config.json").write_text(json.dumps(keras.saving.serialize_keras_object(model), indent=4))
        model.save_weights(tmp / "model.weights.h5")
        (tmp / "metadata.json").write_text(json.dumps(dict(
            keras_version=keras.__version__,
            keras_hub_version=keras_hub.__version__,
            keras_solov2_version=keras_solov2.__version__,
            parameter_count=model.count_params(),
            date_saved=time.strftime("%Y-%m-%d@%H:%M:%S"),
            **(metadata or {}),
        ), indent=4))

    return write_directory_atomically(directory, write)


def load_preset_dir(directory, load_weights=True, **overrides):
    """A `SOLOv2` from a preset folder; `overrides` replace config entries.

    Overrides that change weight shapes make `load_weights` fail loudly.
    """
    import keras

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if overrides:
        config["config"].update(overrides)
    model = keras.saving.deserialize_keras_object(config, safe_mode=True)
    if load_weights:
        model.load_weights(directory / "model.weights.h5")
    return model


def _read_metadata(directory):
    try:
        return json.loads((Path(directory) / "metadata.json").read_text())
    except (OSError, ValueError):
        return {}


def convert_preset(name, checkpoint):
    """Converts preset `name`'s downloaded checkpoint with the preset's architecture and names."""
    from keras_solov2.convert import convert

    spec = PRESETS[name]
    return convert(
        checkpoint,
        architecture=spec["architecture"],
        class_names=spec.get("class_names", COCO_CLASSES),
        **spec.get("config", {}),
    )


def _with_num_classes(model, num_classes, class_names=None):
    """A copy of `model` with `num_classes` classes: a new, randomly
    initialised class-logit conv (`instance_head.conv_cls`), every other
    weight (BN statistics included) copied."""
    from keras_solov2.models.solov2 import SOLOv2

    config = model.get_config()
    config.update(num_classes=int(num_classes), class_names=class_names)
    new = SOLOv2.from_config(config)
    skip_old = {id(v) for v in model.instance_head.conv_cls.weights}
    skip_new = {id(v) for v in new.instance_head.conv_cls.weights}
    old_vars = [v for v in model.weights if id(v) not in skip_old]
    new_vars = [v for v in new.weights if id(v) not in skip_new]
    if len(old_vars) != len(new_vars) or any(a.shape != b.shape for a, b in zip(old_vars, new_vars)):
        raise RuntimeError("internal error: the re-built model's weights do not line up with the original's.")
    for src, dst in zip(old_vars, new_vars):
        dst.assign(src)
    return new


def from_preset(cls, preset, num_classes=None, load_weights=True, class_names=None, **kwargs):
    """A `SOLOv2` from a preset name, a preset folder or an mmdet `.pth` file.

    Args:
        cls: the model class (`SOLOv2`); named presets without weights are
            built with `cls.from_architecture`.
        preset: a key of `PRESETS` (downloaded once, converted once, then
            loaded from the cache), a folder written by `save_to_preset`, or
            a local mmdetection SOLOv2 checkpoint (`*.pth`; torch needed),
            or a `.keras` file saved by `model.save` (loaded with
            `safe_mode=True`).
        num_classes: for fine-tuning: a new, randomly initialised class-logit
            conv with this many classes; every other weight is kept.
        load_weights: `False` builds the architecture only (no download).
        class_names: optional names (`num_classes` of them, or as many as the
            preset's classes).
        **kwargs: for `.pth` files, `convert`'s `architecture` and
            `norm_groups`; otherwise any non-shape `SOLOv2` argument
            (`score_thr`, `max_per_img`, `max_candidates`, ...).

    Raises:
        ValueError: unknown or unsupported preset, or a checkpoint mismatch.
        ConnectionError: a named preset is neither cached nor downloadable;
            the message says which URL and where to place the file.
    """
    if isinstance(preset, str) and preset in UNSUPPORTED_PRESETS:
        spec = UNSUPPORTED_PRESETS[preset]
        raise ValueError(
            f"Preset {preset!r} ({spec['mmdet_config']}, mask AP {spec['mask_ap']}) uses deformable "
            f"convolutions, which Keras does not have; it is out of scope. Supported: {sorted(PRESETS)}."
        )
    path = Path(str(preset)).expanduser()
    if isinstance(preset, str) and preset in PRESETS:
        spec = PRESETS[preset]
        if not load_weights:
            model = cls.from_architecture(
                spec["architecture"], class_names=spec.get("class_names", COCO_CLASSES),
                **dict(spec.get("config", {}), **kwargs))
        else:
            cached = converted_preset_dir(preset)
            meta = _read_metadata(cached).get("source", {})
            if not (cached / "model.weights.h5").is_file() or meta.get("converter_version") != CONVERTER_VERSION:
                checkpoint = fetch_checkpoint(preset)
                save_to_preset(convert_preset(preset, checkpoint), cached, metadata={"source": dict(
                    preset=preset, url=spec["url"], sha256=_sha256(checkpoint), mask_ap=spec["mask_ap"],
                    mmdet_config=spec["mmdet_config"], test_scale=spec["test_scale"],
                    converter_version=CONVERTER_VERSION,
                )})
            model = load_preset_dir(cached, **kwargs)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a preset folder (no config.json).")
        model = load_preset_dir(path, load_weights, **kwargs)
    elif path.suffix == ".keras":
        import keras

        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist.")
        loaded = keras.saving.load_model(path, safe_mode=True)
        model = loaded
        if kwargs or not load_weights:
            model = type(loaded).from_config(dict(loaded.get_config(), **kwargs))
            if load_weights:  # overrides are non-shape settings: the weights line up
                model.set_weights(loaded.get_weights())
    elif path.suffix == ".pth" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist.")
        from keras_solov2.convert import convert

        if load_weights:
            model = convert(path, **kwargs)
        else:
            from keras_solov2.convert import build_model, infer_config, load_state_dict

            config = infer_config(load_state_dict(path), norm_groups=kwargs.pop("norm_groups", None) or 32)
            config["architecture"] = kwargs.pop("architecture", None) or config["architecture"]
            model = build_model(config, **kwargs)
    else:
        raise ValueError(
            f"Unknown preset {preset!r}: expected one of {sorted(PRESETS)}, a preset folder, or a .pth file."
        )
    if num_classes is not None and int(num_classes) != model.num_classes:
        return _with_num_classes(model, num_classes, class_names)
    if class_names is not None:
        if len(class_names) != model.num_classes:
            raise ValueError(f"{len(class_names)} class_names for a model with {model.num_classes} classes.")
        model.class_names = [str(c) for c in class_names]
    return model
