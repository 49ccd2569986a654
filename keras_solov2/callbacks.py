"""Keras callbacks for SOLOv2 training."""

import keras

from keras_solov2.checks import positive_int
from keras_solov2.evaluation import evaluate_coco


class COCOMaskMAP(keras.callbacks.Callback):
    """Logs COCO mask mAP (`val_mask_AP`, `_AP50`, `_AP75`, `_APs/_APm/_APl`).

    Runs the model over an evaluation dataset every `every_n_epochs` epochs,
    scores it with pycocotools against the COCO JSON, and writes the metrics
    into the epoch's `logs`, so `ModelCheckpoint(monitor="val_mask_AP",
    mode="max")`, `EarlyStopping` and TensorBoard see them. Place it before
    those callbacks in the list.

    Args:
        dataset: evaluation batches (see `keras_solov2.evaluation`).
        coco_gt: path of the ground-truth COCO JSON or a pycocotools `COCO`.
        label_to_category_id: contiguous label → COCO `category_id`.
        every_n_epochs: int.
        prefix: key prefix, default `"val_mask_"`.
        max_batches: optional cap for quick checks.
        backend: `"pycocotools"` or `"faster_coco_eval"` (if installed).

    Example:
    ```python
    model.fit(train_ds, epochs=12, callbacks=[
        COCOMaskMAP(val_ds, "annotations/instances_val2017.json", label_to_cat),
        keras.callbacks.ModelCheckpoint("best.keras", monitor="val_mask_AP", mode="max"),
    ])
    ```
    """

    def __init__(self, dataset, coco_gt, label_to_category_id, every_n_epochs=1,
                 prefix="val_mask_", max_batches=None, backend="pycocotools"):
        super().__init__()
        self.dataset = dataset
        self.coco_gt = coco_gt
        self.label_to_category_id = label_to_category_id
        self.every_n_epochs = positive_int("every_n_epochs", every_n_epochs)
        self.prefix = prefix
        self.max_batches = max_batches
        self.backend = backend
        self.history = []

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        stats = evaluate_coco(
            self.model, self.dataset, self.coco_gt, self.label_to_category_id, self.max_batches,
            backend=self.backend,
        )
        stats = {self.prefix + k: v for k, v in stats.items()}
        self.history.append((epoch, stats))
        if logs is not None:
            logs.update(stats)
