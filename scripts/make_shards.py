"""Write WebDataset shards of datasets: the same function and flags as `amldist data shards`.

    python scripts/make_shards.py --root DATA --dataset roxford5k,rparis6k --workers 8
"""

from __future__ import annotations

import logging
import sys

from amldist.cli.common import Parser
from amldist.cli.data_shards import add_arguments, run_shards
from amldist.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="make_shards.py", description="write WebDataset shards of datasets (resumable)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_shards(args)
    except UserError as err:
        sys.stderr.write(f"make_shards.py: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("make_shards.py: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
