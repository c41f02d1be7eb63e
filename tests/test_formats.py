"""Dataset file formats: writers and readers round-trip, and bad files become one-line UserErrors."""

import pickle

import numpy as np
import pytest

from amldist.datasets import formats, layout
from amldist.errors import UserError

CIDS = [f"{i:032x}" for i in range(1, 7)]


def _split(cids=CIDS, cluster=(0, 0, 1, 1, 2, 2), qidxs=(0, 2), pidxs=(1, 3), **extra):
    return formats.SfmSplit(list(cids), np.asarray(cluster, np.int64), np.asarray(qidxs, np.int64),
                            np.asarray(pidxs, np.int64), dict(extra))


def _revisited_truth():
    gnd = [{"bbx": np.array([1.0, 2.5, 30.0, 40.0]), "easy": np.array([0, 2]), "hard": np.array([1]),
            "junk": np.array([3])},
           {"bbx": np.array([0.0, 0.0, 5.0, 5.0]), "easy": np.array([], np.int64), "hard": np.array([3]),
            "junk": np.array([], np.int64)}]
    return formats.GroundTruth(["db0", "db1", "db2", "db3"], ["q0", "q1"], gnd)


def _write_raw(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


def test_sfm_db_round_trip_keeps_extra_keys(tmp_path):
    path = tmp_path / "db.pkl"
    formats.write_sfm_db(path,
                         {"train": _split(bbxs=[None] * 6), "val": _split(CIDS[:2], (5, 6), (0,), (1,))})
    splits = formats.read_sfm_db(path)
    assert set(splits) == {"train", "val"}
    assert splits["train"].cids == CIDS and len(splits["val"]) == 2
    np.testing.assert_array_equal(splits["train"].cluster, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(splits["train"].qidxs, [0, 2])
    np.testing.assert_array_equal(splits["val"].pidxs, [1])
    assert splits["train"].extra == {"bbxs": [None] * 6}
    assert splits["train"].cluster.dtype == np.int64


def test_whiten_db_round_trip(tmp_path):
    path = tmp_path / "whiten.pkl"
    formats.write_whiten_db(path, formats.WhitenDb(CIDS, np.array([0, 4]), np.array([5, 1])))
    db = formats.read_whiten_db(path)
    assert db.cids == CIDS
    np.testing.assert_array_equal(db.qidxs, [0, 4])
    np.testing.assert_array_equal(db.pidxs, [5, 1])


def test_gnd_revisited_round_trip(tmp_path):
    path = tmp_path / "gnd_roxford5k.pkl"
    formats.write_gnd(path, _revisited_truth())
    truth = formats.read_gnd(path)
    assert truth.protocol == "revisited"
    assert truth.imlist == ["db0", "db1", "db2", "db3"] and truth.qimlist == ["q0", "q1"]
    np.testing.assert_allclose(truth.gnd[0]["bbx"], [1.0, 2.5, 30.0, 40.0])
    np.testing.assert_array_equal(truth.gnd[0]["easy"], [0, 2])
    np.testing.assert_array_equal(truth.gnd[1]["hard"], [3])
    assert truth.gnd[1]["easy"].size == 0


def test_gnd_old_protocol_round_trip_and_missing_junk(tmp_path):
    truth = formats.GroundTruth(["a", "b", "c"], ["q"], [{"bbx": [0, 0, 9, 9], "ok": [2, 0], "junk": [1]}])
    path = tmp_path / "gnd_oxford5k.pkl"
    formats.write_gnd(path, truth)
    loaded = formats.read_gnd(path)
    assert loaded.protocol == "old"
    np.testing.assert_array_equal(loaded.gnd[0]["ok"], [2, 0])
    np.testing.assert_array_equal(loaded.gnd[0]["junk"], [1])
    # cirtorch treats a missing 'junk' as empty.
    _write_raw(path, {"imlist": ["a"], "qimlist": ["q"], "gnd": [{"bbx": [0, 0, 1, 1], "ok": [0]}]})
    assert formats.read_gnd(path).gnd[0]["junk"].size == 0


def test_reads_numpy_valued_public_style_pickles(tmp_path):
    # The public files may hold numpy arrays, possibly from an old protocol.
    raw = {"imlist": np.array(["a", "b"]), "qimlist": ["q"],
           "gnd": [{"bbx": np.array([1, 2, 3, 4], np.float32), "easy": np.array([1], np.int64),
                    "hard": np.array([], np.int64), "junk": np.array([0])}]}
    path = tmp_path / "gnd.pkl"
    path.write_bytes(pickle.dumps(raw, protocol=2))
    truth = formats.read_gnd(path)
    assert truth.imlist == ["a", "b"] and truth.gnd[0]["easy"].tolist() == [1]


@pytest.mark.parametrize("split, message", [
    (_split(qidxs=(0, 6)), "outside"),  # index == number of images
    (_split(pidxs=(-1, 3)), "outside"),
    (_split(cluster=(0, 1)), "6 cids but 2 cluster"),
    (_split(qidxs=(0, 1, 2)), "3 qidxs but 2 pidxs"),
])
def test_sfm_db_validation(tmp_path, split, message):
    path = tmp_path / "db.pkl"
    formats.write_sfm_db(path, {"train": split, "val": _split()})
    with pytest.raises(UserError, match=message):
        formats.read_sfm_db(path)


@pytest.mark.parametrize("raw, message", [
    ({"train": {}}, "lacks key.*val"),
    ({"train": {"cids": [], "qidxs": [], "pidxs": []}, "val": {}}, "lacks key.*cluster"),
    ([1, 2], "list, expected a dict"),
    ({"train": {"cids": ["a"], "cluster": ["x"], "qidxs": [], "pidxs": []}, "val": {}}, "cluster is not"),
    ({"train": {"cids": 5, "cluster": [], "qidxs": [], "pidxs": []}, "val": {}}, "cids is a int"),
])
def test_sfm_db_malformed(tmp_path, raw, message):
    with pytest.raises(UserError, match=message):
        formats.read_sfm_db(_write_raw(tmp_path / "db.pkl", raw))


@pytest.mark.parametrize("raw, message", [
    ({"cids": CIDS, "qidxs": [0]}, "lacks key.*pidxs"),
    ({"cids": CIDS, "qidxs": [0, 1], "pidxs": [1]}, "2 qidxs but 1 pidxs"),
    ({"cids": CIDS, "qidxs": [7], "pidxs": [1]}, "outside"),
])
def test_whiten_db_validation(tmp_path, raw, message):
    with pytest.raises(UserError, match=message):
        formats.read_whiten_db(_write_raw(tmp_path / "w.pkl", raw))


@pytest.mark.parametrize("mutate, message", [
    (lambda raw: raw["gnd"][0].update(easy=[4]), "outside"),
    (lambda raw: raw["gnd"].pop(), "2 queries but 1 gnd"),
    (lambda raw: raw["gnd"][1].pop("bbx"), "lacks key.*bbx"),
    (lambda raw: raw["gnd"][0].update(bbx=[1, 2, 3]), "4 numbers"),
    (lambda raw: raw.pop("qimlist"), "lacks key.*qimlist"),
    (lambda raw: raw["gnd"][0].update(junk=[["x"]]), "not a flat list of numbers"),
    (lambda raw: raw.update(gnd="oops"), "gnd is a str"),
])
def test_gnd_validation(tmp_path, mutate, message):
    path = tmp_path / "gnd.pkl"
    formats.write_gnd(path, _revisited_truth())
    raw = pickle.loads(path.read_bytes())
    mutate(raw)
    with pytest.raises(UserError, match=message):
        formats.read_gnd(_write_raw(path, raw))


def test_list_images_follows_the_cirtorch_layout(tmp_path):
    root = tmp_path
    formats.write_sfm_db(layout.train_db_path(root, "retrieval-SfM-120k"),
                         {"train": _split(), "val": _split()})
    formats.write_whiten_db(layout.whiten_db_path(root, "retrieval-SfM-120k"),
                            formats.WhitenDb(CIDS[:3], np.array([0]), np.array([2])))
    formats.write_gnd(layout.gnd_path(root, "roxford5k"), _revisited_truth())
    listing = layout.distractor_list_path(root)
    listing.parent.mkdir(parents=True)
    listing.write_text("00/a.jpg\n\n01/b.jpg\n")

    train = formats.list_images(root, "retrieval-SfM-120k")
    cid = CIDS[2]
    assert train["train"][2].path == \
        root / "train/retrieval-SfM-120k/ims" / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid
    assert train["train"][4].cluster == 2 and len(train["whiten"]) == 3
    test = formats.list_images(root, "roxford5k")
    assert test["db"][1].path == root / "test/roxford5k/jpg/db1.jpg"
    assert test["query"][0].bbx == (1.0, 2.5, 30.0, 40.0)
    distractors = formats.list_images(root, "revisitop1m")["db"]
    assert [r.path for r in distractors] == [root / "datasets/revisitop1m/jpg/00/a.jpg",
                                             root / "datasets/revisitop1m/jpg/01/b.jpg"]
