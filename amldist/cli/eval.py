"""`amldist eval`: mAP / mP@k of a network on the revisited (and old) Oxford/Paris test sets.

    amldist eval --network STUDENT.pth [--teacher TEACHER.pth --asym] --datasets roxford5k,rparis6k \
        --multiscale '[1, 1/2**(1/2), 1/2]' --whitening retrieval-SfM-120k [--distractors revisitop1m] \
        --data-root DIR [--image-size 1024] [--out results.json]

Testing modes: `sym` (student queries vs student database); with --teacher, `teacher` (the teacher
alone) and, with --asym, `asym` (student queries vs teacher database, the paper's asymmetric
testing). Learned whitening is learned in the database network's space (the teacher's for asym) and
applied to queries and database alike; it comes from the network file's meta['Lw'], else from a
cached file beside the network (`<stem>.<name>-<size>.whiten[-ms].pt`, used only if learned for
the same network file content), else it is learned and cached. Images are read from shards under
the root when they exist at this image size, else from the image folders. aml's short flags (-npath,
-d, -ms, -w, -imsize) work too.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from amldist.cli.common import (
    add_command,
    check_output_location,
    checked_device,
    existing_dir,
    existing_file,
    positive_int,
    require,
)
from amldist.datasets import formats, layout
from amldist.errors import UserError

log = logging.getLogger(__name__)

MAX_SCALE_TEXT = 200
MAX_EXPONENT = 64.0
MAX_SCALE = 4.0
# --out may replace only a results file of ours: a JSON object with the keys `run` writes.
RESULTS_KEYS = frozenset({"network", "teacher", "datasets", "scales", "image_size", "whitening", "distractors",
                          "results"})
MAX_RESULTS_BYTES = 16 << 20  # results are a few kB; anything bigger is some other file


def register(subparsers) -> None:
    parser = add_command(subparsers, "eval", "evaluate a network on ROxford5k/RParis6k (sym and asym testing)", run)
    parser.add_argument("--network", "--network-path", "-npath", required=True, type=existing_file,
                        help="student (or any) network: amldist checkpoint or cirtorch/aml network file")
    parser.add_argument("--teacher", type=existing_file, default=None, help="teacher network file: adds the teacher's own rows, and is the database network of --asym")
    parser.add_argument("--asym", action="store_true",
                        help="also test asymmetrically: student queries against the teacher's database")
    parser.add_argument("--datasets", "-d", default="roxford5k,rparis6k",
                        help="comma-separated test sets (roxford5k, rparis6k, oxford5k, paris6k)")
    parser.add_argument("--multiscale", "-ms", default="[1]",
                        help="scales, e.g. '[1, 1/2**(1/2), 1/2]' (numbers and + - * / ** only)")
    parser.add_argument("--whitening", "-w", default=None, choices=layout.TRAIN_DATASETS,
                        help="learn whitening on this dataset's whitening pairs (default: none)")
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


def parse_datasets(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    require(bool(names), "--datasets names no test set")
    for name in names:
        layout.check_dataset(name, layout.TEST_DATASETS)
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------- networks and descriptors


@dataclass(eq=False)
class LoadedNet:
    role: str
    path: Path
    net: Any

    @property
    def dim(self) -> int:
        return int(self.net.meta.outputdim)


def load_net(role: str, path: Path, device: str) -> LoadedNet:
    from amldist.checkpoints import load_checkpoint

    net, _ = load_checkpoint(path)  # amldist checkpoints and cirtorch/aml {'state_dict', 'meta'} files
    return LoadedNet(role, Path(path), net.to(device).eval())


@dataclass
class Extractor:
    """Descriptors per (network, dataset, split), computed once and reused across modes."""

    root: Path
    image_size: int
    scales: list[float]
    device: str
    batch_size: int | None
    workers: int
    ray_workers: int
    cache: dict[tuple[str, str, str], np.ndarray] = field(default_factory=dict)

    def source(self, dataset: str, split: str, count: int):
        from amldist.extract import FileSource, ShardSource

        shard_dir = layout.shards_dir(self.root, dataset, self.image_size) / split
        if (shard_dir / "manifest.json").is_file():
            log.info("%s/%s: reading shards %s", dataset, split, shard_dir)
            return ShardSource(shard_dir, crop_to_bbx=split == "query", expected_count=count)
        records = formats.list_images(self.root, dataset)[split]
        missing = [r.path for r in records if not r.path.is_file()]
        if missing:
            raise UserError(f"{len(missing)} image(s) of {dataset}/{split} are missing, e.g. {missing[0]}")
        return FileSource.from_records(records)

    def descriptors(self, network: LoadedNet, dataset: str, split: str, count: int,
                    distributed: bool = False) -> np.ndarray:
        """(count, D) descriptors; `distributed` spreads them over --ray-workers Ray tasks when asked."""
        key = (network.role, dataset, split)
        if key not in self.cache:
            source = self.source(dataset, split, count)
            self.cache[key] = self._embed(network, source, f"{network.role} {dataset}/{split}", distributed)
        return self.cache[key]

    def _embed(self, network: LoadedNet, source, desc: str, distributed: bool) -> np.ndarray:
        options = {"image_size": self.image_size, "scales": self.scales, "batch_size": self.batch_size}
        if distributed and self.ray_workers > 0:
            from amldist.distributed_extract import embed_distributed

            gpus = 1.0 if self.device.startswith("cuda") else 0.0
            return embed_distributed(network.net, source, num_workers=self.ray_workers, gpus_per_worker=gpus,
                                     **options)
        from amldist.extract import embed

        log.info("extracting %s (%d images)", desc, len(source))
        return embed(network.net, source, device=self.device, num_workers=self.workers, desc=desc, **options)


# ---------------------------------------------------------------- whitening


def whitening_cache_path(network_path: Path, name: str, image_size: int, multiscale: bool) -> Path:
    stem = network_path.name
    for suffix in (".tar", ".pth", ".pt"):
        stem = stem.removesuffix(suffix)
    return network_path.with_name(f"{stem}.{name}-{image_size}.whiten{'-ms' if multiscale else ''}.pt")


def whitening_for(network: LoadedNet, name: str, extractor: Extractor):
    """Lw of `network` on `name`: from meta['Lw'], else a matching cached file, else learned (and cached)."""
    from amldist import whiten
    from amldist.feature_store import file_sha256

    multiscale = len(extractor.scales) > 1
    stored = _stored_whitening(network, name, multiscale)
    if stored is not None:
        log.info("%s: whitening %s from the network file", network.role, name)
        return stored
    path = whitening_cache_path(network.path, name, extractor.image_size, multiscale)
    # The cache sits beside the network under a name that survives retraining, so it is keyed to the
    # network file's content: a replaced network must not reuse the Lw learned for the old one.
    settings = {"whitening": name, "image_size": extractor.image_size, "scales": list(extractor.scales),
                "network_sha256": file_sha256(network.path)}
    cached = _cached_whitening(path, settings, network)
    if cached is not None:
        return cached
    pairs = formats.read_whiten_db(layout.whiten_db_path(extractor.root, name))
    X = extractor.descriptors(network, name, "whiten", len(pairs.cids))  # (N, D)
    learned = whiten.learn_whitening(X, pairs.qidxs, pairs.pidxs)
    learned.meta.update(settings)
    try:
        whiten.save_whitening(path, learned)
    except OSError as err:
        log.warning("could not cache the whitening at %s: %s", path, err)
    return learned


def _stored_whitening(network: LoadedNet, name: str, multiscale: bool):
    """meta['Lw'][name]['ss'|'ms'] of the network file, or None; a damaged entry is a one-line error."""
    from amldist import whiten

    try:
        entry = _lw_entry(network.net.meta.extra.get("Lw"), name, "ms" if multiscale else "ss")
        if entry is None:
            return None
        lw = whiten.whitening_from_dict(entry)
        require(lw.P.shape[1] == network.dim,
                f"meta['Lw'] expects {lw.P.shape[1]}-D descriptors, the network gives {network.dim}")
    except UserError as err:
        raise UserError(f"damaged network file {network.path}: {err}") from None
    return lw


def _lw_entry(lw: Any, name: str, scale_key: str) -> Any:
    """Walk cirtorch's {name: {'ss'|'ms': {'m', 'P'}}} layout, refusing any level that is not a dict."""
    if lw is None:
        return None
    require(isinstance(lw, dict), f"meta['Lw'] is a {type(lw).__name__}, not a dict")
    per_name = lw.get(name)
    require(per_name is None or isinstance(per_name, dict),
            f"meta['Lw'][{name!r}] is a {type(per_name).__name__}, not a dict")
    return None if per_name is None else per_name.get(scale_key)


def _cached_whitening(path: Path, settings: dict[str, Any], network: LoadedNet):
    """The cached Lw when it was learned with these settings for this very network file, else None.
    The file is only a cache: a damaged one is learned again (with a warning), not an error."""
    from amldist import whiten

    if not path.is_file():
        return None
    try:
        cached = whiten.load_whitening(path)
    except UserError as err:
        log.warning("%s: ignoring the whitening cache, learning again (%s)", network.role, err)
        return None
    if all(cached.meta.get(k) == v for k, v in settings.items()) and cached.P.shape[1] == network.dim:
        log.info("%s: whitening from %s", network.role, path)
        return cached
    log.info("%s: %s was learned with other settings or another network file; learning again", network.role, path)
    return None


# ---------------------------------------------------------------- the run


def testing_modes(args: argparse.Namespace) -> list[str]:
    require(not args.asym or args.teacher is not None, "--asym needs --teacher (the database network)")
    return ["sym"] + (["teacher"] if args.teacher else []) + (["asym"] if args.asym else [])


def _networks_of(mode: str, student: LoadedNet, teacher: LoadedNet | None) -> tuple[LoadedNet, LoadedNet]:
    """(query network, database network) of a testing mode."""
    return {"sym": (student, student), "teacher": (teacher, teacher), "asym": (student, teacher)}[mode]


def evaluate_mode(mode: str, student: LoadedNet, teacher: LoadedNet | None, datasets: list[str],
                  args: argparse.Namespace, extractor: Extractor) -> dict[str, dict[str, Any]]:
    from amldist import evaluate, whiten

    query_net, db_net = _networks_of(mode, student, teacher)
    lw = whitening_for(db_net, args.whitening, extractor) if args.whitening else None
    out = {}
    for dataset in datasets:
        truth = formats.read_gnd(layout.gnd_path(args.data_root, dataset))
        db = extractor.descriptors(db_net, dataset, "db", len(truth.imlist))
        queries = extractor.descriptors(query_net, dataset, "query", len(truth.qimlist))
        distractors = None
        if args.distractors:
            count = len(formats.list_images(args.data_root, args.distractors)["db"])
            distractors = extractor.descriptors(db_net, args.distractors, "db", count, distributed=True)
        key = dataset + (f"+{args.distractors}" if args.distractors else "")
        out[key] = {"raw": evaluate.evaluate_descriptors(db, queries, truth.gnd, distractors)}
        if lw is not None:
            white = [None if x is None else whiten.apply_whitening(x, lw) for x in (db, queries, distractors)]
            out[key]["whiten"] = evaluate.evaluate_descriptors(white[0], white[1], truth.gnd, white[2])
    return out


def _check_inputs(args: argparse.Namespace, datasets: list[str]) -> None:
    for name in datasets:
        require(layout.gnd_path(args.data_root, name).is_file(),
                f"no ground truth for {name}: {layout.gnd_path(args.data_root, name)} is missing")
    if args.whitening:
        path = layout.whiten_db_path(args.data_root, args.whitening)
        require(path.is_file(), f"no whitening pairs for {args.whitening}: {path} is missing")
    require(args.workers >= 0 and args.ray_workers >= 0, "--workers and --ray-workers must be >= 0")


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


def _json_ready(value: Any) -> Any:
    """NaN (no query with positives) becomes null; numpy scalars become floats."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, float | np.floating):
        return None if math.isnan(value) else round(float(value), 4)
    return value


def run(args: argparse.Namespace) -> int:
    from amldist.atomic import atomic_write_json
    from amldist.evaluate import format_table

    scales = parse_scales(args.multiscale)
    datasets = parse_datasets(args.datasets)
    modes = testing_modes(args)
    _check_inputs(args, datasets)
    _check_out(args.out)
    device = checked_device(args.device)
    student = load_net("student", args.network, device)
    teacher = load_net("teacher", args.teacher, device) if args.teacher else None
    if args.asym:
        require(student.dim == teacher.dim, f"asymmetric testing needs equal dimensions: student "
                f"{student.dim}, teacher {teacher.dim}")
    extractor = Extractor(args.data_root, args.image_size, scales, device, args.batch_size, args.workers,
                          args.ray_workers)
    results = {mode: evaluate_mode(mode, student, teacher, datasets, args, extractor) for mode in modes}
    print(format_table(results))
    if args.out is not None:
        atomic_write_json(args.out, _json_ready({
            "network": str(args.network), "teacher": str(args.teacher) if args.teacher else None,
            "datasets": datasets, "scales": scales, "image_size": args.image_size,
            "whitening": args.whitening, "distractors": args.distractors, "results": results}))
        print(f"results written to {args.out}")
    return 0
