"""Entry point of the `amldist` console script.

Every command module under amldist.cli exposes `register(subparsers)`. User mistakes surface as
UserError (or argparse errors) and become one line on stderr with exit code 2, never a traceback. So do
operating-system errors (an output on a read-only disk, a folder where a file should go): they are the
user's paths, named in the line; `--verbose` adds the traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys

from amldist import __version__
from amldist.cli.common import Parser
from amldist.errors import INTERRUPTED_EXIT, UserError

# Command modules, in the order `amldist --help` lists them.
COMMAND_MODULES = (
    "amldist.cli.data",
    "amldist.cli.nets",
    "amldist.cli.features",
    "amldist.cli.eval",
    "amldist.cli.train",
    "amldist.cli.tune",
    "amldist.cli.export",
    "amldist.cli.index",
    "amldist.cli.search",
    "amldist.cli.serve",
    "amldist.cli.demo",
)


def build_parser() -> Parser:
    parser = Parser(prog="amldist", description="Distributed asymmetric metric learning for image retrieval.")
    parser.add_argument("--version", action="version", version=f"amldist {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports torch: Ctrl-C here is as likely as anywhere
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        if not hasattr(args, "handler"):
            parser.print_help(sys.stderr)
            return 2
        return int(args.handler(args) or 0)
    except UserError as err:
        sys.stderr.write(f"amldist: error: {err}\n")
        return 2
    except OSError as err:
        logging.getLogger(__name__).debug("operating-system error", exc_info=True)
        sys.stderr.write(f"amldist: error: {describe_os_error(err)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("amldist: interrupted\n")
        return INTERRUPTED_EXIT


def describe_os_error(err: OSError) -> str:
    """'PATH: reason' for an OSError about a path (one line), else its text's first line."""
    reason = err.strerror or (str(err).strip().splitlines() or [type(err).__name__])[0]
    paths = [str(name) for name in (err.filename, err.filename2) if name is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def run() -> None:
    """Console-script wrapper that exits with main()'s code."""
    sys.exit(main())


if __name__ == "__main__":
    run()
