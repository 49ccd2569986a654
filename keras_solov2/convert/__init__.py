"""mmdetection checkpoint conversion."""

from keras_solov2.convert.mmdet_checkpoint import (
    convert,
    infer_config,
    load_into_model,
    load_state_dict,
    model_to_state_dict,
)

__all__ = ["convert", "infer_config", "load_into_model", "load_state_dict", "model_to_state_dict"]


def add_convert_subcommand(sub):
    """`keras-solov2 convert CHECKPOINT.pth OUT.keras`."""

    def run(args):
        model = convert(args.checkpoint, norm_groups=args.norm_groups)
        model.save(args.output)
        print(f"converted {args.checkpoint} -> {args.output} ({model.count_params():,} weights)")

    p = sub.add_parser("convert", help="mmdetection SOLOv2 .pth -> .keras")
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.add_argument("--norm-groups", type=int, default=32)
    p.set_defaults(func=run)
