"""`amldist data import`: folder and GLDv2 imports of synthetic trees checked against SfM-120k's format as
cirtorch reads it, bad trees (skipped and counted, or one line and exit 2), reruns, and the pair draw."""

import hashlib
import io
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from amldist.cli.main import main
from amldist.datasets import formats
from amldist.datasets.importing import (
    ImportOptions,
    RunSettings,
    import_folders,
    import_gldv2,
    read_gldv2_csv,
)
from amldist.datasets.importing.pairs import cycle_pairs, whiten_pairs
from amldist.errors import UserError
from amldist.synth import generate

SEED = 5
OPTIONS = ImportOptions(min_side=16, val_fraction=0.25, seed=1)  # micro views can be 50 px on the short side
IN_PROCESS = RunSettings(workers=0)


@pytest.fixture(scope="module")
def folder_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folders")
    generate(root, "micro", SEED, workers=1, layout_name="folders")
    return root


@pytest.fixture(scope="module")
def gldv2_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gldv2")
    generate(root, "micro", SEED, workers=1, layout_name="gldv2")
    return root


def cirtorch_path(cid: str, prefix: Path) -> Path:
    """SfM-120k's image path as REFERENCE.md states it: prefix/cid[-2:]/cid[-4:-2]/cid[-6:-4]/cid."""
    return prefix / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid


def check_sfm_format(root: Path, name: str) -> dict:
    """The checks a cirtorch user would make: plain pickles with exactly the keys and types cirtorch reads,
    images where cid2filename puts them (bytes matching the cid), pairs inside a landmark, val unseen."""
    folder = root / "train" / name
    with open(folder / f"{name}.pkl", "rb") as handle:
        db = pickle.load(handle)
    assert set(db) == {"train", "val"}
    cluster_of = {}
    for split in ("train", "val"):
        part = db[split]
        assert set(part) == {"cids", "cluster", "qidxs", "pidxs"}
        assert all(type(part[key]) is list for key in part)
        cids, cluster, qidxs, pidxs = part["cids"], part["cluster"], part["qidxs"], part["pidxs"]
        assert len(cluster) == len(cids) and len(qidxs) == len(pidxs) > 0
        assert all(type(c) is str and len(c) == 32 and c == c.lower() and int(c, 16) >= 0 for c in cids)
        assert all(type(v) is int for v in cluster + qidxs + pidxs)
        assert all(0 <= q < len(cids) and 0 <= p < len(cids) and q != p for q, p in zip(qidxs, pidxs))
        # a query and its positive share a landmark
        assert all(cluster[q] == cluster[p] for q, p in zip(qidxs, pidxs))
        assert len(set(zip(qidxs, pidxs))) == len(qidxs)
        for cid, c in zip(cids, cluster):
            assert cid not in cluster_of  # an image is in one split only
            cluster_of[cid] = (split, c)
            data = cirtorch_path(cid, folder / "ims").read_bytes()
            assert hashlib.blake2b(data, digest_size=16).hexdigest() == cid
    train_landmarks = set(db["train"]["cluster"])
    assert train_landmarks and set(db["val"]["cluster"]) and not train_landmarks & set(db["val"]["cluster"])
    with open(folder / f"{name}-whiten.pkl", "rb") as handle:
        whiten = pickle.load(handle)
    assert set(whiten) == {"cids", "qidxs", "pidxs"} and all(type(v) is list for v in whiten.values())
    assert set(whiten["cids"]) <= set(cluster_of) and len(whiten["qidxs"]) == len(whiten["pidxs"]) > 0
    for q, p in zip(whiten["qidxs"], whiten["pidxs"]):
        assert q != p and cluster_of[whiten["cids"][q]][1] == cluster_of[whiten["cids"][p]][1]
    # Our own reader takes the same files (what `data shards` and training use).
    records = formats.list_images(root, name)
    assert [r.name for r in records["train"]] == db["train"]["cids"]
    assert all(r.path.is_file() for split in records.values() for r in split)
    return db


def tsv_rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()[1:]]


def test_folder_import_writes_sfm120k_files_that_cirtorch_would_read(folder_tree, tmp_path):
    record = import_folders(folder_tree / "landmarks", tmp_path, "mine", OPTIONS, IN_PROCESS)
    db = check_sfm_format(tmp_path, "mine")
    sources = sorted(p for p in (folder_tree / "landmarks").rglob("*") if p.is_file())
    assert {p.suffix for p in sources} == {".jpg", ".png"} and any(p.parent.name == "more" for p in sources)
    assert record["counts"]["kept"] == len(sources) == len(db["train"]["cids"]) + len(db["val"]["cids"])
    rows = tsv_rows(tmp_path / "train" / "mine" / "mine-images.tsv")
    by_cid = {cid: (int(cluster), landmark, source) for cid, _, cluster, landmark, source in rows}
    for split in ("train", "val"):  # each landmark folder is one cluster, named in the list
        for cid, cluster in zip(db[split]["cids"], db[split]["cluster"]):
            assert by_cid[cid][0] == cluster and by_cid[cid][2].split("/")[0] == by_cid[cid][1]
    assert len({landmark for _, landmark, _ in by_cid.values()}) == record["counts"]["landmarks"]["kept"]
    assert record["counts"]["landmarks"]["kept"] == len(list((folder_tree / "landmarks").iterdir()))
    assert record["counts"]["stored"]["linked"] == len(sources)  # same file system: hard links, no copies
    ims_file = cirtorch_path(db["train"]["cids"][0], tmp_path / "train" / "mine" / "ims")
    assert ims_file.stat().st_nlink == 2


def test_both_gldv2_csv_formats_import_the_same_set(gldv2_tree, tmp_path):
    images = gldv2_tree / "gldv2" / "train"
    full = import_gldv2(gldv2_tree / "gldv2" / "train.csv", images, tmp_path, "gld", OPTIONS, IN_PROCESS)
    clean = import_gldv2(gldv2_tree / "gldv2" / "train_clean.csv", images, tmp_path, "gld-clean", OPTIONS,
                         RunSettings(workers=2, copy=True))
    listed = {line.split(",")[0]
              for line in (gldv2_tree / "gldv2" / "train.csv").read_text().splitlines()[1:]}
    kept = clean["counts"]["kept"]
    assert clean["counts"]["stored"]["copied"] == kept == full["counts"]["kept"] == len(listed)
    sets = []
    for name in ("gld", "gld-clean"):
        db = check_sfm_format(tmp_path, name)
        sets.append({split: set(zip(db[split]["cids"], db[split]["cluster"])) for split in db})
    assert sets[0] == sets[1]  # same images, same landmark ids as clusters, same val landmarks
    rows = tsv_rows(tmp_path / "train" / "gld" / "gld-images.tsv")
    assert {source for *_, source in rows} == listed


def test_gldv2_csvs_stream_into_integer_arrays(tmp_path):
    per_image = tmp_path / "train.csv"
    per_image.write_text('id,url,landmark_id\n00000000000000ff,"http://x/a,b.jpg",7\n\nffffffffffffffff,,3\n')
    kind, ids, landmarks = read_gldv2_csv(per_image)
    assert kind == "per-image" and ids.dtype == np.uint64 and landmarks.dtype == np.int64
    assert ids.tolist() == [255, 2**64 - 1] and landmarks.tolist() == [7, 3]
    kaggle = tmp_path / "kaggle.csv"
    kaggle.write_text("id,landmark_id\n00000000000000ff,7\n")
    assert read_gldv2_csv(kaggle)[1].tolist() == [255]
    clean = tmp_path / "train_clean.csv"
    clean.write_text("landmark_id,images\n7,00000000000000ff 0000000000000100\n3,ffffffffffffffff\n")
    kind, ids, landmarks = read_gldv2_csv(clean)
    assert kind == "per-landmark" and ids.tolist() == [255, 256, 2**64 - 1] and landmarks.tolist() == [7, 7,
                                                                                                       3]
    for text, message in (("a,b\n1,2\n", "header"), ("id,landmark_id\n00FF,3\n", ":2: image id"),
                          ("id,landmark_id\n00000000000000ff,x\n", ":2: landmark_id 'x'"),
                          ("landmark_id,images\n3,00000000000000ff nothex\n", ":2: image id 'nothex'")):
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(UserError, match=message):
            read_gldv2_csv(bad)


def _jpeg(seed: int, size=(96, 72)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def _bad_tree(base: Path) -> Path:
    """A: 3 good + truncated + not an image + tiny + a duplicate of its own; B: 2 good, one also in C;
    C: 2 good + the copy from B; D: one image; E: empty; one loose file beside the folders."""
    files = {"A/1.jpg": _jpeg(1), "A/sub/2.jpg": _jpeg(2), "A/3.jpg": _jpeg(3), "A/cut.jpg": _jpeg(4)[:600],
             "A/notes.txt": b"not a picture", "A/tiny.png": _png((10, 40)), "A/sub/copy-of-1.jpg": _jpeg(1),
             "B/1.jpg": _jpeg(5), "B/shared.jpg": _jpeg(6), "C/1.jpg": _jpeg(7), "C/2.jpg": _jpeg(8),
             "C/shared.jpg": _jpeg(6), "D/only.jpg": _jpeg(9), "loose.jpg": _jpeg(10),
             ".hidden/x.jpg": _jpeg(11)}
    for name, data in files.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_bytes(data)
    (base / "E").mkdir()
    return base


def _png(size) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(out, "PNG")
    return out.getvalue()


def test_bad_files_are_skipped_counted_and_listed(tmp_path):
    tree = _bad_tree(tmp_path / "tree")
    record = import_folders(tree, tmp_path / "data", "bad", ImportOptions(min_side=32, val_fraction=0.5),
                            IN_PROCESS)
    counts = record["counts"]
    assert counts["skipped"] == {"missing": 0, "unreadable": 0, "not_image": 1, "damaged": 1, "tiny": 1,
                                 "duplicate": 1, "conflict": 2, "small_landmark": 2, "changed": 0,
                                 "outside_landmark_folders": 1}
    # B loses its pair to the conflict
    assert counts["landmarks"] == {"listed": 5, "kept": 2, "empty_folders": 1}
    # A's 3 originals and C's 2; hidden files not listed
    assert counts["kept"] == 5 and counts["listed"] == 13
    db = check_sfm_format(tmp_path / "data", "bad")
    assert len(db["train"]["cids"]) + len(db["val"]["cids"]) == 5
    skipped = {row[0]: row[2] for row in tsv_rows(tmp_path / "data" / "train" / "bad" / "bad-skipped.tsv")}
    assert skipped == {"loose.jpg": "outside any landmark folder", "A/cut.jpg": "damaged",
                       "A/notes.txt": "not_image", "A/tiny.png": "tiny", "A/sub/copy-of-1.jpg": "duplicate",
                       "B/shared.jpg": "conflict", "C/shared.jpg": "conflict", "B/1.jpg": "small_landmark",
                       "D/only.jpg": "small_landmark"}


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no images under"),  # no landmark folders at all
    (lambda d: [(d / n).mkdir() for n in ("a", "b")], "all empty"),
    (lambda d: [_put(d / f"{n}/x.jpg", _jpeg(i)) for i, n in enumerate("abc")], "0 landmark(s) left"),
    (lambda d: [_put(d / f"a/{i}.jpg", _jpeg(i)) for i in range(3)], "1 landmark(s) left"),
])
def test_trees_that_cannot_make_a_set_are_one_line_exit_2(tmp_path, capsys, make, message):
    tree = tmp_path / "tree"
    tree.mkdir()
    make(tree)
    code = main(["data", "import", "--images", str(tree), "--root", str(tmp_path / "data"), "--name", "x"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err
    written = tmp_path / "data" / "train" / "x"
    assert not written.exists() or not any(written.iterdir())  # nothing written for input that cannot work


def _put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_gldv2_inputs_that_do_not_match_are_one_line_exit_2(gldv2_tree, tmp_path, capsys):
    csv = str(gldv2_tree / "gldv2" / "train.csv")
    count = len((gldv2_tree / "gldv2" / "train.csv").read_text().splitlines()) - 1
    cases = [(["--gldv2", csv, "--images", str(tmp_path)], f"none of the {count} images"),
             (["--gldv2", str(gldv2_tree / "synth.json"), "--images", str(tmp_path)], "is neither GLDv2's"),
             (["--gldv2", csv, "--images", str(gldv2_tree / "gldv2" / "train"), "--name", "roxford5k"],
              "taken by a public dataset"),
             (["--gldv2", csv, "--images", str(gldv2_tree / "gldv2" / "train"), "--name", "../up"],
              "use letters")]
    for extra, message in cases:
        argv = ["data", "import", "--root", str(tmp_path / "data"), "--name", "g", *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_rerun_is_idempotent_other_settings_are_refused_and_overwrite_prunes(folder_tree, tmp_path, capsys):
    argv = ["data", "import", "--images", str(folder_tree / "landmarks"), "--root", str(tmp_path), "--name",
            "s", "--min-side", "16", "--workers", "0"]
    assert main(argv) == 0
    count = sum(1 for p in (folder_tree / "landmarks").rglob("*") if p.is_file())
    folder = tmp_path / "train" / "s"
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == ".pkl"}
    assert main(argv) == 0
    assert f"0 linked, 0 copied, {count} already there" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == ".pkl"} == before
    assert main([*argv, "--seed", "4"]) == 2
    assert "with other settings; pass --overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == ".pkl"} == before  # untouched
    # Other options with --overwrite: all but the two largest landmarks go, and so do their files in ims/.
    sizes = sorted(sum(1 for p in d.rglob("*") if p.is_file()) for d in (folder_tree / "landmarks").iterdir())
    assert sizes[-2] > sizes[0]
    assert main([*argv, "--min-per-landmark", str(sizes[-2]), "--overwrite"]) == 0
    out = capsys.readouterr().out
    db = check_sfm_format(tmp_path, "s")
    kept = len(db["train"]["cids"]) + len(db["val"]["cids"])
    assert kept < count and f"{count - kept} no longer listed removed" in out
    assert sum(len(files) for _, _, files in os.walk(folder / "ims")) == kept


def test_a_folder_not_made_by_import_is_refused(folder_tree, tmp_path, capsys):
    generate(tmp_path, "micro", SEED, workers=1)  # a synthetic SfM-120k in cirtorch's layout
    argv = ["data", "import", "--images", str(folder_tree / "landmarks"), "--root", str(tmp_path),
            "--name", "retrieval-SfM-120k"]
    assert main(argv) == 2
    assert "did not write" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "train" / "retrieval-SfM-120k")  # an empty root: the public name may be taken,
    assert main([*argv, "--min-side", "16", "--workers", "0"]) == 0  # so cirtorch's train.py finds it as is
    check_sfm_format(tmp_path, "retrieval-SfM-120k")


def test_cycle_pairs_stay_in_their_landmark_and_respect_the_cap():
    clusters = np.repeat(np.array([4, 9, 2, 7]), [1, 2, 5, 40])
    np.random.default_rng(0).shuffle(clusters)
    qidxs, pidxs = cycle_pairs(clusters, 2, 30, np.random.default_rng(3))
    assert np.all(qidxs != pidxs) and np.all(clusters[qidxs] == clusters[pidxs])
    per_landmark = {c: int(np.sum(clusters[qidxs] == c)) for c in (4, 9, 2, 7)}
    assert per_landmark == {4: 0, 9: 2, 2: 10, 7: 30}  # singleton: none; pair: one each way; capped at 30
    assert len(set(zip(qidxs.tolist(), pidxs.tolist()))) == len(qidxs)
    assert np.all(np.diff(qidxs) >= 0)
    small = clusters == 2  # uncapped: every image is query and positive exactly twice
    assert np.all(np.bincount(qidxs, minlength=len(clusters))[small] == 2)
    assert np.all(np.bincount(pidxs, minlength=len(clusters))[small] == 2)
    again = cycle_pairs(clusters, 2, 30, np.random.default_rng(3))
    other = cycle_pairs(clusters, 2, 30, np.random.default_rng(4))
    assert all(np.array_equal(a, b) for a, b in zip(again, (qidxs, pidxs)))
    assert not np.array_equal(other[1], pidxs)
    members, wq, wp = whiten_pairs(clusters, 30, seed=0)
    assert len(wq) == 2 + 5 + 30 and np.all(clusters[members[wq]] == clusters[members[wp]])
    assert len(members) == len(np.unique(members)) == 2 + 5 + 31  # the capped landmark: 30 queries + 1
