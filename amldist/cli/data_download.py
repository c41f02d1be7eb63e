"""`amldist data download NAME... --root DIR`: fetch the real datasets into cirtorch's layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from amldist.cli.common import add_command, non_negative_int, positive_float
from amldist.datasets import download, layout, urls
from amldist.errors import require


def register(data_subparsers) -> None:
    parser = add_command(data_subparsers, "download",
                         "download real datasets (SfM-120k, (R)Oxford/(R)Paris, R1M) into cirtorch's layout",
                         _run)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"dataset(s) to fetch: {', '.join(urls.DOWNLOADABLE)}")
    parser.add_argument("--root", type=Path,
                        help="data root, created if missing (ROOT/train, ROOT/test, ...)")
    parser.add_argument("--list", action="store_true",
                        help="print every dataset name and its URLs, then exit")
    parser.add_argument("--base-url", metavar="URL",
                        help="fetch from this base instead of the public hosts; URL paths are kept, "
                             "e.g. a mirror serving BASE/cnnimageretrieval/data/train/ims/ims.tar.gz")
    parser.add_argument("--legacy-archives", action="store_true",
                        help="use the original (not face-blurred) Oxford/Paris archives, as budnikm/aml")
    parser.add_argument("--keep-archives", action="store_true",
                        help="keep the image archives beside their folder after extraction")
    parser.add_argument("--retries", type=non_negative_int, default=download.DownloadOptions.retries,
                        help="extra attempts after a dropped connection or server error (resuming)")
    parser.add_argument("--timeout", type=positive_float, default=download.DownloadOptions.timeout_s,
                        metavar="SECONDS", help="socket timeout of one request")


def _run(args: argparse.Namespace) -> int:
    options = download.DownloadOptions(base_url=args.base_url, legacy_archives=args.legacy_archives,
                                       keep_archives=args.keep_archives, retries=args.retries,
                                       timeout_s=args.timeout)
    if args.base_url is not None:
        urls.check_base_url(args.base_url)
    if args.list:
        _print_list(options)
        return 0
    require(bool(args.names), "name at least one dataset to download (see --list)")
    require(args.root is not None, "--root DIR is required: the data root to download into")
    for name in args.names:  # every name checked before any download starts
        layout.check_dataset(name, urls.DOWNLOADABLE)
    for name in dict.fromkeys(args.names):
        print(download.download(name, args.root, options), flush=True)
    return 0


def _print_list(options: download.DownloadOptions) -> None:
    for name, addresses in download.list_urls(options).items():
        print(name)
        for address in _abbreviated(addresses):
            print(f"  {address}")


def _abbreviated(addresses: tuple[str, ...]) -> list[str]:
    """Numbered archive series (revisitop1m.1 ... .100) on one line."""
    series = [a for a in addresses if a.endswith(".1.tar.gz")]
    if not series:
        return list(addresses)
    head = series[0][:-len("1.tar.gz")]
    numbered = [a for a in addresses if a.startswith(head) and a.endswith(".tar.gz")]
    others = [a for a in addresses if a not in numbered]
    return others + [f"{head}{{1..{len(numbered)}}}.tar.gz"]
