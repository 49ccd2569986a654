"""mmdetection SOLOv2 checkpoints → Keras (and back, for checks and export).

`convert(path_or_state_dict)` returns a `SOLOv2` with the checkpoint's
weights; `keras-solov2 convert SOURCE OUTPUT` does the same from the shell.
"""

from keras_solov2.convert.command import add_convert_subcommand, convert_main
from keras_solov2.convert.mmdet_checkpoint import (
    build_model,
    class_names_from_meta,
    convert,
    infer_config,
    load_checkpoint,
    load_into_model,
    load_state_dict,
    model_to_state_dict,
    to_numpy_state_dict,
    weight_map,
)

__all__ = [
    "add_convert_subcommand",
    "build_model",
    "class_names_from_meta",
    "convert",
    "convert_main",
    "infer_config",
    "load_checkpoint",
    "load_into_model",
    "load_state_dict",
    "model_to_state_dict",
    "to_numpy_state_dict",
    "weight_map",
]
