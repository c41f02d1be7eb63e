"""Dataset assembly: which landmark is photographed how, and the pairs and ground truth that follow.

The plan is a pure function of (preset, seed) and needs no pixels: every image is a ViewTask
(landmark, view id, kind, path), and the SfM splits, whitening db, gnd files and distractor list
are built from the tasks. Landmark ids are global, so the SfM cluster of an image is its
landmark id and train, val, test and distractor landmarks never overlap.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from amldist.datasets import layout
from amldist.datasets.formats import GroundTruth, SfmSplit, WhitenDb
from amldist.synth import camera
from amldist.synth.params import LandmarkSpec
from amldist.synth.presets import Preset
from amldist.synth.scenes import make_landmark

PLAN_STREAM = 41
TRAIN_NAME = "retrieval-SfM-120k"
TEST_NAMES = ("roxford5k", "rparis6k")
DISTRACTOR_NAME = "revisitop1m"
TEST_PREFIX = {"roxford5k": "rox", "rparis6k": "rpar"}
HARD_SHARE = 0.35  # share of hard views among training, look-alike, other and distractor views


@dataclass(frozen=True)
class ViewTask:
    landmark: LandmarkSpec
    view_id: int
    kind: str  # camera.KINDS
    path: str  # image file, relative to the data root (posix)


@dataclass
class Plan:
    tasks: list[ViewTask]
    sfm: dict[str, SfmSplit]
    whiten: WhitenDb
    gnd: dict[str, GroundTruth]
    distractors: list[str]  # lines of revisitop1m.txt

    def counts(self) -> dict[str, dict[str, int]]:
        out = {name: {"images": len(s.cids), "clusters": len(set(s.cluster.tolist())), "pairs": len(s.qidxs)}
               for name, s in self.sfm.items()}
        out["whiten"] = {"images": len(self.whiten.cids), "pairs": len(self.whiten.qidxs)}
        for name, truth in self.gnd.items():
            out[name] = {"db": len(truth.imlist), "queries": len(truth.qimlist)}
        out[DISTRACTOR_NAME] = {"images": len(self.distractors)}
        out["total_images"] = {"images": len(self.tasks)}
        return out


class _Ids:
    """Hands out consecutive global landmark ids."""

    def __init__(self) -> None:
        self.next = 0

    def family(self, size: int, pool: str) -> list[LandmarkSpec]:
        first = self.next
        self.next += size
        return [LandmarkSpec(first + k, first, pool) for k in range(size)]


def _rng(seed: int, section: int) -> np.random.Generator:
    return np.random.default_rng([seed, PLAN_STREAM, section])


def make_plan(preset: Preset, seed: int) -> Plan:
    ids = _Ids()
    train_tasks, sfm = {}, {}
    for section, (split, count, views) in enumerate((("train", preset.train_landmarks, preset.train_views),
                                                     ("val", preset.val_landmarks, preset.val_views))):
        rng = _rng(seed, section)
        landmarks = [spec for size in _family_sizes(rng, count) for spec in ids.family(size, "train")]
        train_tasks[split] = _sfm_tasks(rng, landmarks, views, preset, seed)
        sfm[split] = _sfm_split(rng, train_tasks[split], preset.pairs_per_image)
    whiten = _whiten_db(_rng(seed, 2), train_tasks["train"] + train_tasks["val"])
    tasks = train_tasks["train"] + train_tasks["val"]
    gnd = {}
    for section, name in enumerate(TEST_NAMES, start=3):
        test_tasks, gnd[name] = _test_set(_rng(seed, section), ids, name, preset, seed)
        tasks += test_tasks
    distractor_tasks = _distractor_tasks(_rng(seed, 5), ids, preset.distractors)
    tasks += distractor_tasks
    root_of_list = layout.distractor_dir("", DISTRACTOR_NAME) / "jpg"
    lines = [str(_relative_to(t.path, root_of_list)) for t in distractor_tasks]
    return Plan(tasks, sfm, whiten, gnd, lines)


def _family_sizes(rng: np.random.Generator, count: int) -> list[int]:
    """Split `count` landmarks into families of 1-3 look-alikes."""
    sizes = []
    while sum(sizes) < count:
        sizes.append(min(int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2])), count - sum(sizes)))
    return sizes


def _kinds(rng: np.random.Generator, count: int) -> list[str]:
    return ["hard" if rng.random() < HARD_SHARE else "easy" for _ in range(count)]


def cid_of(seed: int, preset: Preset, spec: LandmarkSpec, view_id: int) -> str:
    """A 32-hex SfM image id, stable for (seed, preset, landmark, view)."""
    return hashlib.md5(
        f"amldist-synth/{preset.name}/{seed}/{spec.landmark_id}/{view_id}".encode()).hexdigest()


def _sfm_tasks(rng, landmarks: list[LandmarkSpec], views: int, preset: Preset, seed: int) -> list[ViewTask]:
    ims = layout.train_images_dir("", TRAIN_NAME)
    tasks = []
    for spec in landmarks:
        count = max(2, round(views * rng.uniform(0.6, 1.4)))  # SfM clusters vary in size
        for view_id, kind in enumerate(_kinds(rng, count)):
            path = layout.cid2filename(cid_of(seed, preset, spec, view_id), ims)
            tasks.append(ViewTask(spec, view_id, kind, path.as_posix()))
    return tasks


def _pairs(rng: np.random.Generator, clusters: list[int], per_image: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image as query `per_image` times, with a random other image of its cluster as positive."""
    members = defaultdict(list)
    for index, cluster in enumerate(clusters):
        members[cluster].append(index)
    qidxs, pidxs = [], []
    for index, cluster in enumerate(clusters):
        others = [j for j in members[cluster] if j != index]
        picks = rng.choice(others, size=min(per_image, len(others)), replace=False)
        qidxs += [index] * len(picks)
        pidxs += [int(j) for j in picks]
    return np.asarray(qidxs, dtype=np.int64), np.asarray(pidxs, dtype=np.int64)


def _sfm_split(rng, tasks: list[ViewTask], per_image: int) -> SfmSplit:
    clusters = [t.landmark.landmark_id for t in tasks]
    qidxs, pidxs = _pairs(rng, clusters, per_image)
    cids = [t.path.rsplit("/", 1)[-1] for t in tasks]
    return SfmSplit(cids, np.asarray(clusters, dtype=np.int64), qidxs, pidxs)


def _whiten_db(rng, tasks: list[ViewTask]) -> WhitenDb:
    """All SfM images (train then val), each with one pair of its own: like the real whitening set."""
    qidxs, pidxs = _pairs(rng, [t.landmark.landmark_id for t in tasks], 1)
    return WhitenDb([t.path.rsplit("/", 1)[-1] for t in tasks], qidxs, pidxs)


def _test_set(rng, ids: _Ids, name: str, preset: Preset, seed: int) -> tuple[list[ViewTask], GroundTruth]:
    jpg = layout.test_images_dir("", name)
    db, queries = [], []
    views_so_far: dict[int, int] = defaultdict(int)

    def add(spec: LandmarkSpec, kinds: list[str], into: list) -> None:
        start = views_so_far[spec.landmark_id]
        views_so_far[spec.landmark_id] += len(kinds)
        for view_id, kind in enumerate(kinds, start=start):
            image = f"{TEST_PREFIX[name]}_{spec.landmark_id:06d}_{view_id:04d}"
            into.append((image, ViewTask(spec, view_id, kind, (jpg / f"{image}.jpg").as_posix())))

    query_landmarks = []
    for _ in range(preset.query_landmarks):
        family = ids.family(1 + int(rng.integers(1, 3)), name)  # the query landmark + 1-2 look-alikes
        query_landmarks.append(family[0])
        add(family[0], ["query"] * preset.queries_per_landmark, queries)
        add(family[0], ["easy"] * preset.db_easy + ["hard"] * preset.db_hard + ["junk"] * preset.db_junk, db)
        for lookalike in family[1:]:
            add(lookalike, _kinds(rng, preset.lookalike_views), db)
    for size in _family_sizes(rng, preset.other_landmarks):
        for spec in ids.family(size, name):
            add(spec, _kinds(rng, preset.other_views), db)
    db.sort(key=lambda item: item[0])  # like the real lists: alphabetical image names
    return [t for _, t in queries + db], GroundTruth([n for n, _ in db], [n for n, _ in queries],
                                                     _ground_truth(seed, preset, db, queries))


def _ground_truth(seed: int, preset: Preset, db, queries) -> list[dict]:
    """Per query: the box of its landmark in the query image; easy/hard/junk db views of that landmark."""
    by_landmark = defaultdict(lambda: defaultdict(list))
    for index, (_, task) in enumerate(db):
        by_landmark[task.landmark.landmark_id][task.kind].append(index)
    boxes = {}
    gnd = []
    for _, task in queries:
        spec = task.landmark
        if spec.landmark_id not in boxes:
            boxes[spec.landmark_id] = make_landmark(seed, spec).box()
        view = camera.sample_view(seed, spec.landmark_id, task.view_id, task.kind, boxes[spec.landmark_id],
                                  preset.image_max_side)
        bbx, _ = camera.box_in_image(view, boxes[spec.landmark_id])
        lists = by_landmark[spec.landmark_id]
        gnd.append({"bbx": np.asarray(bbx), "easy": np.asarray(lists["easy"], dtype=np.int64),
                    "hard": np.asarray(lists["hard"], dtype=np.int64),
                    "junk": np.asarray(lists["junk"], dtype=np.int64)})
    return gnd


def _distractor_tasks(rng, ids: _Ids, count: int) -> list[ViewTask]:
    """Other scenes, 1-3 photos each, none of them ever a query landmark."""
    jpg = layout.distractor_dir("", DISTRACTOR_NAME) / "jpg"
    tasks: list[ViewTask] = []
    while len(tasks) < count:
        for spec in ids.family(int(rng.choice([1, 2], p=[0.7, 0.3])), "distractors"):
            for view_id, kind in enumerate(_kinds(rng, min(int(rng.integers(1, 4)), count - len(tasks)))):
                path = (jpg / f"{spec.landmark_id % 100:02d}"
                        / f"synth_{spec.landmark_id:07d}_{view_id:02d}.jpg")
                tasks.append(ViewTask(spec, view_id, kind, path.as_posix()))
    return tasks


def _relative_to(path: str, base) -> str:
    return path[len(base.as_posix()) + 1:]
