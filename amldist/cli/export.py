"""`amldist export`: a student as one TorchScript or ONNX file that a client runs on a decoded image.

    amldist export --network runs/RUN/model_best.pth.tar --format onnx --out student.onnx --images DIR \
        [--image-size N] [--multiscale '[1]'] [--whitening INDEX|FILE] [--force]

The file holds the preprocessing (cirtorch's crop and PIL's Lanczos thumbnail to the trained image size,
normalisation), the network (pooling, FC whitening), the multi-scale combination and, with --whitening,
the learned whitening of the index it will query (`amldist.retrieval.export`). It takes uint8 (H, W, 3)
RGB and a box (4,) float32 and returns the descriptor. Before the file is kept, its runtime embeds up to
8 images of --images (whole and cropped) and must match the checkpoint within 1e-5; the check is printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from amldist.cli.common import add_command, check_output_location, existing_dir, existing_file, positive_int
from amldist.errors import require


def register(subparsers) -> None:
    from amldist.retrieval.export import CHECK_IMAGES, FORMATS

    parser = add_command(subparsers, "export", "export a student (preprocessing, pooling, whitening "
                         "included) as TorchScript or ONNX, checked against the checkpoint", run)
    parser.add_argument("--network", "--network-path", "-npath", required=True, type=existing_file,
                        help="the student: an amldist checkpoint (or a cirtorch/aml network file with "
                             "--image-size)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="torchscript (.pt) or onnx (.onnx)")
    parser.add_argument("--out", required=True, type=Path, help="the file to write")
    parser.add_argument("--images", required=True, type=existing_dir,
                        help=f"real images to check the export on (the first {CHECK_IMAGES}, sorted)")
    parser.add_argument("--image-size", "-imsize", type=positive_int, default=None,
                        help="longest image side (default: the size the checkpoint was trained at)")
    parser.add_argument("--multiscale", "-ms", default="[1]", help="scales, e.g. '[1, 1/2**(1/2), 1/2]'")
    parser.add_argument("--whitening", default=None,
                        help="bake in this whitening: an index folder (its whitening) or a whitening file")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    from amldist.cli.eval import parse_scales
    from amldist.retrieval.export import CHECK_IMAGES, export_query_network
    from amldist.retrieval.gallery import image_files
    from amldist.retrieval.index import IndexSettings, resolve_whitening

    scales = parse_scales(args.multiscale)
    check_output_location(args.out, "--out")
    require(not args.out.exists() or args.out.resolve() != args.network.resolve(),
            "--out is the --network file itself; choose another name")
    require(not args.out.exists() or args.force, f"--out {args.out} exists; --force replaces it")
    images = [args.images / name for name in image_files(args.images)[:CHECK_IMAGES]]
    require(len(images) > 0, f"--images {args.images} holds no image files")
    whitening = None
    if args.whitening is not None:
        require(Path(args.whitening).exists(), f"--whitening {args.whitening}: no such index folder or file")
        whitening = resolve_whitening(args.whitening, args.network, IndexSettings())
    report = export_query_network(args.network, args.out, args.format, check_images=images,
                                  image_size=args.image_size, scales=scales,
                                  whitening=whitening.whitening if whitening else None,
                                  whitening_source=whitening.source if whitening else None)
    meta, teacher = report.metadata, report.metadata["teacher"]
    whitened = "none" if meta["whitening"] is None else meta["whitening"]["sha256"][:12]
    trained = ("none recorded" if not teacher
               else f"{teacher.get('architecture', '?')} {teacher['network_sha256'][:12]}")
    print(f"wrote {report.path} ({report.format}, {report.path.stat().st_size / 1e6:.1f} MB): "
          f"{meta['architecture']} -> {meta['dim']}-D, {meta['image_size']} px, scales "
          f"{[round(s, 4) for s in meta['scales']]}, whitening {whitened}, teacher {trained}")
    print(report.check.line(report.format))
    return 0
