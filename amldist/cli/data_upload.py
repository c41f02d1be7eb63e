"""`amldist data upload`: copy a data root (or any folder under it) to an object store or shared path."""

from __future__ import annotations

import argparse
import time

from amldist.cli.common import add_command, positive_int
from amldist.errors import UserError, require


def register(data_subparsers) -> None:
    parser = add_command(data_subparsers, "upload",
                         "copy a folder (data root, shards, teacher features) or a file to an s3:// / gs:// "
                         "URI or path; manifests go last", run)
    parser.add_argument("source", help="local folder or file, e.g. data/shards or "
                                       "data/train/retrieval-SfM-120k/retrieval-SfM-120k.pkl")
    parser.add_argument("target", help="where it goes, e.g. s3://bucket/amldist/data/shards (a folder keeps "
                                       "its relative paths below it)")
    parser.add_argument("--workers", type=positive_int, default=8, help="files copied at once (default 8)")


def run(args: argparse.Namespace) -> int:
    from amldist import storage

    require(storage.is_uri(args.target) or not storage.local_path(args.target).expanduser().is_file(),
            f"{args.target} is a file, not a folder")
    started = time.perf_counter()
    try:
        files, size = storage.upload_tree(args.source, args.target, workers=args.workers)
    except OSError as err:  # pyarrow's errors are OSErrors: no such bucket, access denied, disk full
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot copy {args.source} to {args.target}: {reason}") from None
    seconds = time.perf_counter() - started
    print(f"copied {files} files, {size / 2**20:.1f} MB, to {args.target} in {seconds:.1f} s")
    return 0
