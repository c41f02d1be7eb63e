"""`amldist index`: a gallery's teacher descriptors and a faiss index over them, for `amldist search`.

    amldist index --network TEACHER (--images DIR | --shards SPLIT_DIR) --out INDEX \
        [--whitening retrieval-SfM-120k --data-root ROOT | --whitening FILE|INDEX] \
        [--multiscale '[1, 1/2**(1/2), 1/2]'] [--image-size 1024] [--compress] [--ray-workers N]
    amldist index --add --out INDEX [--images DIR | --shards DIR] [--network TEACHER]

The gallery is embedded as evaluation embeds a database (cirtorch's resize rule, multi-scale; over Ray
tasks with --ray-workers). The index is exact (flat inner product) unless --compress asks for IVF-PQ, whose
recall@10 against the flat index is printed. --add embeds only images the index does not hold (new or
changed files), drops removed ones and rebuilds the faiss index: the result equals a full build.
`amldist.retrieval.index` documents the folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from amldist.cli.common import add_command, existing_dir, existing_file, non_negative_int, positive_int
from amldist.errors import require


def register(subparsers) -> None:
    parser = add_command(subparsers, "index", "index a gallery with the teacher (faiss; flat, or IVF-PQ with "
                         "--compress), or --add its new images", run)
    parser.add_argument("--network", "--network-path", "-npath", type=existing_file, default=None,
                        help="the teacher network file (with --add: default the index's, checked by sha256)")
    gallery = parser.add_mutually_exclusive_group()
    gallery.add_argument("--images", type=existing_dir, default=None, help="a folder of images (recursive)")
    gallery.add_argument("--shards", type=existing_dir, default=None,
                         help="a shard split folder, e.g. ROOT/shards/roxford5k-1024/db")
    parser.add_argument("--out", required=True, type=Path, help="the index folder")
    parser.add_argument("--add", action="store_true", help="update the index at --out: embed only new images")
    parser.add_argument("--force", action="store_true", help="rebuild an existing index at --out")
    parser.add_argument("--whitening", "-w", default=None,
                        help="learned whitening: a training set name (with --data-root), a whitening file, "
                             "or another index folder")
    parser.add_argument("--data-root", type=existing_dir, default=None, help="data root for --whitening NAME")
    parser.add_argument("--multiscale", "-ms", default=None,
                        help="scales, e.g. '[1, 1/2**(1/2), 1/2]' (default [1])")
    parser.add_argument("--image-size", "-imsize", type=positive_int, default=None,
                        help="longest image side (default 1024)")
    parser.add_argument("--compress", action="store_true", help="IVF-PQ instead of the exact flat index")
    parser.add_argument("--nlist", type=positive_int, default=None,
                        help="IVF lists (default about 4 sqrt(N))")
    parser.add_argument("--pq-m", type=positive_int, default=None, help="PQ codes per vector (default D / 8)")
    parser.add_argument("--nprobe", type=positive_int, default=None,
                        help="lists searched (default nlist / 4)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="images per forward pass")
    parser.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader decoding workers")
    parser.add_argument("--ray-workers", type=non_negative_int, default=0,
                        help="embed with this many Ray tasks (default 0: this process)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    from amldist.cli.eval import parse_scales
    from amldist.extract import checked_device
    from amldist.retrieval.gallery import folder_gallery, shard_gallery
    from amldist.retrieval.index import IndexSettings, add_to_index, build_index, resolve_whitening

    gallery = (folder_gallery(args.images) if args.images
               else shard_gallery(args.shards) if args.shards else None)
    resources = {"device": checked_device(args.device), "batch_size": args.batch_size,
                 "workers": args.workers, "ray_workers": args.ray_workers, "nlist": args.nlist,
                 "pq_m": args.pq_m, "nprobe": args.nprobe}
    if args.add:
        given = (("--whitening", args.whitening), ("--multiscale", args.multiscale),
                 ("--image-size", args.image_size), ("--compress", args.compress or None),
                 ("--force", args.force or None))
        fixed = [flag for flag, value in given if value is not None]
        require(not fixed, f"--add keeps the index's settings; {fixed[0] if fixed else ''} needs a rebuild "
                           f"(--force without --add)")
        report = add_to_index(args.out, gallery, args.network, IndexSettings(**resources))
    else:
        require(args.network is not None, "--network (the teacher) is required to build an index")
        require(gallery is not None, "give the gallery: --images DIR or --shards DIR")
        scales = tuple(parse_scales(args.multiscale or "[1]"))
        settings = IndexSettings(image_size=args.image_size or 1024, scales=scales, compress=args.compress,
                                 **resources)
        whitening = (resolve_whitening(args.whitening, args.network, settings, args.data_root)
                     if args.whitening else None)
        report = build_index(args.network, gallery, args.out, settings, whitening, replace=args.force)
    for line in report.lines():
        print(line)
    return 0
