"""`amldist nets ...`: network facts (parameters, FLOPs, the paper's Table 1) and cirtorch export."""

from __future__ import annotations

import argparse

from amldist.cli.common import add_command, add_group, existing_file, positive_int

TEACHER_DIMS = {"vgg16": 512, "resnet101": 2048}


def register(subparsers) -> None:
    nets = add_group(subparsers, "nets", "network facts and conversion")
    info = add_command(nets, "info", "parameters (M) and GFLOPs of a network (no weights needed)", run_info)
    from amldist.nets import ARCHITECTURES, POOLINGS

    info.add_argument("--arch", required=True, choices=ARCHITECTURES, help="backbone architecture")
    dims = info.add_mutually_exclusive_group()
    dims.add_argument("--teacher-dim", type=positive_int, default=None,
                      help="add the student's 1x1 projection to this dimension (512 for VGG16, 2048 for ResNet101)")
    dims.add_argument("--teacher", choices=sorted(TEACHER_DIMS), default=None,
                      help="shorthand for --teacher-dim of that teacher")
    info.add_argument("--pooling", choices=sorted(POOLINGS), default="gem")
    info.add_argument("--image-size", type=positive_int, default=362, help="square input side (default 362)")

    table = add_command(nets, "table1", "reproduce the paper's Table 1 (ours vs paper, difference in percent)", run_table1)
    table.add_argument("--image-size", type=positive_int, default=362)
    table.add_argument("--conv-only", action="store_true",
                       help="count only convolutions/matmuls (the default also counts BN, activations, adds)")

    export = add_command(nets, "export", "write a checkpoint's network as a plain cirtorch/aml file", run_export)
    export.add_argument("checkpoint", type=existing_file, help="amldist checkpoint or network file")
    export.add_argument("output", help="where to write {'state_dict', 'meta'}")


def run_info(args: argparse.Namespace) -> int:
    from amldist.flops import complexity
    from amldist.nets import OUTPUT_CHANNELS

    projection_dim = args.teacher_dim or TEACHER_DIMS.get(args.teacher)
    result = complexity(args.arch, projection_dim, args.image_size, pooling=args.pooling)
    head = f" + 1x1 conv {OUTPUT_CHANNELS[args.arch]}->{projection_dim}" if projection_dim else ""
    print(f"network      {args.arch}{head}, {args.pooling}")
    print(f"output dim   {projection_dim or OUTPUT_CHANNELS[args.arch]}")
    print(f"parameters   {result.params_m:.2f} M ({result.params:,})")
    print(f"GFLOPs       {result.gflops:.2f} at {args.image_size}x{args.image_size}")
    return 0


def run_table1(args: argparse.Namespace) -> int:
    from amldist.flops import format_table1, table1

    print(f"Table 1 at {args.image_size}x{args.image_size} "
          f"({'convolutions only' if args.conv_only else 'all layers'}; FLOPs = 2 x MACs)")
    print(format_table1(table1(args.image_size, elementwise=not args.conv_only)))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from amldist.checkpoints import export_network_file, load_network_file

    net = load_network_file(args.checkpoint)
    export_network_file(args.output, net)
    print(f"wrote {args.output} ({net.meta.architecture}, {net.meta.pooling}, dim {net.meta.outputdim})")
    return 0
