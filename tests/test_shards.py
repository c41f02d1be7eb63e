"""WebDataset shards: round trip, random access vs streaming, idempotence, resume after a kill,
corrupt sources and members, node splitting, and the CLI contract."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amldist.cli.main import main
from amldist.datasets import formats, layout
from amldist.errors import UserError
from amldist.shards import CorruptSampleError, ShardReader, load_tensor, shard_dataset, stream_samples
from amldist.shards import manifest as mf
from amldist.shards.write import plan_shards

TEST_SET = "roxford5k"
TRAIN_SET = "retrieval-SfM-120k"
SIZE = 32
NUM_DB = 14
QUERY_BBX = [[1.0, 2.0, 20.0, 18.0], [0.0, 0.0, 10.5, 12.5], [3.0, 4.0, 30.0, 25.0]]


def smooth_image(seed: int, width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Low-frequency content, so JPEG round trips stay close to the original pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(2 * np.pi * (rng.uniform(0.3, 1.5) * x + rng.uniform(0.3, 1.5) * y + rng.uniform()))
                for _ in range(3)]
    pixels = ((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def image_size_of(index: int) -> tuple[int, int]:
    # A mix of landscape, portrait, and images already smaller than SIZE (must not be upscaled).
    return [(48, 36), (30, 64), (20, 16), (70, 40)][index % 4]


def make_test_root(root: Path, num_db: int = NUM_DB) -> list[Path]:
    names = [f"im{i:03d}" for i in range(num_db)]
    jpg = layout.test_images_dir(root, TEST_SET)
    jpg.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        path = jpg / f"{name}.jpg"
        if i == 5:  # a grey JPEG and a palette PNG under a .jpg name: both must come out RGB
            smooth_image(i, 40, 30, "L").save(path, "JPEG", quality=92)
        elif i == 6:
            smooth_image(i, 36, 50).convert("P").save(path, "PNG")
        else:
            smooth_image(i, *image_size_of(i)).save(path, "JPEG", quality=92)
        paths.append(path)
    gnd = [{"bbx": bbx, "easy": [0], "hard": [1], "junk": []} for bbx in QUERY_BBX]
    formats.write_gnd(layout.gnd_path(root, TEST_SET), formats.GroundTruth(names, names[:3], gnd))
    return paths


def make_train_root(root: Path) -> None:
    cids = [f"cid{i:05d}ab" for i in range(6)]
    ims = layout.train_images_dir(root, TRAIN_SET)
    for i, cid in enumerate(cids):
        path = layout.cid2filename(cid, ims)
        path.parent.mkdir(parents=True, exist_ok=True)
        smooth_image(100 + i, 400 + 10 * i, 300).save(path, "JPEG", quality=90)
    split = formats.SfmSplit(cids[:4], np.array([0, 0, 1, 1]), np.array([0, 2]), np.array([1, 3]))
    val = formats.SfmSplit(cids[4:], np.array([7, 7]), np.array([0]), np.array([1]))
    formats.write_sfm_db(layout.train_db_path(root, TRAIN_SET), {"train": split, "val": val})
    whiten = formats.WhitenDb(cids[1:5], np.array([0]), np.array([1]))
    formats.write_whiten_db(layout.whiten_db_path(root, TRAIN_SET), whiten)


def shard(root: Path, **kwargs) -> dict:
    options = {"image_size": SIZE, "shard_count": 4, "workers": 0} | kwargs
    return shard_dataset(root, TEST_SET, **options)


def split_dir(root: Path, split: str = "db") -> Path:
    return layout.shards_dir(root, TEST_SET, SIZE) / split


def file_states(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def expected_thumbnail(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((SIZE, SIZE), Image.Resampling.LANCZOS)
        return img


@pytest.fixture
def test_root(tmp_path):
    make_test_root(tmp_path)
    return tmp_path


def test_round_trip_sizes_pixels_and_meta(test_root):
    manifests = shard(test_root)
    assert set(manifests) == {"db", "query"}
    db = manifests["db"]
    assert db["num_samples"] == db["num_images"] == NUM_DB and db["num_skipped"] == 0
    assert [s["count"] for s in db["shards"]] == [4, 4, 4, 2]
    reader = ShardReader(split_dir(test_root))
    assert len(reader) == NUM_DB and reader.indices.tolist() == list(range(NUM_DB))
    jpg = layout.test_images_dir(test_root, TEST_SET)
    for index in range(NUM_DB):
        source = jpg / f"im{index:03d}.jpg"
        image, expected = reader.read_image(index), expected_thumbnail(source)
        assert image.mode == "RGB" and image.size == expected.size and max(image.size) <= SIZE
        error = np.abs(np.asarray(image, np.float32) - np.asarray(expected, np.float32)).mean()
        assert error < 6.0, (index, error)
        meta = reader.meta(index)
        with Image.open(source) as original:
            assert meta["original_size"] == list(original.size)
        assert meta["size"] == list(image.size) and meta["name"] == f"im{index:03d}"
        assert meta["index"] == index and meta["split"] == "db" and meta["bbx"] is None
    assert reader.sizes.tolist() == [list(reader.read_image(i).size) for i in range(NUM_DB)]
    # 20x16 is already small enough: kept byte for byte, never upscaled.
    assert reader.read_bytes(2) == (jpg / "im002.jpg").read_bytes()
    queries = ShardReader(split_dir(test_root, "query"))
    for index, bbx in enumerate(QUERY_BBX):
        meta = queries.meta(index)
        assert meta["bbx"] == bbx and meta["split"] == "query"
        assert meta["original_size"] == list(image_size_of(index))  # stored uncropped


def test_training_set_defaults_and_meta(tmp_path):
    make_train_root(tmp_path)
    manifests = shard_dataset(tmp_path, TRAIN_SET, workers=0)
    assert set(manifests) == {"train", "val", "whiten"}
    out = layout.shards_dir(tmp_path, TRAIN_SET, 362)  # 362: the default for training sets
    train = ShardReader(out / "train")
    assert [train.meta(i)["cluster"] for i in range(4)] == [0, 0, 1, 1]
    assert train.meta(3)["cid"] == "cid00003ab"
    assert train.read_image(0).size == (362, 272)  # 400x300 thumbnail(362)
    whiten = ShardReader(out / "whiten")
    assert whiten.meta(0)["name"] == "cid00001ab" and whiten.meta(0)["cluster"] == -1
    assert manifests["val"]["num_samples"] == 2


def test_random_access_returns_the_streamed_bytes(test_root):
    shard(test_root)
    reader = ShardReader(split_dir(test_root))
    streamed = list(stream_samples(split_dir(test_root), decode=False))
    assert sorted(index for index, _, _ in streamed) == list(range(NUM_DB))
    for index, data, meta in streamed:
        assert data == reader.read_bytes(index) and meta == reader.meta(index)
    for index, image, _ in stream_samples(split_dir(test_root), shuffle=5, seed=3):
        assert np.array_equal(np.asarray(image), np.asarray(reader.read_image(index)))


def test_rerun_rewrites_nothing(test_root):
    shard(test_root)
    before = {split: file_states(split_dir(test_root, split)) for split in ("db", "query")}
    shard(test_root)
    assert {split: file_states(split_dir(test_root, split)) for split in ("db", "query")} == before


def test_resume_rewrites_only_missing_or_damaged_shards(test_root):
    first = shard(test_root)["db"]
    folder = split_dir(test_root)
    (folder / "db-000001.tar").unlink()
    damaged = folder / "db-000002.tar"
    damaged.write_bytes(damaged.read_bytes()[:-700] + b"x" * 700)
    (folder / ".db-000003.tar.k1ll3d.tmp").write_bytes(b"half a shard")
    before = file_states(folder)
    second = shard(test_root)["db"]
    after = file_states(folder)
    assert second == first
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert after["db-000000.tar"] == before["db-000000.tar"]  # verified, kept
    assert after["db-000002.tar"] != before["db-000002.tar"]  # checksum mismatch, rewritten
    assert "db-000001.tar" in after


KILL_SCRIPT = """
import os, signal, sys
import amldist.shards.write as write
real, calls = write.encode_image, []
def encode_then_die(*args):
    calls.append(1)
    if len(calls) == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)  # a hard kill in the middle of a shard
    return real(*args)
write.encode_image = encode_then_die
write.shard_dataset(sys.argv[1], "roxford5k", image_size=32, shard_count=4, workers=0, splits=["db"])
"""


def test_killed_run_leaves_no_half_shard_and_resumes(tmp_path):
    root, fresh = tmp_path / "killed", tmp_path / "fresh"
    make_test_root(root)
    make_test_root(fresh)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(root), "10"], capture_output=True,
                          check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    folder = split_dir(root)
    assert not (folder / mf.MANIFEST_NAME).exists()
    temps = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert temps, "the kill should have caught shard 2 half-written under a temporary name"
    finished = sorted(p.name for p in folder.glob("db-*.tar"))
    assert finished == ["db-000000.tar", "db-000001.tar"]
    for name in finished:
        record = json.loads((folder / name.replace(".tar", ".json")).read_text())
        assert mf.sha256_file(folder / name) == record["sha256"]
    kept = file_states(folder)
    resumed = shard(root, splits=["db"])["db"]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert {k: v for k, v in file_states(folder).items() if k in finished} == {k: kept[k] for k in finished}
    reference = shard(fresh, splits=["db"])["db"]
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert resumed["index_sha256"] == reference["index_sha256"]
    assert json.loads((folder / mf.MANIFEST_NAME).read_text()) == resumed


def test_changed_parameters_replan_and_drop_stale_shards(test_root):
    shard(test_root)
    folder = split_dir(test_root)
    manifest = shard(test_root, shard_count=10)["db"]
    assert [s["count"] for s in manifest["shards"]] == [10, 4]
    assert sorted(p.name for p in folder.glob("db-*")) == ["db-000000.json", "db-000000.tar",
                                                           "db-000001.json", "db-000001.tar"]
    assert len(ShardReader(folder)) == NUM_DB


def test_corrupt_sources_are_skipped_and_listed(test_root):
    jpg = layout.test_images_dir(test_root, TEST_SET)
    (jpg / "im003.jpg").write_bytes(b"this is not an image")
    truncated = jpg / "im007.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])  # header fine, data cut: fails only on decode
    (jpg / "im011.jpg").unlink()
    manifest = shard(test_root)["db"]
    assert manifest["num_skipped"] == 3 and manifest["num_samples"] == NUM_DB - 3
    assert [s["index"] for s in manifest["skipped"]] == [3, 7, 11]
    assert all(s["reason"] for s in manifest["skipped"])
    reader = ShardReader(split_dir(test_root))
    assert 3 not in reader.indices and 7 not in reader and 12 in reader
    with pytest.raises(KeyError):
        reader.read_image(7)
    assert sum(1 for _ in stream_samples(split_dir(test_root))) == NUM_DB - 3


def test_corrupt_member_is_counted_when_streaming_and_clear_by_index(test_root):
    shard(test_root)
    folder = split_dir(test_root)
    reader = ShardReader(folder)
    row = reader.table[reader.indices.tolist().index(5)]
    shard_path = folder / reader.manifest["shards"][int(row[1])]["name"]
    with open(shard_path, "r+b") as handle:  # overwrite sample 5's JPEG data, keep the tar intact
        handle.seek(int(row[2]))
        handle.write(b"\xff" * int(row[3]))
    pipeline = stream_samples(folder)
    streamed = sorted(index for index, _, _ in pipeline)
    assert streamed == [i for i in range(NUM_DB) if i != 5]
    assert pipeline.corrupt.count == 1
    fresh = ShardReader(folder)
    with pytest.raises(CorruptSampleError, match="sample 5"):
        fresh.read_image(5)
    assert fresh.num_corrupt == 1 and fresh.read_image(4).mode == "RGB"


def test_split_by_node_gives_disjoint_covering_subsets(test_root, monkeypatch):
    shard(test_root, shard_count=2)  # 7 shards over 3 ranks
    seen = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        seen.append([i for i, _, _ in stream_samples(split_dir(test_root), shuffle=4, seed=1, epoch=2,
                                                          decode=False)])
    assert all(seen) and sorted(itertools.chain(*seen)) == list(range(NUM_DB))
    monkeypatch.setenv("RANK", "0")
    repeat = [i for i, _, _ in stream_samples(split_dir(test_root), shuffle=4, seed=1, epoch=2, decode=False)]
    assert repeat == seen[0]  # same seed and epoch: same order
    monkeypatch.setenv("WORLD_SIZE", "1")
    orders = {tuple(i for i, _, _ in stream_samples(split_dir(test_root), shuffle=4, seed=1, epoch=e,
                                                       decode=False)) for e in range(4)}
    assert len(orders) > 1 and all(sorted(o) == list(range(NUM_DB)) for o in orders)


def test_stream_splits_shards_over_dataloader_workers(test_root):
    shard(test_root, shard_count=2)  # 7 shards over 2 worker processes
    pipeline = stream_samples(split_dir(test_root), decode=False)
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2)
    assert sorted(int(index) for index, _, _ in loader) == list(range(NUM_DB))


def test_reader_pickles_and_reports_missing_things(test_root, tmp_path):
    shard(test_root)
    reader = ShardReader(split_dir(test_root))
    reader.read_bytes(0)  # opens a file: the pickle must not carry it
    clone = pickle.loads(pickle.dumps(reader))
    assert len(pickle.dumps(reader)) < 20_000
    assert clone.read_bytes(9) == reader.read_bytes(9)
    with pytest.raises(KeyError):
        reader.read_bytes(NUM_DB)
    with pytest.raises(KeyError):
        reader.meta(-1)
    with pytest.raises(UserError, match="no shard manifest"):
        ShardReader(tmp_path / "empty")


def test_load_tensor_is_the_normalised_image(test_root):
    shard(test_root)
    reader = ShardReader(split_dir(test_root))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    tensor = load_tensor(reader, 1, mean, std)
    image = np.asarray(reader.read_image(1), np.float32) / 255.0  # (H, W, 3)
    expected = torch.from_numpy((image - np.array(mean)) / np.array(std)).permute(2, 0, 1).float()
    assert tensor.shape == (3, 32, 15) and tensor.dtype == torch.float32 and tensor.is_contiguous()
    assert torch.allclose(tensor, expected, atol=1e-5)


def test_pool_writes_the_same_shards_as_in_process(tmp_path):
    serial, pooled = tmp_path / "serial", tmp_path / "pooled"
    make_test_root(serial)
    make_test_root(pooled)
    one = shard(serial, splits=["db"])["db"]
    two = shard(pooled, splits=["db"], workers=2)["db"]
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]


def test_plan_cuts_by_count_and_bytes():
    records = [formats.ImageRecord(i, Path(f"{i}.jpg"), str(i)) for i in range(7)]
    by_count = plan_shards([(r, 10) for r in records], shard_count=3, shard_bytes=10**9)
    assert [[r.index for r in s] for s in by_count] == [[0, 1, 2], [3, 4, 5], [6]]
    sizes = [40, 40, 30, 90, 200, 10, 10]
    by_bytes = plan_shards(list(zip(records, sizes)), shard_count=100, shard_bytes=100)
    assert [[r.index for r in s] for s in by_bytes] == [[0, 1], [2], [3], [4], [5, 6]]


def test_cli_writes_and_summarises(test_root, capsys):
    out = test_root / "elsewhere"
    assert main(["data", "shards", "--root", str(test_root), "--dataset", TEST_SET, "--image-size", "32",
                 "--out", str(out), "--shard-count", "5", "--shard-bytes", "1M", "--workers", "0",
                 "--splits", "query"]) == 0
    assert "roxford5k/query @32px: 3/3 images" in capsys.readouterr().out
    assert main(["data", "shards-info", str(out)]) == 0
    assert "3/3 images in 1 shard" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["data", "shards", "--root", "{root}", "--dataset", "nope"],
    ["data", "shards", "--root", "{root}/missing", "--dataset", TEST_SET],
    ["data", "shards", "--root", "{root}", "--dataset", TEST_SET, "--quality", "101"],
    ["data", "shards", "--root", "{root}", "--dataset", TEST_SET, "--shard-bytes", "lots"],
    ["data", "shards", "--root", "{root}", "--dataset", f"{TEST_SET},oxford5k", "--out", "{root}/x"],
    ["data", "shards", "--root", "{root}", "--dataset", TEST_SET, "--splits", "train"],
    ["data", "shards", "--root", "{root}", "--dataset", "oxford5k"],
    ["data", "shards-info", "{root}"],
])
def test_cli_mistakes_are_one_line_exit_2(test_root, capsys, argv):
    argv = [arg.replace("{root}", str(test_root)) for arg in argv]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "error" in err, err


def test_make_shards_script_uses_the_same_flags(test_root):
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_shards.py"
    env = os.environ | {"AMLDIST_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, str(script), "--root", str(test_root), "--dataset", TEST_SET,
                           "--image-size", "32", "--workers", "0", "--splits", "db"],
                          capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    assert ShardReader(split_dir(test_root)).indices.tolist() == list(range(NUM_DB))
    bad = subprocess.run([sys.executable, str(script), "--root", str(test_root), "--dataset", "oxford5k"],
                         capture_output=True, text=True, check=False, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


# ------------------------------------------------------------------ refusing outputs, damaged folders

def run_cli(argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of `amldist ARGV`, whether it returns or argparse exits."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


def shards_argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["data", "shards", "--root", str(root), "--dataset", TEST_SET, "--image-size", str(SIZE),
            "--out", str(out), "--workers", "0", "--shard-count", "4", *extra]


def test_cli_refuses_shards_of_another_dataset_unless_forced(test_root):
    out = test_root / "out"
    shard(test_root, out=out, splits=["db"])
    manifest_path = out / "db" / mf.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "dataset": "rparis6k"}))  # as if rparis6k lived here
    before = file_states(out / "db")
    code, err = run_cli(shards_argv(test_root, out, "--splits", "db"))
    assert code == 2 and err.count("\n") == 1 and "rparis6k/db" in err and "--force" in err, err
    assert file_states(out / "db") == before
    code, err = run_cli(shards_argv(test_root, out, "--splits", "db", "--force"))
    assert code == 0, err
    assert json.loads(manifest_path.read_text())["dataset"] == TEST_SET


def test_cli_refuses_a_foreign_manifest_even_when_forced(test_root):
    out = test_root / "out"
    (out / "db").mkdir(parents=True)
    foreign = out / "db" / mf.MANIFEST_NAME
    foreign.write_text(json.dumps({"format": "amldist-teacher-features", "version": 1}))
    code, err = run_cli(shards_argv(test_root, out, "--splits", "db", "--force"))
    assert code == 2 and err.count("\n") == 1 and "not a shard manifest" in err, err
    assert json.loads(foreign.read_text())["format"] == "amldist-teacher-features"


def test_cli_unwritable_out_fails_before_any_work(test_root, monkeypatch):
    from amldist.shards import write

    monkeypatch.setattr(write, "probe_image", lambda *args: pytest.fail("probed before checking the output"))
    blocker = test_root / "a-file"
    blocker.write_text("not a folder")
    code, err = run_cli(shards_argv(test_root, blocker / "out"))
    assert code == 2 and err.count("\n") == 1 and str(blocker) in err, err
    out = test_root / "out"  # db is writable, query is a file: found before db is written
    out.mkdir()
    (out / "query").write_text("not a folder")
    code, err = run_cli(shards_argv(test_root, out))
    assert code == 2 and err.count("\n") == 1 and str(out / "query") in err, err
    assert not (out / "db" / mf.MANIFEST_NAME).exists()


def test_cli_read_only_out_fails_before_any_work(test_root, monkeypatch, read_only_dir):
    from amldist.shards import write

    monkeypatch.setattr(write, "probe_image", lambda *args: pytest.fail("probed before checking the output"))
    code, err = run_cli(shards_argv(test_root, read_only_dir / "out"))
    assert code == 2 and err.count("\n") == 1 and "cannot write" in err, err
    assert str(read_only_dir / "out") in err
    assert list(read_only_dir.iterdir()) == []


def damage(folder: Path, how: str) -> None:
    manifest = json.loads((folder / mf.MANIFEST_NAME).read_text())
    if how == "shards list":  # one shard left in the list while the index names four
        manifest["shards"] = [{**manifest["shards"][0], "count": manifest["num_samples"]}]
        manifest["num_shards"] = 1
    elif how == "huge index":
        table = np.load(folder / mf.INDEX_NAME)
        table[-1, mf.COLUMN["index"]] = 10**11
        np.save(folder / mf.INDEX_NAME, table)
    elif how == "null count":
        manifest["num_images"] = None
    elif how == "bare":
        manifest = {"format_version": mf.FORMAT_VERSION}
    (folder / mf.MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize("how", ["shards list", "huge index", "null count", "bare"])
def test_damaged_shard_folder_is_a_user_error(test_root, how):
    shard(test_root, splits=["db"])
    folder = split_dir(test_root)
    damage(folder, how)
    with pytest.raises(UserError, match="damaged shard"):
        ShardReader(folder).read_bytes(NUM_DB - 1)
    code, err = run_cli(["data", "shards-info", str(folder)])
    if how in ("null count", "bare"):  # the index table is not read by shards-info
        assert code == 2 and err.count("\n") == 1 and f"damaged shard manifest in {folder}" in err, err
