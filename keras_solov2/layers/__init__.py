"""Public SOLOv2 layers."""

from keras_solov2.layers.coord_conv import CoordConv
from keras_solov2.layers.dynamic_mask_conv import DynamicMaskConv
from keras_solov2.layers.matrix_nms import MatrixNMS

__all__ = ["CoordConv", "DynamicMaskConv", "MatrixNMS"]
