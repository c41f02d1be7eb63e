"""Pieces every command module shares: the parser class and small argument helpers."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import NoReturn

from amldist.errors import require


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def add_command(subparsers, name: str, help_text: str, handler) -> Parser:
    """Add a sub-command whose parsed args are passed to `handler(args) -> int | None`."""
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(handler=handler, command_parser=parser)
    return parser


def add_group(subparsers, name: str, help_text: str):
    """Add a command that only holds sub-commands (`amldist data ...`); returns its subparsers."""
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(handler=lambda args: _missing_subcommand(parser), command_parser=parser)
    return parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=Parser)


def _missing_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def existing_dir(text: str) -> Path:
    """argparse type: a folder that must exist."""
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return path


def existing_file(text: str) -> Path:
    """argparse type: a file that must exist."""
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0: {text}")
    return value


def check_output_location(path: Path, what: str) -> None:
    """Refuse, before any work, an output that is a folder or special file, or whose folder cannot be
    made or written (the nearest existing ancestor is a file, or not writable)."""
    require(not path.is_dir(), f"{what} {path} is a folder, not a file")
    require(not path.exists() or path.is_file(), f"{what} {path} exists and is not a regular file")
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    require(ancestor.is_dir(), f"{what} {path}: {ancestor} is a file, not a folder")
    require(os.access(ancestor, os.W_OK | os.X_OK), f"{what} {path}: cannot write in {ancestor}")
