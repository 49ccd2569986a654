"""SOLOv2 models: the task model, its parts and named architectures."""

from keras_solov2.models.architectures import ARCHITECTURES
from keras_solov2.models.feature_pyramid import SOLOv2FeaturePyramid
from keras_solov2.models.instance_head import SOLOv2InstanceHead
from keras_solov2.models.mask_feature_head import SOLOv2MaskFeatureHead
from keras_solov2.models.solov2 import SOLOv2

__all__ = [
    "ARCHITECTURES",
    "SOLOv2",
    "SOLOv2FeaturePyramid",
    "SOLOv2InstanceHead",
    "SOLOv2MaskFeatureHead",
]
