"""`amldist nets ...`: network facts (parameters, FLOPs, the paper's Table 1) and cirtorch export."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from amldist.cli.common import (
    add_command,
    add_group,
    check_output_location,
    existing_file,
    positive_int,
    require,
)

TEACHER_DIMS = {"vgg16": 512, "resnet101": 2048}


def register(subparsers) -> None:
    nets = add_group(subparsers, "nets", "network facts and conversion")
    info = add_command(nets, "info", "parameters (M) and GFLOPs of a network (no weights needed); without "
                       "--arch, every architecture and whether its ImageNet weights are installed", run_info)
    from amldist.nets import ARCHITECTURES, POOLINGS

    info.add_argument("--arch", choices=ARCHITECTURES, default=None,
                      help="backbone architecture (default: list them all with their ImageNet weights)")
    dims = info.add_mutually_exclusive_group()
    dims.add_argument("--teacher-dim", type=positive_int, default=None,
                      help="add the student's 1x1 projection to this dimension (512 for VGG16, "
                           "2048 for ResNet101)")
    dims.add_argument("--teacher", choices=sorted(TEACHER_DIMS), default=None,
                      help="shorthand for --teacher-dim of that teacher")
    info.add_argument("--pooling", choices=sorted(POOLINGS), default="gem")
    info.add_argument("--image-size", type=positive_int, default=362, help="square input side (default 362)")

    table = add_command(nets, "table1",
                        "reproduce the paper's Table 1 (ours vs paper, difference in percent)", run_table1)
    table.add_argument("--image-size", type=positive_int, default=362)
    table.add_argument("--conv-only", action="store_true",
                       help="count only convolutions/matmuls (the default also counts BN, activations, adds)")

    export = add_command(nets, "export",
                         "write a checkpoint's network as a plain cirtorch/aml file", run_export)
    export.add_argument("checkpoint", type=existing_file, help="amldist checkpoint or network file")
    export.add_argument("output", type=Path, help="where to write {'state_dict', 'meta'} (a new file)")
    export.add_argument("--force", action="store_true",
                        help="replace an existing output file (never the checkpoint itself)")


def run_info(args: argparse.Namespace) -> int:
    from amldist.flops import complexity
    from amldist.nets import OUTPUT_CHANNELS, weights_location

    if args.arch is None:
        return _list_architectures()
    projection_dim = args.teacher_dim or TEACHER_DIMS.get(args.teacher)
    result = complexity(args.arch, projection_dim, args.image_size, pooling=args.pooling)
    head = f" + 1x1 conv {OUTPUT_CHANNELS[args.arch]}->{projection_dim}" if projection_dim else ""
    print(f"network      {args.arch}{head}, {args.pooling}")
    print(f"output dim   {projection_dim or OUTPUT_CHANNELS[args.arch]}")
    print(f"parameters   {result.params_m:.2f} M ({result.params:,})")
    print(f"GFLOPs       {result.gflops:.2f} at {args.image_size}x{args.image_size}")
    path, source = weights_location(args.arch)
    print(f"ImageNet     {_weights_state(path, source)}")
    return 0


def _list_architectures() -> int:
    from amldist.nets import ARCHITECTURES, OUTPUT_CHANNELS, weights_location

    print(f"{'architecture':<20}{'D':>6}  ImageNet weights")
    for architecture in ARCHITECTURES:
        path, source = weights_location(architecture)
        print(f"{architecture:<20}{OUTPUT_CHANNELS[architecture]:>6}  {_weights_state(path, source)}")
    return 0


def _weights_state(path, source: str) -> str:
    if path is not None:
        return f"installed ({source}: {path})"
    if source.startswith("none"):
        return source
    return f"not on disk ({source}; downloaded on first use)"


def run_table1(args: argparse.Namespace) -> int:
    from amldist.flops import format_table1, table1

    results = table1(args.image_size, elementwise=not args.conv_only)  # first: a bad size prints nothing
    print(f"Table 1 at {args.image_size}x{args.image_size} "
          f"({'convolutions only' if args.conv_only else 'all layers'}; FLOPs = 2 x MACs)")
    print(format_table1(results))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from amldist.checkpoints import export_network_file, load_network_file

    _check_export_output(args.checkpoint, args.output.expanduser(), args.force)
    net = load_network_file(args.checkpoint)
    export_network_file(args.output, net)
    print(f"wrote {args.output} ({net.meta.architecture}, {net.meta.pooling}, dim {net.meta.outputdim})")
    return 0


def _check_export_output(checkpoint: Path, output: Path, force: bool) -> None:
    """The export keeps only weights and meta, so writing it over a training checkpoint (above all the
    input itself) would silently drop its epoch, optimizer and config: existing files need --force."""
    check_output_location(output, "output")
    if output.exists():
        require(not os.path.samefile(output, checkpoint),
                f"output {output} is the input checkpoint; exporting over it would drop its training state")
        require(force, f"output {output} already exists; pass --force to replace it")
