"""Data: COCO-format instance masks for SOLOv2 as tf.data pipelines, and importers.

Data code never imports model code.
"""

from keras_solov2.data.coco_builder import SOLOv2CocoConfig, SOLOv2Coco
from keras_solov2.data.coco_folder import (
    COCOFolderInfo,
    EpochTracker,
    describe,
    load_coco,
    make_dataset,
    make_tfds_dataset,
    split_ids,
)
from keras_solov2.data.transforms import PhotoMetricDistortion
from keras_solov2.data.importers import FORMATS, import_dataset

__all__ = [
    "COCOFolderInfo",
    "EpochTracker",
    "SOLOv2CocoConfig",
    "SOLOv2Coco",
    "FORMATS",
    "PhotoMetricDistortion",
    "describe",
    "import_dataset",
    "load_coco",
    "make_dataset",
    "make_tfds_dataset",
    "split_ids",
]
