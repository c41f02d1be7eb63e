"""Teacher feature store: round trip, memory map, refusal of a mismatched or corrupt store, atomic writes."""

import json
import shutil

import numpy as np
import pytest

from amldist import feature_store
from amldist.errors import UserError
from amldist.feature_store import FeatureStore, write_feature_store

PROVENANCE = {"network": "teacher.pth", "network_sha256": "ab" * 32, "architecture": "vgg16",
              "image_size": 1024, "scales": [1.0, 2 ** -0.5, 0.5], "dataset": "retrieval-SfM-120k",
              "split": "train"}


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_round_trip_keeps_float16_rows_and_provenance(tmp_path):
    features = unit_rows(np.random.default_rng(0), 50, 8)
    write_feature_store(tmp_path / "store", features, **PROVENANCE)
    store = FeatureStore.open(tmp_path / "store")
    assert len(store) == 50 and store.dim == 8
    assert store.features.dtype == np.float16
    np.testing.assert_array_equal(store.features, features.astype(np.float16))
    ids = np.array([7, 0, 49, 7])
    got = store.vectors(ids)
    assert got.dtype == np.float32 and got.shape == (4, 8)
    np.testing.assert_allclose(got, features[ids], atol=1e-3)
    for key in ("network", "architecture", "image_size", "dataset", "split"):
        assert store.manifest[key] == PROVENANCE[key]
    with pytest.raises(IndexError):
        store.vectors(np.array([50]))


def test_open_memory_maps_the_array(tmp_path):
    write_feature_store(tmp_path, np.ones((20, 4), np.float32), **PROVENANCE)
    store = FeatureStore.open(tmp_path)
    assert isinstance(store.features, np.memmap) and store.features.mode == "r"
    with pytest.raises(ValueError):
        store.features[0, 0] = 2  # read-only: nobody can change the teacher by accident


@pytest.mark.parametrize("field, value", [("image_size", 362), ("network_sha256", "cd" * 32),
                                          ("architecture", "resnet101"), ("scales", [1.0]), ("count", 21)])
def test_mismatched_store_is_refused(tmp_path, field, value):
    write_feature_store(tmp_path, np.ones((20, 4), np.float32), **PROVENANCE)
    with pytest.raises(UserError, match=field):
        FeatureStore.open(tmp_path, expected={field: value})
    matching = {k: PROVENANCE[k] for k in ("image_size", "architecture", "scales", "network_sha256")}
    FeatureStore.open(tmp_path, expected=matching)  # the same values pass


def test_missing_corrupt_or_foreign_store_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no teacher feature store"):
        FeatureStore.open(tmp_path / "nowhere")
    store = write_feature_store(tmp_path, np.ones((20, 4), np.float32), **PROVENANCE)
    array = tmp_path / store.manifest["array_file"]
    raw = bytearray(array.read_bytes())
    raw[-1] ^= 0xFF
    array.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="checksum"):
        FeatureStore.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(UserError, match="not an amldist"):
        FeatureStore.open(tmp_path)


def test_non_finite_features_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="finite"):
        write_feature_store(tmp_path, np.full((3, 2), 1e6, np.float32), **PROVENANCE)  # beyond float16
    assert not (tmp_path / "manifest.json").exists()


def test_crash_while_writing_keeps_the_old_store(tmp_path, monkeypatch):
    old = np.full((10, 4), 0.5, np.float32)
    write_feature_store(tmp_path, old, **PROVENANCE)

    def crash_midway(handle, array):
        handle.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(feature_store.np, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        write_feature_store(tmp_path, np.zeros((12, 4), np.float32), **{**PROVENANCE, "image_size": 362})
    monkeypatch.undo()
    store = FeatureStore.open(tmp_path)
    assert store.manifest["image_size"] == 1024
    np.testing.assert_array_equal(store.features, old.astype(np.float16))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_rewrite_replaces_the_array_and_removes_the_old_one(tmp_path):
    first = write_feature_store(tmp_path, np.full((10, 4), 0.5, np.float32), **PROVENANCE)
    second = write_feature_store(tmp_path, np.full((10, 4), 0.25, np.float32), **PROVENANCE)
    assert first.manifest["array_file"] != second.manifest["array_file"]
    assert sorted(p.name for p in tmp_path.glob("features-*.npy")) == [second.manifest["array_file"]]
    np.testing.assert_array_equal(FeatureStore.open(tmp_path).features, np.full((10, 4), 0.25, np.float16))


# ------------------------------------------------------------------ `amldist features` (one process)

TRAIN_SET = "retrieval-SfM-120k"
SHARD_SIZE = 32


def make_teacher_split(root):
    """A 9-image training split written as shards at 32 px, and a small random teacher network file.

    Returns (split shard folder, network file)."""
    import torch
    from PIL import Image

    from amldist.checkpoints import export_network_file
    from amldist.datasets import formats, layout
    from amldist.nets import create_net
    from amldist.shards import shard_dataset

    rng = np.random.default_rng(3)
    cids = [f"{i:030d}{i:02d}" for i in range(9)]
    images = layout.train_images_dir(root, TRAIN_SET)
    for i, cid in enumerate(cids):
        path = layout.cid2filename(cid, images)
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, size=(20 + 4 * i, 40 - 2 * i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, "JPEG", quality=90)
    train = formats.SfmSplit(cids[:7], np.array([0, 0, 1, 1, 2, 2, 3]), np.array([0, 2]), np.array([1, 3]))
    val = formats.SfmSplit(cids[7:], np.array([5, 5]), np.array([0]), np.array([1]))
    formats.write_sfm_db(layout.train_db_path(root, TRAIN_SET), {"train": train, "val": val})
    formats.write_whiten_db(layout.whiten_db_path(root, TRAIN_SET),
                            formats.WhitenDb(cids[:2], np.array([0]), np.array([1])))
    shard_dataset(root, TRAIN_SET, image_size=SHARD_SIZE, splits=["train"], shard_count=2, workers=0)
    torch.manual_seed(0)
    network = root / "teacher.pth"
    export_network_file(network, create_net("mobilenet_v2", projection_dim=8, pretrained=False))
    return layout.shards_dir(root, TRAIN_SET, SHARD_SIZE) / "train", network


@pytest.fixture(scope="module")
def teacher_split(tmp_path_factory):
    return make_teacher_split(tmp_path_factory.mktemp("teacher"))


def reference_features(network, split, image_size=SHARD_SIZE, scales=(1.0,)):
    from amldist.checkpoints import load_network_file
    from amldist.extract import ShardSource, embed

    return embed(load_network_file(network), ShardSource(split), image_size=image_size, scales=scales,
                 device="cpu")


def test_cli_writes_the_teacher_features_of_every_image(teacher_split, tmp_path, capsys):
    from amldist.cli.main import main

    split, network = teacher_split
    out = tmp_path / "features"
    assert main(["features", "--network", str(network), "--shards", str(split), "--out", str(out)]) == 0
    assert "7 teacher features of dim 8" in capsys.readouterr().out
    store = FeatureStore.open(out, expected={"image_size": SHARD_SIZE, "count": 7, "dim": 8,
                                             "network_sha256": feature_store.file_sha256(network)})
    assert store.manifest["architecture"] == "mobilenet_v2"
    assert (store.manifest["dataset"], store.manifest["split"]) == (TRAIN_SET, "train")
    np.testing.assert_allclose(store.vectors(np.arange(7)), reference_features(network, split), atol=2e-3)

    array = out / store.manifest["array_file"]
    stamp = array.stat().st_mtime_ns
    assert main(["features", "--network", str(network), "--shards", str(split), "--out", str(out)]) == 0
    assert array.stat().st_mtime_ns == stamp  # up to date: not recomputed
    argv = ["features", "--network", str(network), "--shards", str(split), "--out", str(out),
            "--image-size", "24", "--scales", "1", "0.5"]
    assert main(argv) == 2  # another size and scales: replaced only with --force
    assert array.stat().st_mtime_ns == stamp
    assert main([*argv, "--force"]) == 0
    changed = FeatureStore.open(out)
    assert changed.manifest["image_size"] == 24 and changed.manifest["scales"] == [1.0, 0.5]
    np.testing.assert_allclose(changed.vectors(np.arange(7)),
                               reference_features(network, split, 24, (1.0, 0.5)), atol=2e-3)


def run_cli(argv):
    """Exit code of `amldist ARGV`, whether it returns or argparse exits."""
    from amldist.cli.main import main

    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("problem", ["no network", "not a network", "no shards", "negative workers"])
def test_cli_mistakes_are_one_line_exit_2(teacher_split, tmp_path, capsys, problem):
    split, network = teacher_split
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    argv = {"no network": ["--network", str(tmp_path / "missing.pth"), "--shards", str(split)],
            "not a network": ["--network", str(junk), "--shards", str(split)],
            "no shards": ["--network", str(network), "--shards", str(tmp_path)],
            "negative workers": ["--network", str(network), "--shards", str(split),
                                 "--num-workers", "-1"]}[problem]
    assert run_cli(["features", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def folder_state(folder):
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("case", ["shard folder", "other files", "the shards", "inside the shards"])
def test_cli_refuses_an_out_that_is_not_a_store(teacher_split, tmp_path, capsys, case):
    split, network = teacher_split
    shards = shutil.copytree(split, tmp_path / "shards")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    out = {"shard folder": shards, "other files": tmp_path / "mine", "the shards": shards,
           "inside the shards": shards / "store"}[case]
    source = split if case in ("shard folder", "other files") else shards
    before = {folder: folder_state(folder) for folder in (shards, tmp_path / "mine")}
    argv = ["features", "--network", str(network), "--shards", str(source), "--out", str(out), "--force"]
    assert run_cli(argv) == 2
    assert str(out) in one_line_error(capsys)
    assert {folder: folder_state(folder) for folder in (shards, tmp_path / "mine")} == before


def test_cli_replaces_another_teachers_store_only_with_force(teacher_split, tmp_path, capsys):
    split, network = teacher_split
    out = tmp_path / "store"
    argv = ["features", "--network", str(network), "--shards", str(split), "--out", str(out)]
    assert run_cli(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    # another teacher
    (out / "manifest.json").write_text(json.dumps({**manifest, "network_sha256": "00" * 32}))
    before = folder_state(out)
    capsys.readouterr()
    assert run_cli(argv) == 2
    assert "network_sha256" in one_line_error(capsys) and folder_state(out) == before
    assert run_cli([*argv, "--force"]) == 0
    assert FeatureStore.open(out).manifest["network_sha256"] == feature_store.file_sha256(network)


def test_cli_recomputes_a_damaged_store_of_its_own(teacher_split, tmp_path):
    split, network = teacher_split
    out = tmp_path / "store"
    argv = ["features", "--network", str(network), "--shards", str(split), "--out", str(out)]
    assert run_cli(argv) == 0
    array = out / FeatureStore.open(out).manifest["array_file"]
    raw = bytearray(array.read_bytes())
    raw[-1] ^= 0xFF
    array.write_bytes(bytes(raw))
    assert run_cli(argv) == 0  # checksum mismatch: recomputed without --force
    FeatureStore.open(out)
    (out / "manifest.json").write_text("{ half a manifest")
    assert run_cli(argv) == 0  # an unreadable manifest beside store files only: still ours
    FeatureStore.open(out)


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only"])
def test_cli_unwritable_out_fails_before_embedding(teacher_split, tmp_path, capsys, monkeypatch,
                                                   read_only_dir, case):
    from amldist import teacher_features

    split, network = teacher_split
    monkeypatch.setattr(teacher_features, "embed_split",
                        lambda *a, **k: pytest.fail("embedded before checking --out"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = {"a file": blocker, "under a file": blocker / "out", "read-only": read_only_dir / "out"}[case]
    argv = ["features", "--network", str(network), "--shards", str(split), "--out", str(out)]
    assert run_cli(argv) == 2
    assert str(out) in one_line_error(capsys)
    assert blocker.read_text() == "not a folder" and list(read_only_dir.iterdir()) == []


@pytest.mark.parametrize("device", ["tpu", "cuda"])
def test_cli_unusable_device_is_one_line(teacher_split, tmp_path, capsys, monkeypatch, device):
    import torch

    split, network = teacher_split
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["features", "--network", str(network), "--shards", str(split), "--out", str(tmp_path / "out"),
            "--device", device]
    assert run_cli(argv) == 2
    assert "--device" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_cli_damaged_shard_manifest_is_one_line(teacher_split, tmp_path, capsys):
    split, network = teacher_split
    shards = shutil.copytree(split, tmp_path / "shards")
    manifest = json.loads((shards / "manifest.json").read_text())
    (shards / "manifest.json").write_text(json.dumps({**manifest, "num_images": None}))
    argv = ["features", "--network", str(network), "--shards", str(shards), "--out", str(tmp_path / "out")]
    assert run_cli(argv) == 2
    assert f"damaged shard manifest in {shards}" in one_line_error(capsys)
