"""`amldist search`: query a teacher-built gallery index with a student (checkpoint or exported file).

    amldist search --index INDEX --query-network STUDENT --image Q.jpg [--bbx x1,y1,x2,y2] [-k 10] [--json] \
        [--contact-sheet OUT.png] [--skip-teacher-check]

Prints the k best gallery images with their scores (cosine similarity), or JSON with --json. A student
trained against another teacher than the index's (their sha256 differ), one that records no teacher, or
one whose dimension differs is refused with one line (`amldist.retrieval.query`); --skip-teacher-check
lets a network that records no teacher (or another) query anyway, e.g. to compare a student trained alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from amldist.cli.common import add_command, check_output_location, existing_dir, existing_file, positive_int


def register(subparsers) -> None:
    parser = add_command(subparsers, "search", "search a gallery index with a query image and a student "
                         "network", run)
    parser.add_argument("--index", required=True, type=existing_dir, help="an index folder (amldist index)")
    parser.add_argument("--query-network", required=True, type=existing_file,
                        help="the student: an amldist checkpoint or an `amldist export` file (.pt or .onnx)")
    parser.add_argument("--image", required=True, type=existing_file, help="the query image")
    parser.add_argument("--bbx", default=None, help="query box x1,y1,x2,y2 in the image's pixels")
    parser.add_argument("-k", type=positive_int, default=10, help="results to show (default 10)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--contact-sheet", type=Path, default=None,
                        help="write the query and results as a PNG")
    parser.add_argument("--skip-teacher-check", action="store_true",
                        help="query even with a network that records no teacher or another one")


def run(args: argparse.Namespace) -> int:
    from amldist.retrieval.index import GalleryIndex
    from amldist.retrieval.query import AsymmetricSearch, contact_sheet, open_query_image, parse_bbx
    from amldist.retrieval.query_net import load_query_network

    bbx = parse_bbx(args.bbx) if args.bbx else None
    if args.contact_sheet is not None:
        check_output_location(args.contact_sheet, "--contact-sheet")
    index = GalleryIndex.open(args.index)
    searcher = AsymmetricSearch(index, load_query_network(args.query_network),
                                skip_teacher_check=args.skip_teacher_check)
    image = open_query_image(args.image)
    hits = searcher.search(image, bbx, args.k)
    if args.json:
        print(json.dumps({"query": str(args.image), "bbx": bbx, "k": args.k, "index": str(args.index),
                          "query_network": str(args.query_network),
                          "results": [h.as_dict() for h in hits]}, indent=1))
    else:
        print(searcher.describe())
        for hit in hits:
            print(f"{hit.rank:4d}  {hit.score:8.4f}  {hit.name}")
    if args.contact_sheet is not None:
        gallery = index.gallery()
        contact_sheet(image, bbx, hits, [gallery.load(h.row) for h in hits], args.contact_sheet,
                      title=f"{args.image.name}: top {len(hits)} of {len(index)}")
        if not args.json:
            print(f"contact sheet: {args.contact_sheet}")
    return 0
