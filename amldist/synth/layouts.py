"""Where the synthetic training landmarks go: cirtorch's layout (SfM-120k pkl + ims/), a folder per landmark,
or GLDv2's CSVs and a/b/c/<id>.jpg tree. The last two are what `amldist data import` reads, so both
importers run end to end on generated data. Test sets and distractors keep cirtorch's layout in every case.

- folders: `landmarks/landmark_<id>/view_<v>.jpg`; every third view one folder deeper (`more/`) and every
  fifth stored as PNG, since an import accepts any depth and any format PIL reads.
- gldv2: `gldv2/train/<a>/<b>/<c>/<id>.jpg` with a 16-hex-digit id, `gldv2/train.csv` (id,url,landmark_id;
  rows sorted by id, so landmarks interleave) and `gldv2/train_clean.csv` (landmark_id,images) listing the
  same images per landmark.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
from collections import defaultdict
from pathlib import Path

from PIL import Image

from amldist.atomic import atomic_path
from amldist.datasets import layout as data_layout
from amldist.errors import UserError
from amldist.synth.plan import TRAIN_NAME, Plan, ViewTask
from amldist.synth.presets import Preset

LAYOUTS = ("cirtorch", "folders", "gldv2")
FOLDERS_DIR = "landmarks"
GLDV2_DIR = "gldv2"
DEEPER_EVERY, PNG_EVERY = 3, 5
URL_PREFIX = "https://example.org/synthetic-landmarks/"  # a documentation host: the URLs are never fetched


def check_layout(name: str) -> str:
    if name not in LAYOUTS:
        raise UserError(f"unknown synth layout {name!r}; choose from {', '.join(LAYOUTS)}")
    return name


def layout_dirs(root: Path) -> list[Path]:
    """The folders the non-cirtorch layouts write (for the generator's checks and --overwrite)."""
    return [root / FOLDERS_DIR, root / GLDV2_DIR]


def gldv2_id(seed: int, preset: Preset, task: ViewTask) -> str:
    text = f"amldist-synth-gldv2/{preset.name}/{seed}/{task.landmark.landmark_id}/{task.view_id}"
    return hashlib.md5(text.encode()).hexdigest()[:16]


def _is_training(task: ViewTask) -> bool:
    return task.path.startswith(data_layout.train_images_dir("", TRAIN_NAME).as_posix() + "/")


def _new_path(task: ViewTask, name: str, seed: int, preset: Preset) -> str:
    if name == "folders":
        deeper = "more/" if task.view_id % DEEPER_EVERY == DEEPER_EVERY - 1 else ""
        suffix = ".png" if task.view_id % PNG_EVERY == PNG_EVERY - 1 else ".jpg"
        landmark = f"landmark_{task.landmark.landmark_id:05d}"
        return f"{FOLDERS_DIR}/{landmark}/{deeper}view_{task.view_id:03d}{suffix}"
    image_id = gldv2_id(seed, preset, task)
    return f"{GLDV2_DIR}/train/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def relayout(plan: Plan, name: str, seed: int, preset: Preset) -> Plan:
    """The plan with its training views moved to layout `name` (the plan itself for cirtorch)."""
    if check_layout(name) == "cirtorch":
        return plan
    tasks = [dataclasses.replace(t, path=_new_path(t, name, seed, preset)) if _is_training(t) else t
             for t in plan.tasks]
    return dataclasses.replace(plan, tasks=tasks)


def training_tasks(plan: Plan, name: str) -> list[ViewTask]:
    prefix = f"{FOLDERS_DIR}/" if name == "folders" else f"{GLDV2_DIR}/train/"
    return [t for t in plan.tasks if t.path.startswith(prefix)]


def counts(plan: Plan, name: str) -> dict[str, dict[str, int]]:
    """plan.counts() with the training part described as this layout holds it (no pairs: the import draws
    them)."""
    out = plan.counts()
    if name == "cirtorch":
        return out
    for key in ("train", "val", "whiten"):
        del out[key]
    tasks = training_tasks(plan, name)
    entry = {"images": len(tasks), "landmarks": len({t.landmark.landmark_id for t in tasks})}
    return {(FOLDERS_DIR if name == "folders" else GLDV2_DIR): entry, **out}


def encoded(path: str, jpeg: bytes) -> bytes:
    """The bytes to store at `path`: the JPEG as rendered, or re-encoded losslessly for a .png path."""
    if not path.endswith(".png"):
        return jpeg
    with Image.open(io.BytesIO(jpeg)) as image:
        out = io.BytesIO()
        image.save(out, "PNG")
    return out.getvalue()


def write_lists(root: Path, plan: Plan, name: str) -> None:
    """GLDv2's two CSVs (the folder layout needs no list)."""
    if name != "gldv2":
        return
    rows = sorted((Path(t.path).stem, t.landmark.landmark_id) for t in training_tasks(plan, name))
    _write_csv(root / GLDV2_DIR / "train.csv", ["id", "url", "landmark_id"],
               [[image_id, f"{URL_PREFIX}landmark,{landmark}/{image_id}.jpg", landmark]
                for image_id, landmark in rows])
    by_landmark = defaultdict(list)
    for image_id, landmark in rows:
        by_landmark[landmark].append(image_id)
    _write_csv(root / GLDV2_DIR / "train_clean.csv", ["landmark_id", "images"],
               [[landmark, " ".join(ids)] for landmark, ids in sorted(by_landmark.items())])


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
