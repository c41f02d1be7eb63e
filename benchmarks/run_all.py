"""Run every benchmarks/bench_*.py in turn (`make bench`); each prints its own table and writes
runs/bench/<name>.json. Pass --quick to run the small versions (used to check they still work)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"=== {script.stem}", flush=True)
        if subprocess.run([sys.executable, str(script), *argv], check=False).returncode != 0:
            failed.append(script.stem)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
