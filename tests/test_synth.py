"""The synthetic landmark generator: determinism, real formats, pair/cluster and gnd invariants,
idempotent reruns, refusals, and the camera's view kinds. Uses the `micro` preset (128 px)."""

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from amldist.cli.main import main
from amldist.datasets import formats, layout
from amldist.errors import UserError
from amldist.synth import generate
from amldist.synth.camera import box_in_image, sample_view
from amldist.synth.params import LandmarkSpec
from amldist.synth.photo import photograph
from amldist.synth.plan import TEST_NAMES, make_plan
from amldist.synth.presets import PRESETS
from amldist.synth.render import render_scene
from amldist.synth.scenes import make_landmark

SEED = 3
ALL = ("retrieval-SfM-120k", "roxford5k", "rparis6k", "revisitop1m")


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def micro_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "root"
    generate(root, "micro", SEED, workers=2)
    return root


def test_same_seed_same_bytes_whatever_the_process_count(micro_root, tmp_path):
    generate(tmp_path / "again", "micro", SEED, workers=1)
    assert tree_digest(tmp_path / "again") == tree_digest(micro_root)
    generate(tmp_path / "other", "micro", SEED + 1, workers=1)
    other = tree_digest(tmp_path / "other")
    assert other != tree_digest(micro_root)
    # Not only the names: the pictures themselves change with the seed.
    ours = {k: v for k, v in tree_digest(micro_root).items() if k.startswith("test/roxford5k/jpg/rox_000")}
    assert any(other.get(name) not in (None, digest) for name, digest in ours.items())


def test_every_dataset_reads_back_with_the_real_readers(micro_root):
    plan_counts = make_plan(PRESETS["micro"], SEED).counts()
    for name in ALL:
        splits = formats.list_images(micro_root, name)
        for split, records in splits.items():
            assert records, (name, split)
            for record in records:
                assert record.path.is_file(), record.path
        if name == "retrieval-SfM-120k":
            assert len(splits["train"]) == plan_counts["train"]["images"]
            assert all(len(r.name) == 32 and int(r.name, 16) >= 0 for r in splits["train"])
            assert splits["train"][0].path == layout.cid2filename(splits["train"][0].name,
                                                                  layout.train_images_dir(micro_root, name))
    image = Image.open(formats.list_images(micro_root, "roxford5k")["db"][0].path)
    assert image.format == "JPEG" and max(image.size) <= PRESETS["micro"].image_max_side


def test_images_keep_realistic_aspect_ratios(micro_root):
    ratios = set()
    for record in formats.list_images(micro_root, "retrieval-SfM-120k")["train"]:
        with Image.open(record.path) as image:
            w, h = image.size
        ratios.add(min((abs(w / h - a), a) for a in (4 / 3, 3 / 4, 16 / 9, 1.0))[1])
        assert min(abs(w / h - a) for a in (4 / 3, 3 / 4, 16 / 9, 1.0)) < 0.03
    assert {4 / 3, 3 / 4} <= ratios


def test_pairs_stay_in_their_cluster_and_val_is_disjoint(micro_root):
    db = formats.read_sfm_db(layout.train_db_path(micro_root, "retrieval-SfM-120k"))
    for split in db.values():
        assert len(split.qidxs) > 0
        assert np.all(split.cluster[split.qidxs] == split.cluster[split.pidxs])
        assert np.all(split.qidxs != split.pidxs)
    assert not set(db["train"].cluster.tolist()) & set(db["val"].cluster.tolist())
    whiten = formats.read_whiten_db(layout.whiten_db_path(micro_root, "retrieval-SfM-120k"))
    cluster_of = {cid: c for s in db.values() for cid, c in zip(s.cids, s.cluster.tolist())}
    assert set(whiten.cids) == set(cluster_of)
    assert all(cluster_of[whiten.cids[q]] == cluster_of[whiten.cids[p]]
               for q, p in zip(whiten.qidxs, whiten.pidxs))


def _landmark_of(image_name: str) -> int:
    return int(image_name.split("_")[1])  # names are <prefix>_<landmark id>_<view id>


def test_ground_truth_follows_the_revisited_protocol(micro_root):
    db = formats.read_sfm_db(layout.train_db_path(micro_root, "retrieval-SfM-120k"))
    training = set(db["train"].cluster.tolist()) | set(db["val"].cluster.tolist())
    for name in TEST_NAMES:
        truth = formats.read_gnd(layout.gnd_path(micro_root, name))
        assert truth.protocol == "revisited"
        assert len(truth.qimlist) == PRESETS["micro"].query_landmarks * PRESETS["micro"].queries_per_landmark
        assert not set(truth.qimlist) & set(truth.imlist)  # queries are not in the database
        assert not {_landmark_of(n) for n in truth.imlist + truth.qimlist} & training
        for query, entry in zip(truth.qimlist, truth.gnd):
            easy, hard, junk = (set(entry[k].tolist()) for k in ("easy", "hard", "junk"))
            assert easy and not (easy & hard or easy & junk or hard & junk)
            assert all(0 <= i < len(truth.imlist) for i in easy | hard | junk)
            assert {_landmark_of(truth.imlist[i]) for i in easy | hard | junk} == {_landmark_of(query)}
            # Every view of the query's landmark in the db is labelled, and nothing else is.
            same = {i for i, n in enumerate(truth.imlist) if _landmark_of(n) == _landmark_of(query)}
            assert same == easy | hard | junk
            with Image.open(layout.test_images_dir(micro_root, name) / f"{query}.jpg") as image:
                w, h = image.size
            x1, y1, x2, y2 = entry["bbx"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            assert (x2 - x1) * (y2 - y1) > 0.08 * w * h  # the landmark is clearly visible in a query


def test_views_of_each_kind_look_as_labelled():
    visible = {"easy": [], "junk": []}
    for landmark_id in range(12):
        landmark = make_landmark(SEED, LandmarkSpec(landmark_id, landmark_id, "train"))
        box = landmark.box()
        for view_id in range(20):
            for kind in ("query", "easy", "junk"):
                view = sample_view(SEED, landmark_id, view_id * 3 + len(kind), kind, box, 512)
                bbx, share = box_in_image(view, box)
                area = (bbx[2] - bbx[0]) * (bbx[3] - bbx[1]) / (view.size[0] * view.size[1])
                if kind == "query":
                    assert share > 0.97 and area > 0.08
                elif kind == "easy":
                    assert share > 0.9
                    visible["easy"].append(area * share)
                else:
                    assert view.mode == "occluded" or share < 0.35 or area < 0.05, (view.mode, share, area)
                    visible["junk"].append(area * share if view.mode != "occluded" else 0.0)
    assert np.median(visible["easy"]) > 5 * np.median(visible["junk"])


def test_lookalikes_share_a_silhouette_but_differ():
    a, b = (make_landmark(SEED, LandmarkSpec(i, 100, "roxford5k")) for i in (100, 101))
    stranger = make_landmark(SEED, LandmarkSpec(102, 102, "roxford5k"))
    assert a.style == b.style and len(a.facade.towers) == len(b.facade.towers)
    assert a.facade != b.facade and a.surroundings != b.surroundings
    assert stranger.facade != a.facade


def test_rerun_renders_only_what_is_missing(micro_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(micro_root, root)
    victim = formats.list_images(root, "rparis6k")["db"][3].path
    original = victim.read_bytes()
    victim.unlink()
    leftover = victim.parent / f".{victim.name}.abc123.tmp"  # what a killed atomic write leaves
    leftover.write_bytes(b"half a jpeg")
    untouched = formats.list_images(root, "roxford5k")["db"][0].path
    before = untouched.stat().st_mtime_ns
    generate(root, "micro", SEED, workers=1)
    assert victim.read_bytes() == original
    assert not leftover.exists()
    assert untouched.stat().st_mtime_ns == before
    assert tree_digest(root) == tree_digest(micro_root)


def test_other_parameters_need_overwrite(micro_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(micro_root, root)
    with pytest.raises(UserError, match="--overwrite"):
        generate(root, "micro", SEED + 7, workers=1)
    old_images = formats.list_images(root, "retrieval-SfM-120k")["train"]
    generate(root, "micro", SEED + 7, workers=1, overwrite=True)
    assert not any(r.path.exists() for r in old_images)  # the old set is gone, not mixed in
    assert all(r.path.is_file() for name in ALL for rs in formats.list_images(root, name).values()
               for r in rs)
    assert '"seed": 10' in (root / "synth.json").read_text()


def test_foreign_data_root_is_refused(tmp_path):
    jpg = layout.test_images_dir(tmp_path, "roxford5k")
    jpg.mkdir(parents=True)
    (jpg / "all_souls_000000.jpg").write_bytes(b"real data")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not a synthetic root"):
            generate(tmp_path, "micro", SEED, overwrite=overwrite)
    assert (jpg / "all_souls_000000.jpg").read_bytes() == b"real data"


def test_cli_reports_and_skips_existing_images(micro_root, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(micro_root, root)
    assert main(["data", "synth", "--root", str(root), "--preset", "micro", "--seed", str(SEED),
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "preset micro" in out and "roxford5k" in out
    assert tree_digest(root) == tree_digest(micro_root)


def test_cli_bad_preset_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data", "synth", "--root", str(tmp_path), "--preset", "huge"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "huge" in err


def test_cli_other_seed_is_one_line_exit_2(micro_root, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(micro_root, root)
    assert main(["data", "synth", "--root", str(root), "--preset", "micro", "--seed", "99"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err


def test_jpeg_bytes_decode_to_the_planned_size():
    plan = make_plan(PRESETS["micro"], SEED)
    task = plan.tasks[0]
    landmark = make_landmark(SEED, task.landmark)
    view = sample_view(SEED, task.landmark.landmark_id, task.view_id, task.kind, landmark.box(), 128)
    data = photograph(SEED, render_scene(SEED, landmark, 128), view, landmark.box(),
                      task.landmark.landmark_id, task.view_id)
    assert Image.open(io.BytesIO(data)).size == view.size
