"""Training and evaluation runs for the CLI: `keras-solov2 demo | train | evaluate`.

`train` wires the standard Keras callbacks: `BackupAndRestore` (a killed run
resumes from its last epoch boundary, weights and optimizer state included,
the LR schedule being a function of the restored step), `TerminateOnNaN`,
`COCOMaskMAP` (adds `val_mask_AP*` to the logs), `ModelCheckpoint` on
`val_mask_AP` (atomic saves), `CSVLogger`, and `TensorBoard` when the
tensorboard package is installed.
"""

import argparse
import importlib.util
import json
from pathlib import Path

from keras_solov2.atomic_files import write_json_atomically
from keras_solov2.checks import positive_int


def _data_args(p):
    p.add_argument("--annotations", required=True, help="COCO instances JSON")
    p.add_argument("--images", required=True, help="image root folder of the JSON's file_names")
    p.add_argument("--scale", default="1333,800",
                   help="keep-ratio resize LONG,SHORT (mmdet style); several separated by ';' for "
                        "multi-scale training, e.g. '1333,800;1333,768;1333,736;1333,704;1333,672;1333,640' "
                        "(mmdet's 3x); evaluation uses the first")
    p.add_argument("--max-instances", type=_positive_int, default=100,
                   help="the most instances kept per image, the first ones (a warning names each image over it)")


def _scale(text):
    """`"1333,800"` → `(1333, 800)`; `"1333,800;1333,640"` → a list of pairs."""
    try:
        pairs = [tuple(int(v) for v in part.split(",")) for part in text.split(";") if part.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"--scale {text!r}: expected LONG,SHORT or LONG,SHORT;LONG,SHORT;...")
    return pairs[0] if len(pairs) == 1 else pairs


def train(model, info, train_ids, val_ids, output_dir, epochs=12, batch_size=2, scale=(1333, 800),
          max_instances=100, schedule="1x", eval_every=1, base_lr=0.01, warmup_steps=500,
          steps_per_epoch=None, seed=0, optimizer=None, callbacks=None, crop_size=None,
          crop_type="absolute", photometric_distortion=None, micro_batch_size="auto", step_executor="parallel"):
    """`model.fit` with mmdet's optimiser/schedule and the standard callbacks.

    A run killed at any point resumes (same command, same `output_dir`)
    from its last epoch boundary with the weights, optimizer state, LR and
    data position it had there. Use `steps_per_epoch` to make epochs (and
    so backups) shorter than a pass over the data. (Keras's integer
    `save_freq` restores mid-epoch weights but restarts that epoch's data,
    which would repeat batches; epoch-sized backups resume exactly.)
    `scale`, `crop_size`, `crop_type` and `photometric_distortion` are
    `make_dataset`'s; `micro_batch_size` and `step_executor` are
    `SOLOv2.compile`'s (the same update from a batch's micro-batches, in
    less memory; `"sequential"`: the step's ops one at a time on the CPU,
    less memory, slower where the ops are small).

    `output_dir` gets `split.json` (the image ids of each split, written
    once every image has been checked, before training), `backup/`,
    `log.csv`, `best.keras` (with validation images), `final.keras` and,
    with tensorboard installed, `tensorboard/`.
    """
    import keras

    from keras_solov2.callbacks import COCOMaskMAP
    from keras_solov2.data.coco_folder import EpochTracker, make_dataset
    from keras_solov2.schedules import WarmupMultiStepDecay, solov2_schedule

    steps = steps_per_epoch or max(1, len(train_ids) // batch_size)
    tracker = EpochTracker()
    # Everything that checks its input first (both datasets check every
    # image): a run that stops on a missing file or a bad argument should
    # leave no output folder behind.
    train_ds = make_dataset(info, train_ids, scale=scale, batch_size=batch_size,
                            max_instances=max_instances, training=True, shuffle_seed=seed,
                            steps_per_epoch=steps, epoch_tracker=tracker, crop_size=crop_size,
                            crop_type=crop_type, photometric_distortion=photometric_distortion)
    val_ds = make_dataset(info, val_ids, scale=scale, batch_size=batch_size, max_instances=max_instances,
                          training=False) if val_ids else None
    lr, default_epochs = solov2_schedule(batch_size, steps, schedule, base_lr, warmup_steps)
    if epochs != default_epochs:  # keep mmdet's milestones at the same fractions
        fractions = [m / (default_epochs * steps) for m in lr.milestones]
        lr = WarmupMultiStepDecay(lr.base_lr, [int(f * epochs * steps) for f in fractions],
                                  warmup_steps=min(warmup_steps, steps * epochs // 4))
    model.compile(optimizer or keras.optimizers.SGD(lr, momentum=0.9), micro_batch_size=micro_batch_size,
                  step_executor=step_executor)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out / "split.json", {"train": [int(i) for i in train_ids],
                                                 "val": [int(i) for i in val_ids or ()]})
    callbacks = [keras.callbacks.BackupAndRestore(str(out / "backup")), tracker.as_callback(),
                 keras.callbacks.TerminateOnNaN()] + list(callbacks or [])
    if val_ids:
        callbacks.append(COCOMaskMAP(val_ds, info.annotation_file, info.label_to_category_id,
                                     every_n_epochs=eval_every))
        callbacks.append(keras.callbacks.ModelCheckpoint(str(out / "best.keras"), monitor="val_mask_AP",
                                                         mode="max", save_best_only=True))
    callbacks.append(keras.callbacks.CSVLogger(str(out / "log.csv"), append=True))
    if importlib.util.find_spec("tensorboard") is not None:
        callbacks.append(keras.callbacks.TensorBoard(str(out / "tensorboard")))
    # The stream is shuffled by make_dataset (seeded, resumable); fit's shuffle only warns on a Dataset.
    history = model.fit(train_ds, epochs=epochs, callbacks=callbacks, verbose=2, shuffle=False)
    model.save(out / "final.keras")
    return history


def _positive_int(text):
    """argparse type: `checks.positive_int` of the option's text."""
    try:
        return positive_int("value", int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None


def _micro_batch_size(text):
    """argparse type of `--micro-batch-size`: `auto`, `none` or a positive int."""
    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    try:
        return positive_int("value", int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, none or a positive integer, got {text!r}") from None


def _pair(text):
    if text is None:
        return None
    try:
        a, b = text.split(",")
        return (float(a), float(b)) if "." in text else (int(a), int(b))
    except ValueError:
        raise ValueError(f"--crop-size {text!r}: expected two numbers, H,W (pixels) or h,w (fractions).") from None


def _cmd_train(args):
    import keras

    from keras_solov2.cli import _load_model
    from keras_solov2.data.coco_folder import describe, split_ids

    scale, crop_size = _scale(args.scale), _pair(args.crop_size)  # the options first: they fail fast
    info = describe(args.annotations, args.images)
    train_ids, val_ids = split_ids(info.image_ids, args.val_fraction, args.seed)
    # Layers built here (an architecture, or a new class-logit conv) start
    # from the same random weights for the same --seed.
    keras.utils.set_random_seed(args.seed)
    model = _load_model(args.model, num_classes=info.num_classes, class_names=info.class_names)
    print(f"{len(train_ids)} training / {len(val_ids)} validation images, {info.num_classes} classes")
    train(model, info, train_ids, val_ids, args.output, args.epochs, args.batch_size,
          scale, args.max_instances, args.schedule,
          steps_per_epoch=args.steps_per_epoch, seed=args.seed, eval_every=args.eval_every,
          crop_size=crop_size, crop_type=args.crop_type, photometric_distortion=args.photometric,
          micro_batch_size=args.micro_batch_size, step_executor=args.step_executor)


def _cmd_evaluate(args):
    from keras_solov2.cli import _load_model
    from keras_solov2.data.coco_folder import describe, make_dataset
    from keras_solov2.evaluation import evaluate_coco

    scale = _scale(args.scale)
    info = describe(args.annotations, args.images)
    model = _load_model(args.model)
    ds = make_dataset(info, scale=scale, batch_size=args.batch_size,
                      max_instances=args.max_instances, training=False)
    stats = evaluate_coco(model, ds, info.annotation_file, info.label_to_category_id, verbose=True)
    print(json.dumps({"mask_" + k: v for k, v in stats.items()}, indent=1))


def _cmd_demo(args):
    from keras_solov2.demo import run_demo

    run_demo(args.output, epochs=args.epochs)


def add_subcommands(sub):
    p = sub.add_parser("demo", help="offline demo: train a light SOLOv2 on synthetic shapes, print mask AP")
    p.add_argument("--output", default="solov2_demo")
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train", help="train on a COCO JSON + image folder (resumes from OUTPUT/backup)")
    _data_args(p)
    p.add_argument("--model", default="solov2_light_r18",
                   help="architecture name, preset, .pth or .keras to start from")
    p.add_argument("--output", default="solov2_run")
    p.add_argument("--epochs", type=_positive_int, default=12)
    p.add_argument("--batch-size", type=_positive_int, default=2)
    p.add_argument("--micro-batch-size", type=_micro_batch_size, default="auto",
                   help="images per forward/backward pass within a step: the same update as the whole "
                        "batch in less memory (needs norm_eval, as the presets have); none: the whole batch; "
                        "auto (default): one image per pass in float32 on the CPU when padded images have at "
                        "least 512x512 pixels, else the whole batch")
    p.add_argument("--step-executor", default="parallel", choices=["parallel", "sequential"],
                   help="how the train step's ops run: independent ones at once (TensorFlow's default) or one "
                        "at a time on the CPU (less memory than one pass; slower on small images; runs no "
                        "micro-batches, so for float32 images of 512x512 and more the default uses less)")
    p.add_argument("--schedule", default="1x", choices=["1x", "3x"])
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="fraction of the images held out for the validation mask AP, in [0, 1) (0: none)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the train/validation split, the data order and augmentation, and the "
                        "random initial weights of the layers the run builds")
    p.add_argument("--crop-size", default=None,
                   help="random crop H,W before the resize (pixels, or fractions with --crop-type relative*)")
    p.add_argument("--crop-type", default="absolute",
                   choices=["absolute", "absolute_range", "relative", "relative_range"])
    p.add_argument("--photometric", action="store_true", help="mmdet's PhotoMetricDistortion")
    p.add_argument("--eval-every", type=_positive_int, default=1, help="COCO mask mAP every N epochs")
    p.add_argument("--steps-per-epoch", type=_positive_int, default=None,
                   help="batches per epoch (= backup interval); default one pass over the images")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="COCO mask mAP of a model on a COCO JSON + image folder")
    _data_args(p)
    p.add_argument("--model", required=True)
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.set_defaults(func=_cmd_evaluate)
