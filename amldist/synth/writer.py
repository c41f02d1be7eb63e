"""Write a synthetic root: images in parallel, then the pkl/gnd/txt files, then synth.json.

Every image depends only on (seed, preset, landmark, view), so the bytes do not depend on the
order or on the number of processes. Files are written atomically, so a file under its final
name is complete: a rerun with the same parameters renders only the missing images. A root made
with other parameters is refused unless `overwrite` is set; a root holding datasets that this
generator did not write is always refused. `layout` says where the training landmarks go
(amldist/synth/layouts.py): cirtorch's SfM-120k files, a folder per landmark, or GLDv2's CSVs and tree.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from amldist.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, is_temporary
from amldist.datasets import formats, layout
from amldist.errors import UserError
from amldist.synth import layouts
from amldist.synth.camera import sample_view
from amldist.synth.params import LandmarkSpec
from amldist.synth.photo import photograph
from amldist.synth.plan import DISTRACTOR_NAME, TEST_NAMES, TRAIN_NAME, Plan, ViewTask, make_plan
from amldist.synth.presets import get_preset
from amldist.synth.render import render_scene
from amldist.synth.scenes import make_landmark

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
MANIFEST = "synth.json"


def dataset_dirs(root: Path) -> list[Path]:
    """The folders a synthetic root consists of (besides synth.json)."""
    return ([layout.train_dir(root, TRAIN_NAME)] + [layout.test_dir(root, name) for name in TEST_NAMES]
            + [layout.distractor_dir(root, DISTRACTOR_NAME)] + layouts.layout_dirs(root))


def generate(root: str | Path, preset_name: str, seed: int, workers: int | None = None,
             overwrite: bool = False, layout_name: str = "cirtorch") -> dict:
    """Write (or complete) the synthetic datasets under `root`; returns the synth.json record."""
    preset = get_preset(preset_name)
    root = Path(root).expanduser()
    identity = {"generator": "amldist.synth", "generator_version": GENERATOR_VERSION,
                "preset": preset.name, "seed": int(seed), "layout": layouts.check_layout(layout_name)}
    _prepare_root(root, identity, overwrite)
    plan = layouts.relayout(make_plan(preset, seed), layout_name, seed, preset)
    record = {**identity, "image_max_side": preset.image_max_side, "preset_params": preset.as_dict(),
              "counts": layouts.counts(plan, layout_name), "complete": False}
    atomic_write_json(root / MANIFEST, record)
    _remove_temporaries(root)
    missing = [t for t in plan.tasks if not (root / t.path).is_file()]
    log.info("%d of %d images to render (%d already there)", len(missing), len(plan.tasks),
             len(plan.tasks) - len(missing))
    render_tasks(root, seed, preset.image_max_side, missing, workers or os.cpu_count() or 1)
    _write_lists(root, plan, layout_name)
    record["complete"] = True
    atomic_write_json(root / MANIFEST, record)
    return record


def _prepare_root(root: Path, identity: dict, overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} is a file, not a folder")
    manifest = root / MANIFEST
    if not manifest.is_file():
        taken = [d for d in dataset_dirs(root) if d.exists() and any(d.iterdir())]
        if taken:
            raise UserError(f"{taken[0]} exists but {root} is not a synthetic root (no {MANIFEST}); "
                            "choose an empty folder")
        return
    try:
        existing = json.loads(manifest.read_text())
        existing.setdefault("layout", "cirtorch")  # written before there was a choice
        same = all(existing.get(key) == value for key, value in identity.items())
    except (OSError, ValueError, AttributeError):
        existing, same = {}, False
    if same and not overwrite:
        return
    if not overwrite and not existing:
        raise UserError(f"{manifest} is unreadable; pass --overwrite to replace the synthetic set")
    if not overwrite:
        raise UserError(f"{root} holds a synthetic set made with preset {existing.get('preset')!r}, seed "
                        f"{existing.get('seed')}, layout {existing.get('layout')}, generator version "
                        f"{existing.get('generator_version')}; pass --overwrite to replace it")
    log.info("removing the previous synthetic datasets under %s", root)
    for folder in dataset_dirs(root):
        shutil.rmtree(folder, ignore_errors=True)
    manifest.unlink()


def _remove_temporaries(root: Path) -> None:
    """Leftovers of atomic writes interrupted by a kill are never complete files: delete them."""
    for folder in dataset_dirs(root):
        if folder.is_dir():
            for path in folder.rglob(".*.tmp"):
                if is_temporary(path):
                    path.unlink(missing_ok=True)


def render_tasks(root: Path, seed: int, image_max_side: int, tasks: list[ViewTask], workers: int) -> None:
    """Render and write `tasks`, one job per landmark (its scene is drawn once per job)."""
    by_landmark: dict[LandmarkSpec, list[ViewTask]] = defaultdict(list)
    for task in tasks:
        by_landmark[task.landmark].append(task)
    jobs = list(by_landmark.items())
    with tqdm(total=len(tasks), unit="img", desc="synth", disable=_progress_disabled()) as bar:
        if workers <= 1 or len(jobs) <= 1:
            for spec, views in jobs:
                bar.update(render_landmark(str(root), seed, image_max_side, spec, views))
            return
        # spawn, not fork: the parent may hold threads (tqdm, torch) that fork would copy half-way.
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(render_landmark, str(root), seed, image_max_side, spec, views)
                       for spec, views in jobs]
            try:
                for future in as_completed(futures):
                    bar.update(future.result())
            except BaseException:
                for future in futures:
                    future.cancel()
                raise


def render_landmark(root: str, seed: int, image_max_side: int, spec: LandmarkSpec,
                    tasks: list[ViewTask]) -> int:
    """Worker: draw the landmark's scene once, photograph each view, write each JPEG atomically."""
    landmark = make_landmark(seed, spec)
    scene = render_scene(seed, landmark, image_max_side)
    box = landmark.box()
    for task in tasks:
        view = sample_view(seed, spec.landmark_id, task.view_id, task.kind, box, image_max_side)
        jpeg = photograph(seed, scene, view, box, spec.landmark_id, task.view_id)
        atomic_write_bytes(Path(root) / task.path, layouts.encoded(task.path, jpeg))
    return len(tasks)


def _write_lists(root: Path, plan: Plan, layout_name: str) -> None:
    if layout_name == "cirtorch":
        formats.write_sfm_db(layout.train_db_path(root, TRAIN_NAME), plan.sfm)
        formats.write_whiten_db(layout.whiten_db_path(root, TRAIN_NAME), plan.whiten)
    layouts.write_lists(root, plan, layout_name)
    for name, truth in plan.gnd.items():
        formats.write_gnd(layout.gnd_path(root, name), truth)
    atomic_write_text(layout.distractor_list_path(root, DISTRACTOR_NAME),
                      "".join(f"{line}\n" for line in plan.distractors))


def _progress_disabled() -> bool:
    return os.environ.get("AMLDIST_NO_PROGRESS") == "1" or not sys.stderr.isatty()
