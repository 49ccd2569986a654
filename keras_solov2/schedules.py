"""mmdetection's SOLOv2 learning-rate schedule as a Keras `LearningRateSchedule`."""

import keras
from keras import ops

# mmdet's `MultiStepLR` milestones (epochs) of the 1x and 3x SOLOv2 configs.
SCHEDULES = {"1x": (12, [8, 11]), "3x": (36, [27, 33])}


@keras.saving.register_keras_serializable(package="keras_solov2")
class WarmupMultiStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up then step decay, in optimizer steps (mmdet LinearLR + MultiStepLR).

    `lr(step) = base_lr * warm(step) * gamma ** (number of milestones <= step)`
    with `warm(step) = warmup_ratio + (1 - warmup_ratio) * min(step, warmup_steps) / warmup_steps`.

    Args:
        base_lr: float, the peak learning rate.
        milestones: list of int steps at which the rate is multiplied by `gamma`.
        gamma: float, the decay factor (0.1).
        warmup_steps: int, linear warm-up length in steps (mmdet: 500).
        warmup_ratio: float, the starting fraction of `base_lr` (mmdet: 1/3).

    Example:
    >>> s = WarmupMultiStepDecay(0.01, milestones=[100], warmup_steps=10)
    >>> [round(float(s(i)), 5) for i in (0, 10, 100)]
    [0.00333, 0.01, 0.001]
    """

    def __init__(self, base_lr, milestones, gamma=0.1, warmup_steps=500, warmup_ratio=1.0 / 3):
        self.base_lr = float(base_lr)
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)
        self.warmup_steps = int(warmup_steps)
        self.warmup_ratio = float(warmup_ratio)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        if self.warmup_steps > 0:
            progress = ops.minimum(step, float(self.warmup_steps)) / float(self.warmup_steps)
            warm = self.warmup_ratio + (1.0 - self.warmup_ratio) * progress
        else:
            warm = 1.0
        passed = sum(ops.cast(step >= float(m), "float32") for m in self.milestones) if self.milestones else 0.0
        return self.base_lr * warm * ops.power(self.gamma, passed)

    def get_config(self):
        return {
            "base_lr": self.base_lr,
            "milestones": self.milestones,
            "gamma": self.gamma,
            "warmup_steps": self.warmup_steps,
            "warmup_ratio": self.warmup_ratio,
        }


def solov2_schedule(global_batch_size, steps_per_epoch, schedule="1x", base_lr=0.01,
                    warmup_steps=500, warmup_ratio=1.0 / 3):
    """mmdet's SOLOv2 schedule for a given batch: lr 0.01 per 16 images, linearly scaled.

    Args:
        global_batch_size: images per optimizer step over all replicas.
        steps_per_epoch: optimizer steps per epoch.
        schedule: `"1x"` (12 epochs, ×0.1 at 8 and 11) or `"3x"` (36 epochs,
            ×0.1 at 27 and 33).
        base_lr: learning rate for 16 images.

    Returns:
        `(WarmupMultiStepDecay, epochs)`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}.")
    epochs, milestones = SCHEDULES[schedule]
    lr = base_lr * global_batch_size / 16.0
    return (
        WarmupMultiStepDecay(lr, [m * steps_per_epoch for m in milestones], 0.1, warmup_steps, warmup_ratio),
        epochs,
    )
