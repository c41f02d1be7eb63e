"""`amldist data ...`: download real datasets, import your own, synthesise landmark datasets, write WebDataset
shards, upload to an object store."""

from __future__ import annotations

import importlib

from amldist.cli.common import add_group

# One module per data sub-command, each exposing `register(data_subparsers)`.
DATA_COMMAND_MODULES = (
    "amldist.cli.data_download",
    "amldist.cli.data_import",
    "amldist.cli.data_shards",
    "amldist.cli.data_synth",
    "amldist.cli.data_upload",
)


def register(subparsers) -> None:
    data_subparsers = add_group(subparsers, "data", "dataset download, import, synthesis and sharding")
    for name in DATA_COMMAND_MODULES:
        importlib.import_module(name).register(data_subparsers)
