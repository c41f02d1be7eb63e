"""`amldist serve`: the search as an HTTP endpoint (aiohttp), on the loopback interface by default.

    amldist serve --index INDEX --query-network STUDENT [--host 127.0.0.1] [--port 8765] [--threads 2]
    curl --data-binary @q.jpg 'http://127.0.0.1:8765/search?k=10&bbx=10,20,200,180'

POST /search takes the image file as the body (or a multipart form field `image`), with optional `k` and
`bbx` query parameters, and answers JSON results; malformed uploads get a 4xx and a one-line reason.
GET /health says what is served. `amldist.retrieval.server` documents the API.
"""

from __future__ import annotations

import argparse
import logging

from amldist.cli.common import add_command, existing_dir, existing_file, positive_int
from amldist.errors import require

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    from amldist.retrieval.server import DEFAULT_PORT, DEFAULT_THREADS, LOOPBACK, MAX_UPLOAD_BYTES

    parser = add_command(subparsers, "serve", "serve asymmetric search over HTTP (loopback by default)", run)
    parser.add_argument("--index", required=True, type=existing_dir, help="an index folder (amldist index)")
    parser.add_argument("--query-network", required=True, type=existing_file,
                        help="the student: an amldist checkpoint or an `amldist export` file")
    parser.add_argument("--host", default=LOOPBACK,
                        help=f"address to listen on (default {LOOPBACK}: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS,
                        help=f"queries computed at once (default {DEFAULT_THREADS})")
    parser.add_argument("--max-upload-mb", type=positive_int, default=MAX_UPLOAD_BYTES >> 20,
                        help=f"largest upload (default {MAX_UPLOAD_BYTES >> 20} MB)")
    parser.add_argument("--skip-teacher-check", action="store_true",
                        help="serve even a network that records no teacher or another one")


def run(args: argparse.Namespace) -> int:
    from amldist.retrieval.index import GalleryIndex
    from amldist.retrieval.query import AsymmetricSearch
    from amldist.retrieval.query_net import load_query_network
    from amldist.retrieval.server import LOOPBACK, serve

    require(0 <= args.port <= 65535, f"--port must be 0..65535, got {args.port}")
    searcher = AsymmetricSearch(GalleryIndex.open(args.index), load_query_network(args.query_network),
                                skip_teacher_check=args.skip_teacher_check)
    if args.host != LOOPBACK:
        log.warning("listening on %s: other machines can reach this endpoint (it has no authentication)",
                    args.host)
    print(searcher.describe())
    print(f"serving on http://{args.host}:{args.port} (POST /search, GET /health); Ctrl-C stops", flush=True)
    serve(searcher, args.host, args.port, args.threads, args.max_upload_mb << 20)
    return 0
