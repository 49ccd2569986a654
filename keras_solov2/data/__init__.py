"""Data: COCO-format instance masks for SOLOv2 (tf.data)."""
