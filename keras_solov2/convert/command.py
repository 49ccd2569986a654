"""`keras-solov2 convert`: an mmdetection SOLOv2 checkpoint → a Keras preset or `.keras` file."""

import argparse

DESCRIPTION = """\
Convert an mmdetection SOLOv2 checkpoint into Keras. SOURCE is a .pth file
(read with torch.load(weights_only=True); torch is the `convert` extra) or a
preset name (downloaded once into the Keras cache). OUTPUT ending in .keras is
a single Keras file; anything else is a preset folder (config.json,
model.weights.h5, metadata.json) that SOLOv2.from_preset(OUTPUT) loads.
"""


def _configure(parser):
    parser.add_argument("source", help="mmdet .pth checkpoint or preset name")
    parser.add_argument("output", help="preset folder, or a .keras file")
    parser.add_argument("--architecture", default=None,
                        help="expected architecture (solov2_r50, solov2_light_r18, ...); default: inferred")
    parser.add_argument("--norm-groups", type=int, default=None,
                        help="GroupNorm groups of the head (default 32, mmdet's; not inferable)")
    parser.set_defaults(func=run)
    return parser


def add_convert_subcommand(subparsers):
    """Adds `convert` to the `keras-solov2` sub-commands."""
    return _configure(subparsers.add_parser(
        "convert", help="mmdetection SOLOv2 .pth -> Keras preset folder or .keras",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    ))


def run(args):
    """Runs a parsed `convert` command; returns 0.

    Bad input (a missing file, an unknown checkpoint layout, torch not
    installed, no network for a preset) raises `ValueError`, `OSError` or
    `ImportError` with a message naming it, which `keras-solov2` prints as
    one line.
    """
    from keras_solov2.convert.mmdet_checkpoint import convert
    from keras_solov2.models import presets

    if args.source in presets.PRESETS:
        if args.architecture or args.norm_groups:
            raise ValueError("--architecture/--norm-groups apply to .pth files, not to named presets.")
        spec = presets.PRESETS[args.source]
        model = presets.convert_preset(args.source, presets.fetch_checkpoint(args.source))
        what = f"{args.source} ({spec['url']})"
    else:
        model = convert(args.source, architecture=args.architecture, norm_groups=args.norm_groups)
        what = args.source
    if str(args.output).endswith(".keras"):
        model.save(args.output)
    else:
        presets.save_to_preset(model, args.output)
    print(
        f"converted {what} -> {args.output}: backbone {model.backbone.name}, "
        f"{model.num_classes} classes, {model.count_params():,} weights"
    )
    return 0


def convert_main(argv=None):
    """`keras-solov2 convert SOURCE OUTPUT [--architecture A] [--norm-groups G]`.

    Args:
        argv: the arguments after `convert` (default: `sys.argv[1:]`).

    Returns:
        0.

    Raises:
        SystemExit: 1 after `keras-solov2 convert: error: …` on stderr, for
            bad input (as `keras-solov2 convert` exits); 2 for bad options.
    """
    from keras_solov2.cli import run_reporting_errors

    parser = _configure(argparse.ArgumentParser(
        prog="keras-solov2 convert", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ))
    args = parser.parse_args(argv)
    args.command = "convert"
    return run_reporting_errors(parser, args)
