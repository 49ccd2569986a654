"""`SOLOv2`: the model, its training step (targets, focal + dice loss) and inference."""

import sys
import warnings

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_solov2 import losses, postprocess, targets
from keras_solov2.atomic_files import write_directory_atomically, write_file_atomically
from keras_solov2.backward_stages import BackwardStages
from keras_solov2.checks import number_in_range, positive_int
from keras_solov2.gather import take_rows
from keras_solov2.heap_trim import after_heap_trim
from keras_solov2.layers.dynamic_mask_conv import DynamicMaskConv
from keras_solov2.layers.matrix_nms import MatrixNMS
from keras_solov2.layers.resize import resize_bilinear
from keras_solov2.models.architectures import ARCHITECTURES, STANDARD_HEAD
from keras_solov2.models.backbone import (
    build_resnet_backbone,
    checkpointed_extractor,
    frozen_stage_layers,
    pyramid_extractor,
)
from keras_solov2.models.batch_norm_folding import fold_batch_norms
from keras_solov2.models.feature_pyramid import SOLOv2FeaturePyramid
from keras_solov2.models.instance_head import SOLOv2InstanceHead
from keras_solov2.models.mask_feature_head import SOLOv2MaskFeatureHead
from keras_solov2.step_executor import check_step_executor, sequential

# mmdet's data preprocessor (RGB order), applied inside the model so exported
# graphs take raw pixels.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
SIZE_DIVISOR = 32
# compile(micro_batch_size="auto"): padded pixels per image from which a
# batch runs one image per forward and backward pass. In float32 on the CPU
# that cost 0–7 % step time at 512² (R50) and 0–3 % at 800×1344 (light R18),
# but 11 % at 384² (one run), where it saves less.
AUTO_MICRO_BATCH_PIXELS = 512 * 512
# Keras's compile arguments for a loss computed from `y` and `y_pred`: SOLOv2
# computes its own.
_KERAS_LOSS_ARGUMENTS = ("loss", "loss_weights", "metrics", "weighted_metrics")


@keras.saving.register_keras_serializable(package="keras_solov2")
class SOLOv2(keras.Model):
    """SOLOv2 instance segmentation (Wang et al., NeurIPS 2020), as mmdetection 3.3.

    Backbone (keras-hub ResNet) → FPN (P2–P6) → instance head (per-level S×S
    category logits and dynamic kernels) + unified mask features (stride 4).
    Training matches mmdet's `SOLOV2Head.loss_by_feat`; inference matches
    `predict_by_feat` (points-NMS, maskness, Matrix NMS).

    Args:
        backbone: `"resnet18" | "resnet34" | "resnet50" | "resnet101"` (a
            randomly initialised keras-hub `ResNetBackbone`) or any keras-hub
            backbone instance with `pyramid_outputs` P2–P5.
        num_classes: int, number of foreground classes.
        num_grids: S per level.
        scale_ranges: inclusive `(lo, hi)` instance scales per level, pixels.
        strides: per-level stride, for the `area > stride` mask filter.
        pos_scale: fraction of the box side around the centre that is positive.
        fpn_channels: FPN width (mmdet `in_channels` of the head).
        feat_channels, stacked_convs: instance-head tower width and depth.
        mask_feat_channels, mask_out_channels: mask-feature branch hidden
            width and E (the dynamic kernel length).
        norm_groups: GroupNorm groups in the head and mask branch.
        frozen_stages: backbone stages frozen (stem + this many stages; -1:
            none), mmdet's `frozen_stages=1`.
        norm_eval: keep backbone BatchNorm statistics frozen while training
            (γ/β still train), mmdet's `norm_eval=True`. The backbone then
            trains, as it always predicts, with each BatchNorm folded into
            the conv before it (`models/batch_norm_folding.py`).
        with_cp: mmdet's ResNet `with_cp`: in training, each trainable
            backbone stage keeps only its input for the backward pass and
            recomputes its activations there (`keras.remat`; these stages
            keep their BatchNorms). R50, batch 2, 512²: 0.17–0.45 GB less
            peak memory in float32 for −3 to +15 % step time, 0.06–0.16 GB
            in bfloat16 for 13–25 % more (`benchmarks/bench_solov2.py
            --with-cp`). Needs `norm_eval=True`: the recomputation runs
            BatchNorm again.
        winograd: where it pays (float32 on CPU), the 3×3 convs after the
            backbone (FPN outputs, mask branch, head towers; a head layer's
            5 levels in one go) run by Winograd F(4×4, 3×3)
            (`keras_solov2/winograd.py`): the same convolution, relative
            error ≈ 2e-5, the convs ≈ 2× faster (the R50 float32 train step
            ≈ 1.6–1.7×, 512² predict ≈ 1.4×). `False`: direct convs
            everywhere.
        score_thr, mask_thr, filter_thr, nms_pre, max_per_img, kernel, sigma:
            mmdet's test_cfg.
        max_candidates: static cap on (cell, class) candidates above
            `score_thr` that get masks at inference.
        max_pos_pairs: cap on positive (instance, cell) pairs per image
            whose masks enter the dice loss in a step. Past it, a random
            subset of that size is used and its mean is scaled to the full
            count (an unbiased estimate of mmdet's sum); the category loss
            always uses every cell. Without XLA a step computes masks only
            for the pairs of its image that has most (and targets only for
            the instance slots in use); under `jit_compile=True` shapes are
            static: every slot and `max_pos_pairs` masks per image.
        focal_alpha, focal_gamma, loss_cls_weight, loss_mask_weight: loss
            settings (mmdet: 0.25, 2.0, 1.0, 3.0).
        class_names: optional list of `num_classes` names.

    Inputs are RGB pixel values in [0, 255], float `(B, H, W, 3)` with H, W
    multiples of 32; normalisation (mmdet mean/std) happens inside.
    `model(images)` returns `{"cls_logits": [L × (B, S, S, C)] logits,
    "kernels": [L × (B, S, S, E)], "mask_features": (B, H/4, W/4, E)}`.

    Example:
    >>> import numpy as np
    >>> model = SOLOv2.from_architecture("solov2_light_r18", num_classes=3)
    >>> out = model.predict(np.zeros((1, 64, 96, 3), "float32"), verbose=0)
    >>> out["masks"].shape, out["scores"].shape
    ((1, 100, 64, 96), (1, 100))
    """

    def __init__(
        self,
        backbone="resnet50",
        num_classes=80,
        num_grids=STANDARD_HEAD["num_grids"],
        scale_ranges=STANDARD_HEAD["scale_ranges"],
        strides=STANDARD_HEAD["strides"],
        pos_scale=0.2,
        fpn_channels=256,
        feat_channels=512,
        stacked_convs=4,
        mask_feat_channels=128,
        mask_out_channels=256,
        norm_groups=32,
        frozen_stages=1,
        norm_eval=True,
        with_cp=False,
        winograd=True,
        score_thr=0.1,
        mask_thr=0.5,
        filter_thr=0.05,
        nms_pre=500,
        max_per_img=100,
        kernel="gaussian",
        sigma=2.0,
        max_candidates=1000,
        max_pos_pairs=256,
        focal_alpha=0.25,
        focal_gamma=2.0,
        loss_cls_weight=1.0,
        loss_mask_weight=3.0,
        class_names=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        num_classes = positive_int("num_classes", num_classes)
        for name, value in (("max_per_img", max_per_img), ("max_candidates", max_candidates),
                            ("max_pos_pairs", max_pos_pairs)):
            # Static sizes of padded outputs and caps (MatrixNMS's `<= 0`:
            # "keep all" has no static size here).
            positive_int(name, value)
        number_in_range("score_thr", score_thr, 0.0, 1.0, "a category score, after the sigmoid")
        number_in_range("mask_thr", mask_thr, 0.0, 1.0, "a mask probability, after the sigmoid")
        number_in_range("pos_scale", pos_scale, 0.0, 1.0, "the fraction of a mask's size that is its centre region")
        if isinstance(backbone, str):
            backbone = build_resnet_backbone(backbone, dtype=self.dtype_policy)
        if len(num_grids) != 5 or len(scale_ranges) != 5 or len(strides) != 5:
            raise ValueError(
                "SOLOv2 has 5 levels: num_grids, scale_ranges and strides need "
                f"5 entries each, got {num_grids}, {scale_ranges}, {strides}."
            )
        if with_cp and not norm_eval:
            raise ValueError(
                "with_cp=True needs norm_eval=True: recomputing a stage in the "
                "backward pass would run BatchNorm's training-mode update of its "
                "running statistics a second time."
            )
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} names for num_classes={num_classes}."
            )
        self.backbone = backbone
        self.num_classes = int(num_classes)
        # Lists, so that a JSON round trip of the config compares equal.
        self.num_grids = [int(s) for s in num_grids]
        self.scale_ranges = [[float(lo), float(hi)] for lo, hi in scale_ranges]
        self.strides = [int(s) for s in strides]
        self.pos_scale = float(pos_scale)
        self.fpn_channels = int(fpn_channels)
        self.feat_channels = int(feat_channels)
        self.stacked_convs = int(stacked_convs)
        self.mask_feat_channels = int(mask_feat_channels)
        self.mask_out_channels = int(mask_out_channels)
        self.norm_groups = int(norm_groups)
        self.frozen_stages = int(frozen_stages)
        self.norm_eval = bool(norm_eval)
        self.with_cp = bool(with_cp)
        self.winograd = bool(winograd)
        self.score_thr = float(score_thr)
        self.mask_thr = float(mask_thr)
        self.filter_thr = float(filter_thr)
        self.nms_pre = int(nms_pre)
        self.max_per_img = int(max_per_img)
        self.kernel = kernel
        self.sigma = float(sigma)
        self.max_candidates = int(max_candidates)
        self.max_pos_pairs = int(max_pos_pairs)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.loss_cls_weight = float(loss_cls_weight)
        self.loss_mask_weight = float(loss_mask_weight)
        self.class_names = None if class_names is None else [str(c) for c in class_names]

        self.feature_extractor = pyramid_extractor(backbone)
        for layer in frozen_stage_layers(backbone, self.frozen_stages):
            layer.trainable = False
        # Where BatchNorm runs in inference mode (predict; training under
        # norm_eval) the backbone runs with each BatchNorm folded into its
        # conv: the same weights, one fused conv kernel instead of three
        # passes over the map (R50 b2 512² bf16 step −10 %, −0.27 GB RSS).
        # with_cp keeps the BatchNorms: recomputing folded stages saved no
        # memory (bf16 tensor peak 1,222 → 1,199 MiB; 1,120 with BatchNorm).
        # Plain functions: their models share the backbone's layers and must
        # not be tracked (saved) a second time.
        folded, _ = fold_batch_norms(self.feature_extractor)
        self._inference_extractor = lambda x: folded(x, training=False)  # noqa: E731
        self._checkpointed_extractor = (
            checkpointed_extractor(self.feature_extractor, self.frozen_stages) if self.with_cp else None
        )
        self.neck = SOLOv2FeaturePyramid(
            self.fpn_channels, winograd=self.winograd, dtype=self.dtype_policy, name="neck"
        )
        self.instance_head = SOLOv2InstanceHead(
            num_classes=self.num_classes,
            num_grids=self.num_grids,
            feat_channels=self.feat_channels,
            stacked_convs=self.stacked_convs,
            kernel_out_channels=self.mask_out_channels,
            norm_groups=self.norm_groups,
            winograd=self.winograd,
            dtype=self.dtype_policy,
            name="instance_head",
        )
        self.mask_feature_head = SOLOv2MaskFeatureHead(
            feat_channels=self.mask_feat_channels,
            out_channels=self.mask_out_channels,
            norm_groups=self.norm_groups,
            winograd=self.winograd,
            dtype=self.dtype_policy,
            name="mask_feature_head",
        )
        # Under a mixed policy the per-pixel dot products run in the compute
        # dtype (bfloat16 halves post-processing on CPUs with native bf16);
        # every loss and score is still computed in float32.
        self.dynamic_conv = DynamicMaskConv(dtype=self.dtype_policy, name="dynamic_conv")
        self.matrix_nms = MatrixNMS(
            kernel=kernel,
            sigma=sigma,
            filter_thr=filter_thr,
            nms_pre=nms_pre,
            max_per_img=max_per_img,
            name="matrix_nms",
        )
        self.seed_generator = keras.random.SeedGenerator(0)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.loss_cls_tracker = keras.metrics.Mean(name="loss_cls")
        self.loss_mask_tracker = keras.metrics.Mean(name="loss_mask")
        self.weight_decay = 0.0
        self.grad_clip_norm = None
        self.micro_batch_size = None
        self.build()

    # ------------------------------------------------------------------ build
    def build(self, input_shape=None):
        if self.neck.built:
            self.built = True
            return
        channels = [t.shape[-1] for t in self.feature_extractor.outputs]
        self.neck.build([(None, None, None, c) for c in channels])
        fpn = [(None, None, None, self.fpn_channels)] * 5
        self.instance_head.build(fpn)
        self.mask_feature_head.build(fpn[:4])
        self.built = True

    @classmethod
    def from_architecture(cls, name, **kwargs):
        """A randomly initialised model of a named mmdet architecture.

        Args:
            name: one of `keras_solov2.models.ARCHITECTURES`: `"solov2_r50"`,
                `"solov2_r101"`, `"solov2_light_r18"`, `"solov2_light_r34"`,
                `"solov2_light_r50"`.
            **kwargs: overrides of any constructor argument.
        """
        if name not in ARCHITECTURES:
            raise ValueError(
                f"Unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}."
            )
        return cls(**dict(ARCHITECTURES[name], **kwargs))

    @classmethod
    def from_preset(cls, preset, num_classes=None, load_weights=True, **kwargs):
        """A model from a preset name, a preset folder or an mmdet `.pth` file.

        Args:
            preset: one of `keras_solov2.models.presets.PRESETS`
                (`"resnet50_coco"`, `"resnet50_1x_coco"`, `"resnet101_coco"`,
                `"light_resnet{18,34,50}_coco"`: mmdet's COCO weights,
                downloaded once and converted), a folder written by
                `save_to_preset`, or a local mmdetection checkpoint.
            num_classes: for fine-tuning: a new class-logit conv (randomly
                initialised); every other weight is kept.
            load_weights: `False` builds the architecture only.
        """
        from keras_solov2.models import presets

        return presets.from_preset(cls, preset, num_classes=num_classes, load_weights=load_weights, **kwargs)

    def save_to_preset(self, directory):
        """Writes keras-hub's preset layout (`config.json`, `model.weights.h5`,
        `metadata.json`) atomically; `from_preset(directory)` reads it back."""
        from keras_solov2.models import presets

        return presets.save_to_preset(self, directory)

    # ---------------------------------------------------------------- forward
    def call(self, images, training=False, dense_kernels=True):
        """Images → head outputs (see the class docstring).

        Args:
            images: `(B, H, W, 3)` RGB pixels in [0, 255], H and W multiples
                of 32.
            training: BatchNorm in training mode unless `norm_eval`.
            dense_kernels: `False` returns `kernel_feats`, the kernel towers
                `[L × (B, S, S, F)]` (F = `feat_channels`), in place of
                `kernels`: `compute_solov2_loss` and `decode` then evaluate
                the final kernel conv at the cells they read only
                (`SOLOv2InstanceHead.kernels_at`), as `train_step` does.

        Returns:
            Dict `cls_logits` `[L × (B, S, S, C)]` logits, `kernels`
            `[L × (B, S, S, E)]` (or `kernel_feats`) and `mask_features`
            `(B, H/4, W/4, E)`.
        """
        _check_image_shape(images)
        pyramid = self._pyramid(self._normalise(images), training)
        mask_features = self.mask_feature_head(pyramid[:4])
        cls_logits, kernels = self.instance_head(pyramid, dense_kernels=dense_kernels)
        return {
            "cls_logits": cls_logits,
            "kernels" if dense_kernels else "kernel_feats": kernels,
            "mask_features": mask_features,
        }

    def _pyramid(self, x, training):
        """Normalised images → the 5 FPN levels, as `call` runs them."""
        if training and not self.norm_eval:
            feats = self.feature_extractor(x, training=True)
        elif training and self._checkpointed_extractor is not None:
            feats = self._checkpointed_extractor(x)
        else:
            feats = self._inference_extractor(x)
        # Keras 3 keeps the backbone's explicit `training` in the call context:
        # under norm_eval (and with_cp) the layers below see training=False even
        # in fit(). None of them (convs, GroupNorm) behaves differently in
        # training; pass `training` explicitly to any layer added here that does.
        return self.neck(feats)

    def _normalise(self, images):
        """RGB pixels → `(pixel − mean) / std` (mmdet's data preprocessor), compute dtype."""
        dtype = self.compute_dtype
        return (ops.cast(images, dtype) - ops.array(PIXEL_MEAN, dtype)) / ops.array(PIXEL_STD, dtype)

    def pyramid_features(self, x):
        """Normalised images → FPN levels, BatchNorm in inference mode.

        The backbone runs with its BatchNorms folded into the convs
        (`keras_solov2.models.batch_norm_folding`).

        Args:
            x: `(B, H, W, 3)` normalised pixels (`(pixel − mean) / std`),
                compute dtype, H and W multiples of 32.

        Returns:
            List of 5 `(B, H/s, W/s, fpn_channels)` maps, s = 4, 8, 16, 32, 64.
        """
        return self.neck(self._inference_extractor(x))

    def inference_outputs(self, images):
        """What `decode` needs of `call(images, training=False)`, and no more.

        The category branch runs first. A level's kernel tower (half of the
        head's cost) runs only if some cell of that level passes points-NMS
        and `score_thr` in some image of the batch; other levels get zeros.
        With Winograd convs (`SOLOv2InstanceHead.uses_winograd`) the towers
        of all levels run together, if any level needs its own.
        The kernel branch's final conv is left to `decode`, which evaluates
        it at the candidate cells only (`SOLOv2InstanceHead.kernels_at`).
        `decode` of these outputs equals `decode(model(images))` up to
        summation order.

        Args:
            images: `(B, H, W, 3)` RGB pixels, H and W multiples of 32.

        Returns:
            Dict `cls_logits` and `mask_features` as `call`, and
            `kernel_feats`: list over levels of `(B, S, S, F)` kernel-tower
            outputs (F = `feat_channels`), in place of `kernels`.
        """
        pyramid = self.pyramid_features(self._normalise(images))
        mask_features = self.mask_feature_head(pyramid[:4])
        head = self.instance_head
        weights = head.branch_weights(final_kernel_conv=False)
        feats = head.level_features(pyramid)
        cls_logits = head.category_branches(feats, weights)
        needed = [
            ops.any(postprocess.points_nms(ops.sigmoid(ops.cast(logits, "float32"))) > self.score_thr)
            for logits in cls_logits
        ]
        zeros = [ops.zeros((ops.shape(f)[0], f.shape[1], f.shape[2], head.feat_channels), f.dtype) for f in feats]
        # Winograd convs run a layer's levels in one go: one group of all levels.
        levels = list(range(len(feats)))
        groups = [levels] if head.uses_winograd() else [[i] for i in levels]
        kernel_feats = []
        for group in groups:
            kernel_feats += ops.cond(
                ops.any(ops.stack([needed[i] for i in group])),
                lambda g=group: head.kernel_towers([feats[i] for i in g], weights),
                lambda g=group: [zeros[i] for i in g],
            )
        return {"cls_logits": cls_logits, "kernel_feats": kernel_feats, "mask_features": mask_features}

    # ---------------------------------------------------------------- targets
    def assign_targets(self, gt_masks, gt_labels, image_shape=None):
        """Grid targets of one image, as mmdet's `_get_targets_single`.

        Args:
            gt_masks: `(n, H, W)` 0/1 masks at the padded image size.
            gt_labels: `(n,)` int labels (`-1` = ignore).
            image_shape: `(H, W)` padded image size; masks smaller than it
                are zero-padded at the bottom/right.

        Returns:
            List over levels of dicts `labels` `(S, S)` int32 (background =
            `num_classes`) and `positive` `(S*S,)` bool.
        """
        gt_masks = ops.convert_to_tensor(gt_masks)
        if image_shape is not None:
            dh = int(image_shape[0]) - gt_masks.shape[-2]
            dw = int(image_shape[1]) - gt_masks.shape[-1]
            if dh < 0 or dw < 0:
                raise ValueError(
                    f"gt_masks {tuple(gt_masks.shape[-2:])} are larger than image_shape {tuple(image_shape)}."
                )
            gt_masks = ops.pad(gt_masks, [[0, 0], [0, dh], [0, dw]])
        t = self._targets(gt_masks[None], ops.convert_to_tensor(gt_labels)[None])
        return [
            {"labels": labels[0], "positive": positive[0]}
            for labels, positive in zip(t["labels"], t["positive"])
        ]

    def _targets(self, gt_masks, gt_labels):
        return targets.assign_targets(
            gt_masks,
            gt_labels,
            num_classes=self.num_classes,
            num_grids=self.num_grids,
            scale_ranges=self.scale_ranges,
            pos_scale=self.pos_scale,
        )

    # ------------------------------------------------------------------- loss
    def compute_solov2_loss(self, outputs, gt_masks, gt_labels, reduce_num_pos=None):
        """mmdet's `SOLOV2Head.loss_by_feat` on a padded batch.

        Args:
            outputs: `model(images)` outputs (`kernels` per level) or
                `model(images, dense_kernels=False)` (`kernel_feats`: the
                kernels are then computed at the cells the loss reads only).
            gt_masks: `(B, M, H, W)` uint8 {0,1} at the padded image size
                (`H`, `W` may be unknown when traced; `M` may be dynamic
                unless under XLA).
            gt_labels: `(B, M)` int, `-1` for padding / ignored instances.
            reduce_num_pos: optional function of this batch's number of
                positive cells returning the normaliser to use; `train_step`
                passes a sum over replicas so that the replicas' losses add
                up to the loss of the global batch.

        Returns:
            Dict of float32 scalars `loss` (= `loss_cls + loss_mask`),
            `loss_cls` (focal, summed / (num_pos + 1)), `loss_mask` (dice ×
            `loss_mask_weight`, summed over positive pairs / num_pos) and
            `num_pos` (this batch's unique positive cells).
        """
        gt_labels = self._check_labels(gt_labels)
        num_slots = gt_labels.shape[1]  # None: any (without XLA)
        pairs_per_slot = len(self.num_grids) * 9
        k = self.max_pos_pairs if num_slots is None else min(self.max_pos_pairs, num_slots * pairs_per_slot)
        # Without XLA, trim to the slots and pairs this batch uses: slots are
        # padded for the densest image of the dataset (DSB2018: 375 nuclei)
        # while a typical batch uses a fifth of them; the sums are the same.
        dynamic = not self.jit_compile
        if dynamic:
            gt_masks, gt_labels = self._slots_in_use(gt_masks, gt_labels)
        gt_masks = self._check_masks(gt_masks)
        t = self._targets(gt_masks, gt_labels)
        local_pos = ops.cast(t["num_pos"], "float32")
        num_pos = local_pos if reduce_num_pos is None else reduce_num_pos(local_pos)

        # Categories: every cell of every level.
        logits = ops.concatenate(
            [ops.reshape(ops.cast(c, "float32"), (ops.shape(c)[0], -1, self.num_classes)) for c in outputs["cls_logits"]],
            axis=1,
        )
        labels = ops.concatenate(
            [ops.reshape(lab, (ops.shape(lab)[0], -1)) for lab in t["labels"]], axis=1
        )
        onehot = ops.one_hot(labels, self.num_classes + 1)[..., : self.num_classes]
        focal = losses.sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma)
        eps = float(np.finfo(np.float32).eps)
        loss_cls = self.loss_cls_weight * ops.sum(focal) / (num_pos + 1.0 + eps)

        # Masks: positive (instance, cell) pairs, capped per image.
        batch = ops.shape(gt_labels)[0]
        pair_cells = ops.reshape(t["pair_cells"], (batch, -1))
        pair_valid = ops.reshape(t["pair_valid"], (batch, -1))
        if dynamic:
            # The valid pairs of the image that has most (k stays the cap).
            most = ops.max(ops.sum(ops.cast(pair_valid, "int32"), axis=1))
            k = ops.minimum(k, ops.maximum(most, 1))
        noise = keras.random.uniform(ops.shape(pair_valid), seed=self.seed_generator)
        priority = ops.where(pair_valid, 1.0 + noise, 0.0)
        _, chosen = ops.top_k(priority, k=k, sorted=False)
        # Slot order, so the sum does not depend on the noise when the cap
        # does not bind (bit-identical resumed runs).
        chosen = ops.sort(chosen, axis=1)
        chosen_valid = ops.take_along_axis(pair_valid, chosen, axis=1)
        chosen_cells = ops.take_along_axis(pair_cells, chosen, axis=1)
        chosen_slots = chosen // pairs_per_slot

        if "kernels" in outputs:
            kernels = ops.concatenate(
                [ops.reshape(ops.cast(kk, "float32"), (ops.shape(kk)[0], -1, self.mask_out_channels))
                 for kk in outputs["kernels"]],
                axis=1,
            )
            pair_kernels = take_rows(kernels, chosen_cells)
        else:
            # The final kernel conv at the chosen cells only: the loss reads a
            # few hundred of the 3,872 cells (R50 b2 512²: −55 GFLOP a step).
            pair_kernels = ops.cast(
                self.instance_head.kernels_at(outputs["kernel_feats"], chosen_cells), "float32"
            )
        mask_logits = self.dynamic_conv(outputs["mask_features"], pair_kernels)
        mask_targets = targets.rescale_masks(gt_masks)  # (B, M, h, w)
        pair_targets = take_rows(mask_targets, chosen_slots)
        dice = losses.dice_loss(mask_logits, pair_targets) * self.loss_mask_weight
        dice_sum = ops.sum(ops.where(chosen_valid, dice, 0.0))
        total_pairs = ops.sum(ops.cast(pair_valid, "float32"))
        used_pairs = ops.sum(ops.cast(chosen_valid, "float32"))
        dice_sum = dice_sum * total_pairs / ops.maximum(used_pairs, 1.0)
        loss_mask = ops.where(num_pos > 0, dice_sum / ops.maximum(num_pos, 1.0), 0.0)
        return {
            "loss": loss_cls + loss_mask,
            "loss_cls": loss_cls,
            "loss_mask": loss_mask,
            "num_pos": local_pos,
        }

    @staticmethod
    def _slots_in_use(gt_masks, gt_labels):
        """The instance slots up to the last one any image of the batch uses (≥ 1).

        A batch without instances (`M` = 0 when a pipeline pads the slots
        per batch) gets one padding slot: the targets gather a slot per cell.
        """
        rank = ops.arange(1, ops.shape(gt_labels)[1] + 1, dtype="int32")[None]
        used = ops.maximum(ops.max(ops.where(gt_labels >= 0, rank, 0), initial=0), 1)
        missing = used - ops.minimum(ops.shape(gt_labels)[1], used)
        gt_masks = ops.pad(gt_masks[:, :used], [[0, 0], [0, missing], [0, 0], [0, 0]])
        gt_labels = ops.pad(gt_labels[:, :used], [[0, 0], [0, missing]], constant_values=-1)
        return gt_masks, gt_labels

    @staticmethod
    def _check_masks(gt_masks):
        # 0/255 masks (a PNG's) would train on dilated targets: the stride-4
        # rescale counts any nonzero tap.
        if gt_masks.dtype == tf.bool:
            return gt_masks
        check = tf.debugging.assert_less_equal(
            ops.max(gt_masks), ops.cast(1, gt_masks.dtype),
            message="gt_masks must hold 0/1 (a mask read from a 0/255 PNG: divide it by 255)",
        )
        with tf.control_dependencies([check]):
            return tf.identity(gt_masks)

    def _check_labels(self, gt_labels):
        if not tf.as_dtype(gt_labels.dtype).is_integer:
            raise ValueError(f"gt_labels must be integers (-1 = padding), got dtype {gt_labels.dtype}.")
        # A label past num_classes would silently become background.
        gt_labels = ops.cast(gt_labels, "int32")
        check = tf.debugging.assert_less(
            gt_labels, self.num_classes,
            message=f"gt_labels must be -1 (padding) or in [0, {self.num_classes}) for this "
                    f"{self.num_classes}-class model; the dataset has more classes than the model",
        )
        with tf.control_dependencies([check]):
            return tf.identity(gt_labels)

    # -------------------------------------------------------------- inference
    def decode(self, outputs):
        """Head outputs → `max_per_img` instances per image at stride 4.

        Args:
            outputs: `model(images)` outputs (`kernels` per level) or
                `inference_outputs(images)` (`kernel_feats` per level: the
                kernels are then computed at the candidate cells only).

        Returns:
            Dict `soft_masks` `(B, P, H/4, W/4)` probabilities, `scores`
            `(B, P)`, `labels` `(B, P)` int32 (-1 = none), `num_detections`
            `(B,)`; see `keras_solov2.postprocess.decode_predictions`.
        """
        if "kernels" in outputs:
            kernels = outputs["kernels"]
        else:
            kernels = lambda cells: self.instance_head.kernels_at(outputs["kernel_feats"], cells)  # noqa: E731
        return postprocess.decode_predictions(
            outputs["cls_logits"],
            kernels,
            outputs["mask_features"],
            matrix_nms=self.matrix_nms,
            dynamic_conv=self.dynamic_conv,
            strides=self.strides,
            score_thr=self.score_thr,
            mask_thr=self.mask_thr,
            max_candidates=self.max_candidates,
        )

    def postprocess(self, outputs, image_shapes, original_shapes):
        """Head outputs → per-image instances at each image's original size.

        Args:
            outputs: `model(images)` outputs for a batch.
            image_shapes: `(B, 2)` valid `(h, w)` of each resized image before
                padding, pixels.
            original_shapes: `(B, 2)` `(H0, W0)` of each original image.

        Returns:
            List of B dicts with numpy arrays: `masks` `(n, H0, W0)` uint8,
            `scores` `(n,)` float32, `labels` `(n,)` int32, sorted by score.
        """
        decoded = self.decode(outputs)
        return self.paste(decoded, image_shapes, original_shapes)

    def paste(self, decoded, image_shapes, original_shapes):
        """`decode` output → per-image instances at each image's original size.

        Args:
            decoded: `self.decode(outputs)` (soft masks at stride 4 of the
                padded input).
            image_shapes: `(B, 2)` valid `(h, w)` of each resized image before
                padding, pixels.
            original_shapes: `(B, 2)` `(H0, W0)` of each original image.

        Returns:
            As `postprocess`: B dicts of numpy `masks` `(n, H0, W0)` uint8
            (soft masks upsampled, cropped, resized, then `> mask_thr`),
            `scores` `(n,)`, `labels` `(n,)`.
        """
        results = []
        image_shapes = np.asarray(image_shapes)
        original_shapes = np.asarray(original_shapes)
        for i in range(len(image_shapes)):
            n = int(decoded["num_detections"][i])
            masks = postprocess.paste_masks(
                decoded["soft_masks"][i, :n],
                image_shapes[i],
                original_shapes[i],
                mask_thr=self.mask_thr,
            )
            results.append(
                {
                    "masks": np.asarray(masks),
                    "scores": np.asarray(decoded["scores"][i, :n]),
                    "labels": np.asarray(decoded["labels"][i, :n]),
                }
            )
        return results

    # ---------------------------------------------------------------- training
    @property
    def metrics(self):
        return [self.loss_tracker, self.loss_cls_tracker, self.loss_mask_tracker]

    def compile(self, optimizer=None, weight_decay=1e-4, grad_clip_norm=35.0, global_batch_size=None,
                steps_per_epoch=None, schedule="1x", micro_batch_size="auto", step_executor="parallel", **kwargs):
        """Compiles with mmdet's SOLOv2 training defaults.

        Args:
            optimizer: a Keras optimizer; default SGD(momentum 0.9) with
                mmdet's learning rate: 0.01 per 16 images, scaled linearly
                with `global_batch_size`, linear warm-up over 500 steps from
                1/3, and (when `steps_per_epoch` is known) ×0.1 at epochs
                8 and 11 (`schedule="1x"`) or 27 and 33 (`"3x"`); see
                `keras_solov2.schedules.solov2_schedule`. Without
                `global_batch_size` the rate is mmdet's 0.01 (16 images).
            weight_decay: L2 coefficient added to the gradients of conv and
                dense kernels (not norm γ/β nor biases) after clipping, as
                torch's SGD does.
            grad_clip_norm: clip the global gradient norm (over all
                replicas, as mmdet clips after the all-reduce) to this
                (mmdet 35); `None` disables.
            global_batch_size: images per optimizer step over all replicas.
            steps_per_epoch: optimizer steps per epoch (for the decay steps).
            schedule: `"1x"` or `"3x"`.
            micro_batch_size: images per forward and backward pass within a
                step; `None`: the whole batch in one pass. The step then
                sums the gradients of its micro-batches (a `tf.while_loop`),
                each loss normalised by the positive cells of the whole
                batch, so the update is the one-pass update (up to float
                rounding; when an image has more than `max_pos_pairs`
                positive pairs, the dice sum is estimated per micro-batch),
                while only one micro-batch's activations exist at a time.
                Needs `norm_eval=True`: BatchNorm with batch statistics
                would see the micro-batches. `"auto"` (default): where
                that costs little or no step time, i.e. float32 on the CPU
                (the head's convs by Winograd, `SOLOv2InstanceHead.uses_winograd`)
                with `norm_eval=True`, the default executor and no XLA, one
                image per pass when padded images have at least 512×512
                pixels (`AUTO_MICRO_BATCH_PIXELS`; from the static image
                size, or in the step when that is dynamic); otherwise the
                whole batch. Batch 2, float32, peak RSS after 12 steps
                (2026-12-07, one image per pass against one pass): R50 at
                512² 2678–2769 against 3048–3149 MB at the same step time
                (2137–2301 against 2216–2336 ms, three runs each; 4–7 %
                more in a two-round benchmark with mmdet), light R18
                at 800×1344 2755–2792 against 4223–4504 MB (3229–3513
                against 3214–3412 ms, two runs each); R50 at 384² 0.17 GB
                less for 11 % more time and bfloat16 at 512² 0.09 GB less
                for 13–17 % more, so not there (README, "Training with less
                memory").
            step_executor: how TensorFlow runs the train step's ops.
                `"parallel"`: TensorFlow's default, independent ops at
                once (in float32 on the CPU, module by module:
                `_staged_gradients`). `"sequential"`: one at a time, each
                on every intra-op thread, as PyTorch's eager mode runs
                them, so no two ops' temporaries are alive together
                (TensorFlow's single-threaded executor,
                `keras_solov2/step_executor.py`; for a step on the CPU
                alone, without XLA, micro-batches or
                `steps_per_execution` > 1).
                Less memory than one pass with the default executor, at a
                cost in time where ops are small: batch 2, float32, peak
                RSS after 12 steps, R50 at 512² 2.79–2.86 against 3.06–3.10
                GB for 14–19 % more time, light R18 at 800×1344 3.88
                against 4.24 GB at the same time; R50 at 512² under
                `mixed_bfloat16` 0.08–0.19 GB less for up to 22 % more
                time, the demo's light R18 at 128² 42 % more time for
                nothing. It runs the whole batch in one pass, so for
                float32 images of 512² and more the default's micro-batches
                (`"auto"`) use less: 2.68–2.77 and 2.76–2.79 GB (README,
                "Training with less memory").
                Evaluation and `predict` keep the default executor.

        A built model's optimizer is built here, for its trainable variables
        at this point: set `trainable` (e.g. freeze the backbone) before
        compiling, as Keras asks. The model computes its own loss and
        metrics: `loss=` and `metrics=` are errors. The compile settings
        and the optimizer's state are saved in `.keras` files and restored
        by `keras.saving.load_model`, so training resumes from a loaded
        model where it stopped.
        """
        from keras_solov2.schedules import SCHEDULES, WarmupMultiStepDecay, solov2_schedule

        given = sorted(k for k in _KERAS_LOSS_ARGUMENTS if kwargs.get(k) is not None)
        if given:
            raise ValueError(
                f"SOLOv2.compile() takes no {', '.join(given)}: the model computes mmdet's focal + dice "
                "loss itself and reports loss, loss_cls and loss_mask (mask AP: the COCOMaskMAP callback)."
            )
        kwargs = {k: v for k, v in kwargs.items() if k not in _KERAS_LOSS_ARGUMENTS}
        if optimizer is not None:
            ignored = [name for name, value, default in (
                ("global_batch_size", global_batch_size, None), ("steps_per_epoch", steps_per_epoch, None),
                ("schedule", schedule, "1x")) if value != default]
            if ignored:
                warnings.warn(f"compile(): {', '.join(ignored)} set the default SGD's learning-rate "
                              "schedule; they are ignored with your optimizer.", stacklevel=2)
            own_decay = getattr(optimizer, "weight_decay", None)
            if own_decay and weight_decay:
                warnings.warn(
                    f"compile(): the optimizer has its own weight_decay={own_decay}, and compile's "
                    f"weight_decay={weight_decay} (mmdet's L2 term on the gradients) is added as well; "
                    "pass weight_decay=0 to use only the optimizer's.", stacklevel=2)

        global_batch_size = positive_int("global_batch_size", global_batch_size, allow_none=True)
        steps_per_epoch = positive_int("steps_per_epoch", steps_per_epoch, allow_none=True)
        if weight_decay is not None and float(weight_decay) < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
        if grad_clip_norm is not None and not float(grad_clip_norm) > 0:
            # 0 would scale every gradient to zero: nothing would train.
            raise ValueError(f"grad_clip_norm must be > 0 or None (no clipping), got {grad_clip_norm!r}.")
        if not (isinstance(micro_batch_size, str) and micro_batch_size == "auto"):
            try:
                micro_batch_size = positive_int("micro_batch_size", micro_batch_size, allow_none=True)
            except ValueError:
                raise ValueError(f"micro_batch_size must be 'auto', a positive int or None (the whole batch), "
                                 f"got {micro_batch_size!r}.") from None
        # "auto" never micro-batches under the sequential executor.
        step_executor = check_step_executor(step_executor, self.distribute_strategy, kwargs.get("jit_compile"),
                                            None if micro_batch_size == "auto" else micro_batch_size,
                                            kwargs.get("steps_per_execution", 1))
        if micro_batch_size not in (None, "auto"):
            if not self.norm_eval:
                raise ValueError(
                    "micro_batch_size needs norm_eval=True: with norm_eval=False BatchNorm normalises "
                    "by each micro-batch's statistics, so the step would not be the batch's."
                )
        if optimizer is None:
            if steps_per_epoch is not None:
                lr, _ = solov2_schedule(global_batch_size or 16, steps_per_epoch, schedule)
            else:
                if schedule not in SCHEDULES:
                    raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}.")
                lr = WarmupMultiStepDecay(0.01 * (global_batch_size or 16) / 16.0, milestones=[])
            optimizer = keras.optimizers.SGD(learning_rate=lr, momentum=0.9)
        self.weight_decay = float(weight_decay or 0.0)
        self.grad_clip_norm = None if grad_clip_norm is None else float(grad_clip_norm)
        self.micro_batch_size = micro_batch_size
        self.step_executor = step_executor
        super().compile(optimizer=optimizer, **kwargs)
        if self.built:
            # Now rather than in the first trace of `train_step` (where Keras
            # builds it without a distribution strategy): a `tf.function`
            # that creates variables traces twice and keeps both graphs,
            # 0.14 GB of memory for R50's (≈ 21,000 ops each).
            self.optimizer.build(self.trainable_variables)
        self._compiled_trainable = {id(v) for v in self.trainable_variables} if self.built else None

    def get_compile_config(self):
        """Keras's compile config (the optimizer, `jit_compile`, ...) and this
        model's own `compile` arguments, saved in `.keras` files."""
        config = super().get_compile_config()
        if config:
            config.update(weight_decay=self.weight_decay, grad_clip_norm=self.grad_clip_norm,
                          micro_batch_size=getattr(self, "micro_batch_size", None),
                          step_executor=getattr(self, "step_executor", "parallel"))
        return config

    def compile_from_config(self, config):
        """Re-compiles a loaded model as it was saved; `load_model` then
        restores the optimizer's variables (step count, momentum). A
        `step_executor="sequential"` that cannot run here (a model saved on
        a CPU, loaded under `tf.distribute` or with a GPU) becomes
        `"parallel"`, with a warning, rather than failing the load."""
        config = keras.saving.deserialize_keras_object(config)
        if config.get("step_executor") == "sequential":
            try:
                micro_batch_size = config.get("micro_batch_size")
                check_step_executor("sequential", self.distribute_strategy, config.get("jit_compile"),
                                    None if micro_batch_size == "auto" else micro_batch_size,
                                    config.get("steps_per_execution", 1))
            except ValueError as error:
                warnings.warn(f"{error} The loaded model trains with step_executor='parallel'.", stacklevel=2)
                config["step_executor"] = "parallel"
        self.compile(**config)

    @staticmethod
    def _unpack(data):
        if isinstance(data, (tuple, list)) and len(data) > 2 and data[2] is not None:
            raise ValueError(
                "SOLOv2 takes no sample weights (fit's sample_weight or class_weight): its focal and "
                "dice losses are normalised by the batch's positive grid cells, as mmdet's."
            )
        x, y = data[0], data[1] if isinstance(data, (tuple, list)) and len(data) > 1 else None
        images = x["images"] if isinstance(x, dict) else x
        return images, y

    def _decays(self, variable):
        name = variable.path
        return not any(part in name for part in ("gamma", "beta", "bias", "moving_"))

    def train_step(self, data):
        # The heap pages freed while the step's graph was prepared would stay
        # resident under its tensors (≈ 0.2 GB for R50): `heap_trim`.
        if not self.jit_compile:
            data = after_heap_trim(data)
        images, y = self._unpack(data)
        images, y = _check_batch(images, y, self.jit_compile)
        variables = self.trainable_variables
        compiled = getattr(self, "_compiled_trainable", None)
        added = [v.path for v in variables if compiled is not None and id(v) not in compiled]
        if added:
            raise ValueError(
                f"{len(added)} variables became trainable after `compile()` (e.g. {added[0]}), and the "
                "optimizer built there has no slots for them: call `model.compile(...)` again after "
                "changing `trainable`."
            )
        size = self._micro_batch_size_for(images)
        if size is not None and (images.shape[0] is None or not isinstance(size, int) or images.shape[0] > size):
            loss_dict, grads = self._micro_batch_gradients(images, y, variables, size)
        else:
            loss_dict, grads = self._gradients(images, y, variables)
        self._report_non_finite(loss_dict, data)
        if not self.optimizer.built:
            # (`compile` builds it when the model is built.) Before the block
            # below: its slot variables' initialisers must not inherit the
            # control dependencies.
            self.optimizer.build(variables)
        # Nothing below may start before every gradient exists: weight decay
        # (decay · v) and SGD's momentum term (momentum · m) read only
        # variables, so the executor would otherwise compute them at the start
        # of the step and hold them (≈ 0.4 GB for R50) through the forward and
        # backward passes. The clipping waits for all gradients anyway. One
        # NoOp gathers the gradients, so each op below gets one control edge
        # rather than one per gradient (a graph that large costs ~0.5 GB).
        with tf.control_dependencies([tf.group(*[g for g in grads if g is not None])]):
            scale = getattr(self.optimizer, "dynamic_scale", None)
            if scale is not None:
                grads = [g / ops.cast(scale, g.dtype) for g in grads]
            # Under tf.distribute each replica holds a share of the gradient that
            # the optimizer sums: clip by the norm of that sum, and add each
            # replica's share of the weight decay.
            ctx = tf.distribute.get_replica_context()
            replicas = 1 if ctx is None else ctx.num_replicas_in_sync
            if self.grad_clip_norm is not None:
                squares = tf.add_n([tf.reduce_sum(tf.square(tf.cast(g, "float32"))) for g in grads])
                if replicas > 1:
                    # The norm of the summed gradient is not a sum of the
                    # replicas' norms: reduce once more (the optimizer reduces
                    # the clipped shares again) to measure it exactly.
                    summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
                    squares = tf.add_n([tf.reduce_sum(tf.square(tf.cast(g, "float32"))) for g in summed])
                # torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) if below 1.
                factor = tf.minimum(1.0, self.grad_clip_norm / (tf.sqrt(squares) + 1e-6))
                grads = [g * tf.cast(factor, g.dtype) for g in grads]
            if self.weight_decay:
                decay = self.weight_decay / replicas
                grads = [
                    g + decay * ops.cast(v, g.dtype) if self._decays(v) else g
                    for g, v in zip(grads, variables)
                ]
            if scale is not None:
                grads = [g * ops.cast(scale, g.dtype) for g in grads]
            self.optimizer.apply(grads, variables)
        return self._track(loss_dict)

    def _micro_batch_size_for(self, images):
        """compile's `micro_batch_size` for this batch: an int, `None` (one
        pass), or for `"auto"` with a dynamic image size a scalar int32
        tensor (1, or the batch size: the loop then runs once)."""
        size = getattr(self, "micro_batch_size", None)
        if size != "auto":
            return size
        if (not self.norm_eval or self.jit_compile or getattr(self, "step_executor", "parallel") != "parallel"
                or not self.instance_head.uses_winograd()):
            return None
        height, width = images.shape[1], images.shape[2]
        if height is not None and width is not None:
            return 1 if height * width >= AUTO_MICRO_BATCH_PIXELS else None
        shape = tf.shape(images)
        return tf.where(shape[1] * shape[2] >= AUTO_MICRO_BATCH_PIXELS, 1, shape[0])

    def _gradients(self, images, y, variables, batch_num_pos=None):
        """This replica's loss dict and the (loss-scaled) gradients of its loss.

        With Winograd convs (float32 on the CPU) and the default executor,
        the forward pass and loss run in stages whose backward passes run
        one after another (`_staged_gradients`); otherwise under one tape.
        """
        if self.instance_head.uses_winograd() and getattr(self, "step_executor", "parallel") == "parallel":
            return self._staged_gradients(images, y, variables, batch_num_pos)
        with tf.GradientTape() as tape:
            loss_dict = self._replica_loss(images, y, training=True, batch_num_pos=batch_num_pos)
            scaled = self.optimizer.scale_loss(loss_dict["loss"])
        return loss_dict, tape.gradient(scaled, variables)

    def _staged_gradients(self, images, y, variables, batch_num_pos=None):
        """`_gradients` by `BackwardStages`: the same forward pass and loss as
        `_replica_loss(training=True)`, differentiated module by module in
        reverse (the mask-feature branch, the kernel towers, the category
        towers, the grid resizing, the backbone and FPN), each module's
        backward pass once the one before has finished. The default executor
        would otherwise run the Winograd backward passes of the head's towers,
        of the 128² mask-feature convs and of the FPN at once, each with
        transformed tiles 2.25× the size of its input. R50 b2 512² float32
        (2026-12-07, eight runs against three): peak RSS 3030–3190 against
        3165–3368 MB after 12 steps, at the same step time; light R18 b2
        800×1344 (two runs): 4352–4507 against 4862–5118 MB. Neither in
        bfloat16 (direct convs; 35–80 MB more) nor under
        `step_executor="sequential"` (whose own order peaks 100 MB lower)
        does it help, so those keep one tape.
        """
        _check_image_shape(images)
        if not self.built:
            self.build(images.shape)
        head = self.instance_head
        stages = BackwardStages()
        pyramid = stages.run(lambda x: self._pyramid(x, training=True), self._normalise(images))
        feats = stages.run(head.level_features, pyramid)
        cls_logits = stages.run(head.category_branches, feats)
        kernel_feats = stages.run(head.kernel_towers, feats)
        # Last before the loss, so differentiated first: its 128² activations go first.
        mask_features = stages.run(self.mask_feature_head, pyramid[:4])

        def loss(cls_logits, kernel_feats, mask_features):
            outputs = {"cls_logits": cls_logits, "kernel_feats": kernel_feats, "mask_features": mask_features}
            loss_dict = self._loss_of(outputs, images, y, batch_num_pos)
            return loss_dict, self.optimizer.scale_loss(loss_dict["loss"])

        loss_dict, scaled = stages.run(loss, cls_logits, kernel_feats, mask_features)
        return loss_dict, stages.gradients(scaled, variables)

    def _micro_batch_gradients(self, images, y, variables, size):
        """The batch's loss dict and (loss-scaled) gradients, `size` images at a time.

        Each micro-batch's loss is normalised by the positive cells of the
        whole batch (of all replicas), so the micro-batches' losses and
        gradients add up to the batch's. A `tf.while_loop` with one
        iteration at a time: one copy of the forward and backward graph
        whatever the batch size, and one micro-batch's activations alive.
        """
        batch = images.shape[0]
        if self.jit_compile and (batch is None or batch % size):
            raise ValueError(
                f"Under jit_compile=True the batch size ({batch}) must be static and a multiple of "
                f"micro_batch_size ({size}): batch the dataset with drop_remainder=True."
            )
        gt_masks, gt_labels = y["gt_masks"], self._check_labels(y["gt_labels"])
        # The whole batch's targets for its count (the micro-batches assign
        # theirs again: the step costs 1 % more in bfloat16, where the passes
        # barely slow down). As compute_solov2_loss: the slots in use only,
        # unless XLA's static shapes.
        used = (gt_masks, gt_labels) if self.jit_compile else self._slots_in_use(gt_masks, gt_labels)
        num_pos = self._sum_over_replicas(ops.cast(self._targets(*used)["num_pos"], "float32"))
        if batch is None:
            batch = tf.shape(images)[0]
        steps = (batch + size - 1) // size

        def body(i, grads, totals):
            def part(t):
                start = i * size
                if isinstance(batch, int) and isinstance(size, int) and batch % size == 0:
                    # A static micro-batch shape (XLA needs it).
                    return tf.slice(t, [start] + [0] * (t.shape.rank - 1), [size] + [-1] * (t.shape.rank - 1))
                return t[start:start + size]

            loss_dict, new = self._gradients(
                part(images), {"gt_masks": part(gt_masks), "gt_labels": part(gt_labels)}, variables, num_pos
            )
            grads = [a if g is None else a + tf.cast(g, a.dtype) for a, g in zip(grads, new)]
            return i + 1, grads, {k: totals[k] + v for k, v in loss_dict.items()}

        # Scalar zeros, broadcast by the first sum: full-size zeros stay
        # allocated through the loop (R50 b2 512², one run each: tensor peak
        # 1465 against 1435 MB). XLA needs the loop's shapes fixed.
        zeros = [tf.zeros(v.shape if self.jit_compile else [], v.dtype) for v in variables]
        totals = {k: tf.constant(0.0) for k in ("loss", "loss_cls", "loss_mask", "num_pos")}
        _, grads, totals = tf.while_loop(
            lambda i, grads, totals: i < steps, body, [tf.constant(0), zeros, totals],
            shape_invariants=[tf.TensorShape([]), [z.shape if self.jit_compile else tf.TensorShape(None)
                                                   for z in zeros], {k: tf.TensorShape([]) for k in totals}],
            parallel_iterations=1,
        )
        return totals, [tf.ensure_shape(g, v.shape) for g, v in zip(grads, variables)]

    def _report_non_finite(self, loss_dict, data):
        """Prints the batch's image ids to stderr when its loss is NaN/inf.

        `TerminateOnNaN` then stops `fit`; the ids say which images to check.
        (Under `mixed_float16` a non-finite loss is the loss scale's normal
        overflow signal, skipped by the optimizer, and is not reported. Under
        `jit_compile=True` there is no report: XLA cannot format strings;
        `TerminateOnNaN` still stops at that batch.)
        """
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer) or self.jit_compile:
            return
        x = data[0] if isinstance(data, (tuple, list)) else data
        ids = x.get("image_id") if isinstance(x, dict) else None
        finite = tf.reduce_all(
            [tf.math.is_finite(loss_dict[k]) for k in ("loss", "loss_cls", "loss_mask")]
        )

        def report():
            what = ["image ids", ids] if ids is not None else ["(no image_id in the batch)"]
            tf.print(
                "keras_solov2: non-finite loss (loss_cls", loss_dict["loss_cls"], ", loss_mask",
                loss_dict["loss_mask"], ") in the batch with", *what, output_stream=sys.stderr,
            )
            return tf.constant(False)

        tf.cond(finite, lambda: tf.constant(True), report)

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        super().make_train_function(force)
        if getattr(self, "step_executor", "parallel") == "sequential" and not self.run_eagerly:
            self.train_function = sequential(self.train_function)
        return self.train_function

    def make_predict_function(self, force=False):
        # Post-processing keeps as many candidates as the image has (dynamic
        # shapes), which XLA cannot compile: predict runs without it even
        # when the model was compiled with jit_compile=True for training.
        jit_compile, self._jit_compile = self._jit_compile, False
        try:
            return super().make_predict_function(force)
        finally:
            self._jit_compile = jit_compile

    def test_step(self, data):
        if not self.jit_compile:
            data = after_heap_trim(data)
        images, y = self._unpack(data)
        images, y = _check_batch(images, y, self.jit_compile)
        return self._track(self._replica_loss(images, y, training=False))

    @staticmethod
    def _nan_if_non_finite(loss_dict, images):
        """NaN losses for a batch with a NaN/inf pixel.

        The folded backbone's fused conv+bias+ReLU kernels (oneDNN) turn NaN
        into 0, so a broken image would otherwise give a finite loss and
        train silently; a NaN loss is reported with the batch's image ids
        and stops `fit` under `TerminateOnNaN`.
        """
        if not tf.as_dtype(images.dtype).is_floating:
            return loss_dict
        finite = tf.reduce_all(tf.math.is_finite(images))
        return {k: tf.where(finite, v, tf.constant(float("nan"), v.dtype)) for k, v in loss_dict.items()}

    def _replica_loss(self, images, y, training, batch_num_pos=None):
        """Forward pass and this replica's share of the global-batch loss.

        The final kernel conv runs at the cells the loss reads only
        (`dense_kernels=False`). The normaliser (positive cells) is summed
        over replicas, so the replicas' losses, and the gradients `fit` sums
        across them, add up to those of the global batch on one device; a
        micro-batch passes its batch's as `batch_num_pos`. A batch with a
        non-finite pixel gets NaN losses (`_nan_if_non_finite`). (`train_step`
        runs the same forward pass and loss, in stages in float32: `_gradients`.)
        """
        return self._loss_of(self(images, training=training, dense_kernels=False), images, y, batch_num_pos)

    def _loss_of(self, outputs, images, y, batch_num_pos=None):
        """`_replica_loss` of the head outputs `outputs` of `images`."""
        if batch_num_pos is not None:
            reduce_num_pos = lambda n: batch_num_pos  # noqa: E731
        else:
            reduce_num_pos = self._sum_over_replicas
        loss_dict = self.compute_solov2_loss(outputs, y["gt_masks"], y["gt_labels"], reduce_num_pos)
        return self._nan_if_non_finite(loss_dict, images)

    @staticmethod
    def _sum_over_replicas(value):
        """`value` summed over the replicas of a `tf.distribute` step (as is on one)."""
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)
        return value

    def _track(self, loss_dict):
        # The trackers average over replicas; each replica holds a share of
        # the global loss, so scale the shares back up.
        ctx = tf.distribute.get_replica_context()
        replicas = 1 if ctx is None else ctx.num_replicas_in_sync
        self.loss_tracker.update_state(loss_dict["loss"] * replicas)
        self.loss_cls_tracker.update_state(loss_dict["loss_cls"] * replicas)
        self.loss_mask_tracker.update_state(loss_dict["loss_mask"] * replicas)
        return {m.name: m.result() for m in self.metrics}

    def predict_step(self, data):
        """Raw images `(B, H, W, 3)` → instances at the input size.

        Images whose sides are not multiples of 32 are padded (bottom/right,
        with the mean pixel) and the masks cropped back.

        Returns:
            Dict `masks` `(B, P, H, W)` uint8, `scores` `(B, P)`, `labels`
            `(B, P)` int32 (-1 = none), `num_detections` `(B,)`, with
            P = `max_per_img`, sorted by score.
        """
        images, _ = self._unpack(data) if isinstance(data, (tuple, list)) else self._unpack((data,))
        _check_image_shape(images)
        images = ops.cast(images, "float32")
        # The folded backbone's fused kernels turn NaN into 0: without this
        # check a broken image would give plausible-looking detections. It
        # gates the outputs, not the input, so it runs beside the backbone.
        finite = tf.debugging.Assert(
            tf.reduce_all(tf.math.is_finite(images)), ["predict: images contain NaN or inf pixels"]
        )
        # Dynamic H, W: `predict` relaxes shapes after the second size, and
        # the graph then serves every size without retracing.
        shape = ops.shape(images)
        h, w = shape[1], shape[2]
        ph = (h + SIZE_DIVISOR - 1) // SIZE_DIVISOR * SIZE_DIVISOR
        pw = (w + SIZE_DIVISOR - 1) // SIZE_DIVISOR * SIZE_DIVISOR
        mean = ops.array(PIXEL_MEAN, "float32")
        images = ops.pad(images - mean, [[0, 0], [0, ph - h], [0, pw - w], [0, 0]]) + mean
        decoded = self.decode(self.inference_outputs(images))
        # Upsample only the detections (padding entries stay zero): at
        # 800x1344 each float mask is 4 MB.
        n = ops.max(decoded["num_detections"])
        # (resize needs at least one channel)
        soft = ops.transpose(decoded["soft_masks"][:, : ops.maximum(n, 1)], (0, 2, 3, 1))
        soft = resize_bilinear(soft, (ph, pw))[:, :h, :w, :]
        masks = ops.cast(ops.transpose(soft, (0, 3, 1, 2))[:, :n] > self.mask_thr, "uint8")
        masks = ops.pad(masks, [[0, 0], [0, self.max_per_img - n], [0, 0], [0, 0]])
        out = {"masks": masks, **{k: decoded[k] for k in ("scores", "labels", "num_detections")}}
        with tf.control_dependencies([finite]):
            return {k: tf.identity(v) for k, v in out.items()}

    # ----------------------------------------------------------- serialising
    def save(self, filepath, overwrite=True, **kwargs):
        """`keras.Model.save`, written atomically (temp file + rename).

        A crash or kill during the save leaves any previous file intact, so
        `ModelCheckpoint` never leaves a truncated `.keras` file behind.
        """
        write_file_atomically(super().save, filepath, overwrite, **kwargs)

    def save_weights(self, filepath, overwrite=True, **kwargs):
        """`keras.Model.save_weights`, written atomically (temp file + rename)."""
        write_file_atomically(super().save_weights, filepath, overwrite, **kwargs)

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """A TensorFlow SavedModel for serving, whose `serve` endpoint is `predict`.

        `serve(images)`: `images` `(B, H, W, 3)` float32 RGB pixels 0–255,
        any `H`, `W` (padded to multiples of 32 inside, the masks cropped
        back) → dict `masks` `(B, P, H, W)` uint8, `scores` `(B, P)`,
        `labels` `(B, P)` int32 (-1 = none), `num_detections` `(B,)` int32,
        `P = max_per_img`, sorted by score: `predict`'s outputs, one graph
        for every size. (`keras.Model.export` would serve `call`'s raw head
        outputs.) The folder is written atomically.

        Args:
            filepath: the SavedModel folder to create or replace.
            format: `"tf_saved_model"`, the only one (post-processing has
                dynamic shapes).
            verbose: print the endpoint's signature (default True, as Keras).
            input_signature: optional list of one `tf.TensorSpec` for the
                images, e.g. a fixed `(1, 800, 1344, 3)`.

        Example:

        ```python
        import tensorflow as tf
        from keras_solov2 import SOLOv2

        model = SOLOv2.from_architecture("solov2_light_r18", num_classes=3)
        model.export("solov2_serving")
        serving = tf.saved_model.load("solov2_serving")
        out = serving.serve(tf.zeros((1, 480, 640, 3)))  # out["masks"]: (1, 100, 480, 640)
        ```
        """
        from keras.export import ExportArchive

        if format != "tf_saved_model":
            raise ValueError(f"SOLOv2.export writes format='tf_saved_model' (serving `predict`), got {format!r}.")
        if kwargs:
            raise TypeError(f"SOLOv2.export got unexpected arguments {sorted(kwargs)}.")
        if input_signature is None:
            input_signature = [tf.TensorSpec((None, None, None, 3), tf.float32, name="images")]
        verbose = True if verbose is None else verbose
        archive = ExportArchive()
        archive.track(self)
        archive.add_endpoint("serve", self.predict_step, input_signature=input_signature)
        return write_directory_atomically(filepath, lambda tmp: archive.write_out(str(tmp), verbose=verbose))

    def get_config(self):
        config = {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            "backbone": keras.layers.serialize(self.backbone),
        }
        for key in (
            "num_classes", "num_grids", "scale_ranges", "strides", "pos_scale",
            "fpn_channels", "feat_channels", "stacked_convs", "mask_feat_channels",
            "mask_out_channels", "norm_groups", "frozen_stages", "norm_eval", "with_cp",
            "winograd", "score_thr", "mask_thr", "filter_thr", "nms_pre", "max_per_img",
            "kernel", "sigma", "max_candidates", "max_pos_pairs", "focal_alpha",
            "focal_gamma", "loss_cls_weight", "loss_mask_weight", "class_names",
        ):
            config[key] = getattr(self, key)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("backbone"), dict):
            backbone = dict(config["backbone"], config=dict(config["backbone"]["config"]))
            if config.get("dtype") is not None:
                # One policy for the whole model: `from_preset(..., dtype=...)`
                # changes the saved model's policy, the backbone's included.
                backbone["config"]["dtype"] = config["dtype"]
            config["backbone"] = keras.layers.deserialize(backbone)
        return cls(**config)


def _check_image_shape(images):
    """A ValueError for images that are not `(B, H, W, 3)` (static shape)."""
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[-1] not in (3, None):
        raise ValueError(
            f"images must be a batch of RGB images, shape (B, H, W, 3), got shape {shape}"
            + (" (a single image: add a batch axis, e.g. images[None])." if len(shape) == 3 else ".")
        )


def _check_batch(images, y, jit_compile=False):
    """Checks a `fit`/`evaluate` batch against the contract; returns `(images, y)`.

    `make_dataset` and `make_tfds_dataset` build conforming batches; this
    names what is wrong in a hand-made `tf.data` pipeline before it fails
    inside TensorFlow (or, for a mask/label count mismatch, trains silently):
    a ValueError when the step is traced for what the static shapes show,
    and, for dimensions unknown then (a pipeline without static shapes, or
    batches of a second size, for which Keras traces the step again with
    relaxed shapes), an InvalidArgumentError when the batch runs: the
    returned `images` and `y` wait for those checks. Under `jit_compile`,
    an unknown size or slot count is a ValueError; XLA drops assertions, so
    there an unknown batch size is not checked when the batch runs.
    """
    contract = ("x = images (B, H, W, 3) or {'images': ...}, y = {'gt_masks': (B, M, H, W) 0/1, "
                "'gt_labels': (B, M) int, -1 = padding}, H and W multiples of 32")
    if not isinstance(y, dict) or not {"gt_masks", "gt_labels"} <= set(y):
        got = "missing" if y is None else (f"a dict with keys {sorted(y)}" if isinstance(y, dict)
                                           else type(y).__name__)
        raise ValueError(f"fit/evaluate need (x, y) batches with {contract}; y is {got}.")
    _check_image_shape(images)
    b, h, w, _ = tuple(images.shape)
    masks, labels = tuple(y["gt_masks"].shape), tuple(y["gt_labels"].shape)
    if len(masks) != 4 or len(labels) != 2:
        raise ValueError(f"gt_masks must be (B, M, H, W) and gt_labels (B, M), got shapes {masks} and "
                         f"{labels} ({contract}).")

    def differ(*sizes):
        known = {s for s in sizes if s is not None}
        return len(known) > 1

    if differ(b, masks[0], labels[0]):
        raise ValueError(f"images, gt_masks and gt_labels have batch sizes {b}, {masks[0]} and {labels[0]}.")
    if differ(masks[1], labels[1]):
        raise ValueError(f"gt_masks has {masks[1]} instance slots but gt_labels {labels[1]} (shapes {masks}, {labels}).")
    if differ(masks[2], h) or differ(masks[3], w):
        raise ValueError(f"gt_masks are {masks[2]}x{masks[3]} but the images {h}x{w}: masks are at the padded "
                         "image size.")
    if any(side is not None and side % SIZE_DIVISOR for side in (h, w)):
        raise ValueError(f"training/evaluation images must be padded to multiples of {SIZE_DIVISOR}, got {h}x{w} "
                         "(make_dataset pads them; predict pads by itself).")
    if None not in (b, h, w) + masks + labels:
        return images, y
    if jit_compile and None in (h, w) + masks[1:] + labels[1:]:
        # XLA needs the cap on mask pairs (top-k) and every tiling static.
        raise ValueError(f"jit_compile=True needs batches of one static size, got images {(b, h, w, 3)}, gt_masks "
                         f"{masks} and gt_labels {labels}: pad every batch to one size and slot count "
                         "(make_dataset and make_tfds_dataset do with static_slots=True), or compile "
                         "without jit_compile.")
    image_dims, mask_dims, label_dims = tf.shape(images), tf.shape(y["gt_masks"]), tf.shape(y["gt_labels"])
    checks = [
        tf.debugging.assert_equal(tf.stack([mask_dims[0], label_dims[0]]), image_dims[0],
                                  message="images, gt_masks and gt_labels have different batch sizes "
                                          "(gt_masks' and gt_labels' below, then the images')"),
        tf.debugging.assert_equal(mask_dims[1], label_dims[1],
                                  message="gt_masks and gt_labels have different instance slot counts"),
        tf.debugging.assert_equal(mask_dims[2:], image_dims[1:3],
                                  message="gt_masks are not at the image size (masks are at the padded "
                                          "image size; masks' H, W below, then the images')"),
        tf.debugging.assert_equal(image_dims[1:3] % SIZE_DIVISOR, 0,
                                  message=f"training/evaluation images must be padded to multiples of "
                                          f"{SIZE_DIVISOR} (make_dataset pads them; predict pads by itself)"),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(images), {k: tf.identity(v) if k in ("gt_masks", "gt_labels") else v
                                     for k, v in y.items()}
