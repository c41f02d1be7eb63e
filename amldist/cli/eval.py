"""`amldist eval`: mAP / mP@k of a network on the revisited (and old) Oxford/Paris test sets.

    amldist eval --network STUDENT.pth [--teacher TEACHER.pth --asym] --datasets roxford5k,rparis6k \
        --multiscale '[1, 1/2**(1/2), 1/2]' --whitening retrieval-SfM-120k [--distractors revisitop1m] \
        --data-root DIR [--image-size 1024] [--out results.json]

Testing modes (`amldist.evaluation`): `sym` (student queries vs student database); with --teacher,
`teacher` (the teacher alone) and, with --asym, `asym` (student queries vs teacher database, the paper's
asymmetric testing). Learned whitening is learned in the database network's space (the teacher's for
asym) and applied to queries and database alike; it comes from the network file's meta['Lw'], else from
a cached file beside the network (`<stem>.<name>-<size>.whiten[-ms].pt`, used only if learned for the
same network file content), else it is learned and cached. Images are read from shards under the root
when they exist at this image size, else from the image folders. aml's short flags (-npath, -d, -ms,
-w, -imsize) work too.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import operator
from pathlib import Path

from amldist.cli.common import add_command, check_output_location, existing_dir, existing_file, positive_int
from amldist.datasets import layout
from amldist.errors import UserError, require

log = logging.getLogger(__name__)

MAX_SCALE_TEXT = 200
MAX_EXPONENT = 64.0
MAX_SCALE = 4.0
# --out may replace only a results file of ours: a JSON object with the keys `run` writes.
RESULTS_KEYS = frozenset({"network", "teacher", "datasets", "scales", "image_size", "whitening",
                          "distractors", "results"})
MAX_RESULTS_BYTES = 16 << 20  # results are a few kB; anything bigger is some other file


def register(subparsers) -> None:
    parser = add_command(subparsers, "eval",
                         "evaluate a network on ROxford5k/RParis6k (sym and asym testing)", run)
    parser.add_argument("--network", "--network-path", "-npath", required=True, type=existing_file,
                        help="student (or any) network: amldist checkpoint or cirtorch/aml network file")
    parser.add_argument("--teacher", type=existing_file, default=None,
                        help="teacher network file: adds the teacher's own rows, "
                             "and is the database network of --asym")
    parser.add_argument("--asym", action="store_true",
                        help="also test asymmetrically: student queries against the teacher's database")
    parser.add_argument("--datasets", "-d", default="roxford5k,rparis6k",
                        help="comma-separated test sets (roxford5k, rparis6k, oxford5k, paris6k)")
    parser.add_argument("--multiscale", "-ms", default="[1]",
                        help="scales, e.g. '[1, 1/2**(1/2), 1/2]' (numbers and + - * / ** only)")
    parser.add_argument("--whitening", "-w", default=None, type=training_set, metavar="TRAINING_SET",
                        help="learn whitening on this training set's pairs: a public one or a "
                             "`data import` name (default: none)")
    parser.add_argument("--distractors", default=None, choices=layout.DISTRACTOR_DATASETS,
                        help="add this distractor set to every database (+R1M)")
    parser.add_argument("--data-root", required=True, type=existing_dir, help="data root (cirtorch layout)")
    parser.add_argument("--image-size", "-imsize", type=positive_int, default=1024,
                        help="longest image side (default 1024)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the results as JSON here (replaces only an earlier results file)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="images per forward pass (default: 16 on a GPU, 4 on the CPU)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader decoding workers (default 2)")
    parser.add_argument("--ray-workers", type=int, default=0,
                        help="extract the distractors with this many Ray tasks (default 0: this process)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


# ---------------------------------------------------------------- --multiscale: arithmetic only

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv, ast.Pow: operator.pow}


def _arithmetic(node: ast.AST) -> float:
    """Value of a number / + - * / ** / unary sign expression; anything else is refused."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _arithmetic(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _arithmetic(node.left), _arithmetic(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or abs(left) > 1e6):
            raise UserError("--multiscale: powers are limited to small numbers")
        try:
            return float(_OPERATORS[type(node.op)](left, right))
        except (ZeroDivisionError, OverflowError, TypeError) as err:
            raise UserError(f"--multiscale: cannot compute {ast.unparse(node)} ({err})") from None
    raise UserError("--multiscale accepts only numbers and + - * / ** (e.g. '[1, 1/2**(1/2), 1/2]')")


def parse_scales(text: str) -> list[float]:
    """'[1, 1/2**(1/2), 1/2]' -> [1.0, 0.7071..., 0.5]; never evaluates code."""
    if len(text) > MAX_SCALE_TEXT:
        raise UserError(f"--multiscale is longer than {MAX_SCALE_TEXT} characters")
    try:
        body = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise UserError(f"--multiscale is not a list of numbers: {text!r}") from None
    items = body.elts if isinstance(body, (ast.List, ast.Tuple)) else [body]
    scales = [_arithmetic(item) for item in items]
    if not scales or any(not (math.isfinite(s) and 0 < s <= MAX_SCALE) for s in scales):
        raise UserError(f"--multiscale values must lie in (0, {MAX_SCALE:g}], got {text!r}")
    return scales


def training_set(text: str) -> str:
    """argparse type of --whitening: a public training set or one made by `amldist data import`."""
    try:
        kind = layout.dataset_kind(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if kind != "train":
        raise argparse.ArgumentTypeError(f"{text} is a {kind} set, not a training set with whitening pairs")
    return text


def parse_datasets(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    require(bool(names), "--datasets names no test set")
    for name in names:
        layout.check_dataset(name, layout.TEST_DATASETS)
    return list(dict.fromkeys(names))


def _is_results_file(path: Path) -> bool:
    if path.stat().st_size > MAX_RESULTS_BYTES:
        return False
    try:
        stored = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError:  # not UTF-8 or not JSON (e.g. a checkpoint)
        return False
    return isinstance(stored, dict) and RESULTS_KEYS <= set(stored) and isinstance(stored["results"], dict)


def _check_out(path: Path | None) -> None:
    """--out is checked before evaluating, and may replace only an earlier results file: a mistyped
    path must not turn a checkpoint (or any other file) into JSON."""
    if path is None:
        return
    check_output_location(path, "--out")
    require(not path.exists() or _is_results_file(path),
            f"--out {path} exists and is not an amldist eval results file; refusing to replace it")


def run(args: argparse.Namespace) -> int:
    from amldist.atomic import atomic_write_json, json_ready
    from amldist.evaluate import format_table
    from amldist.evaluation import EvalSettings, evaluate_networks, testing_modes
    from amldist.extract import checked_device

    scales = parse_scales(args.multiscale)
    datasets = parse_datasets(args.datasets)
    modes = testing_modes(args.teacher is not None, args.asym)
    require(args.workers >= 0 and args.ray_workers >= 0, "--workers and --ray-workers must be >= 0")
    settings = EvalSettings(args.data_root, tuple(datasets), args.image_size, tuple(scales), args.whitening,
                            args.distractors, checked_device(args.device), args.batch_size, args.workers,
                            args.ray_workers)
    _check_out(args.out)
    results = evaluate_networks(args.network, args.teacher, modes, settings)
    print(format_table(results))
    if args.out is not None:
        atomic_write_json(args.out, json_ready({
            "network": str(args.network), "teacher": str(args.teacher) if args.teacher else None,
            "datasets": datasets, "scales": scales, "image_size": args.image_size,
            "whitening": args.whitening, "distractors": args.distractors, "results": results}, digits=4))
        print(f"results written to {args.out}")
    return 0
