"""Shards and teacher stores in an object store, against a real S3-API server on loopback (moto's
server mode): ranged reads, WebDataset streaming, and the node-local cache checked against manifests."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from test_shards import make_test_root, shard, split_dir

from amldist import node_cache, storage
from amldist.errors import UserError
from amldist.feature_store import FeatureStore, write_feature_store
from amldist.shards import ShardReader, read_manifest, stream_samples
from amldist.shards.manifest import check_shard_files

pytest.importorskip("moto")
from amldist.loopback_s3 import free_ports, loopback_s3


@pytest.fixture(scope="module")
def s3():
    with loopback_s3(buckets=["data"]) as server:
        yield server


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(node_cache.CACHE_VARIABLE, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def uploaded(s3, tmp_path_factory):
    """A shard split (14 images in 4 shards) and a teacher store, uploaded under s3://data/<run>/."""
    root = tmp_path_factory.mktemp("storage-root")
    make_test_root(root)
    shard(root)
    features = np.random.default_rng(0).normal(size=(14, 8))
    store = write_feature_store(root / "store", features, network="n.pth", network_sha256="0" * 64,
                                architecture="small_cnn", image_size=32, scales=[1.0], dataset="roxford5k",
                                split="db")
    files, _ = storage.upload_tree(split_dir(root), "s3://data/shards/db")
    assert files == 4 + 4 + 2  # 4 tars, their 4 part records, index.npy, manifest.json
    storage.upload_tree(store.directory, "s3://data/store")
    return root


def test_free_ports_are_distinct_and_free():
    import socket

    ports = free_ports(64)  # e.g. the nine ports of a test's Ray head: two alike and Ray refuses to start
    assert len(set(ports)) == 64 and all(0 < port < 65536 for port in ports)
    for port in ports[:8]:
        with socket.socket() as server:
            server.bind(("127.0.0.1", port))


def test_locations_and_the_endpoint_from_the_environment(s3, tmp_path):
    assert storage.is_uri("s3://b/x") and storage.is_uri("gs://b/x")
    assert not storage.is_uri(tmp_path) and not storage.is_uri("file:///tmp/x") and not storage.is_uri(None)
    assert storage.join("s3://b/x/", "train", "manifest.json") == "s3://b/x/train/manifest.json"
    assert storage.endpoint() == s3.endpoint
    fs, path = storage.filesystem("s3://data/shards")
    assert type(fs).__name__ == "S3FileSystem" and path == "data/shards"


def test_ranged_reads_of_single_samples_match_the_local_shards(uploaded):
    local, remote = ShardReader(split_dir(uploaded)), ShardReader("s3://data/shards/db")
    assert remote.remote and len(remote) == len(local) == 14
    assert np.array_equal(remote.indices, local.indices)
    for index in (0, 5, 13):
        assert remote.read_bytes(index) == local.read_bytes(index)
        assert remote.meta(index) == local.meta(index)
    clone = pickle.loads(pickle.dumps(remote))  # as DataLoader and Ray workers receive it
    assert clone.read_bytes(7) == local.read_bytes(7)
    remote.close()


def test_streaming_whole_shards_from_the_store_yields_every_sample(uploaded):
    local = {i: image.tobytes() for i, image, _ in stream_samples(split_dir(uploaded), split_by_node=False)}
    remote = {i: image.tobytes()
              for i, image, _ in stream_samples("s3://data/shards/db", split_by_node=False)}
    assert sorted(remote) == list(range(14)) and remote == local


def test_a_missing_remote_split_is_one_clear_error(s3):
    with pytest.raises(UserError, match="no shard manifest in s3://data/nothing"):
        read_manifest("s3://data/nothing")


def test_a_missing_or_truncated_shard_in_the_store_is_named_with_the_commands_that_restore_it(uploaded, s3):
    storage.upload_tree(split_dir(uploaded), "s3://data/damaged/db")
    manifest = read_manifest("s3://data/damaged/db")
    check_shard_files("s3://data/damaged/db", manifest)  # all there
    local = split_dir(uploaded).parent
    commands = (f"`amldist data shards --root {uploaded} --dataset {manifest['dataset']} --image-size "
                f"{manifest['image_size']} --splits db` and `amldist data upload {local} s3://data/damaged`")
    s3.client().delete_object(Bucket="data", Key="damaged/db/db-000002.tar")
    with pytest.raises(UserError) as caught:
        check_shard_files("s3://data/damaged/db", manifest)
    missing = "shard s3://data/damaged/db/db-000002.tar is missing"
    assert str(caught.value) == f"{missing}; rewrite it with {commands}"
    s3.client().put_object(Bucket="data", Key="damaged/db/db-000002.tar", Body=b"short")
    with pytest.raises(UserError, match=r"db-000002.tar holds 5 bytes, the manifest says \d+; rewrite"):
        check_shard_files("s3://data/damaged/db", manifest)


def test_the_node_cache_is_filled_once_and_checked_against_the_manifest(uploaded, cache, s3):
    first = node_cache.cached_copy("s3://data/shards/db")
    assert first.startswith(str(cache))
    reader = ShardReader(first)
    assert reader.read_bytes(3) == ShardReader(split_dir(uploaded)).read_bytes(3)
    (tar,) = cache.glob("*/db-000000.tar")
    before = tar.stat().st_mtime_ns
    assert node_cache.cached_copy("s3://data/shards/db") == first  # the marker matches: nothing fetched
    assert tar.stat().st_mtime_ns == before

    # A shard replaced in the store behind its manifest's back: a fresh fill refuses it.
    s3.client().put_object(Bucket="data", Key="shards/db/db-000001.tar",
                           Body=b"not the shard the manifest names")
    try:
        with pytest.raises(UserError, match="db-000001.tar has 32 bytes, its manifest says"):
            node_cache.cached_copy("s3://data/shards/db", root=cache / "other")
    finally:
        storage.copy_file(split_dir(uploaded) / "db-000001.tar", "s3://data/shards/db/db-000001.tar")


def test_a_changed_manifest_refills_only_what_changed(uploaded, cache, s3, tmp_path):
    storage.upload_tree(split_dir(uploaded), "s3://data/moving/db")
    first = node_cache.cached_copy("s3://data/moving/db")
    manifest = read_manifest(split_dir(uploaded))
    manifest["source"] = {**manifest["source"], "note": "rewritten"}  # same files, a new manifest
    s3.client().put_object(Bucket="data", Key="moving/db/manifest.json", Body=json.dumps(manifest).encode())
    tar = next(iter(cache.glob("*/db-000000.tar")))
    before = tar.stat().st_mtime_ns
    assert node_cache.cached_copy("s3://data/moving/db") == first
    assert tar.stat().st_mtime_ns == before  # still right by size and sha256: kept
    assert read_manifest(first)["source"]["note"] == "rewritten"


def test_a_cached_teacher_store_opens_memory_mapped_and_verified(uploaded, cache):
    local = node_cache.cached_copy("s3://data/store")
    store = FeatureStore.open(local, verify=True)
    original = FeatureStore.open(uploaded / "store")
    assert np.array_equal(store.features, original.features)


def test_a_single_file_and_local_paths(uploaded, cache, tmp_path):
    storage.copy_file(split_dir(uploaded) / "index.npy", "s3://data/files/index.npy")
    local = node_cache.cached_copy("s3://data/files/index.npy")
    assert Path(local).read_bytes() == (split_dir(uploaded) / "index.npy").read_bytes()
    assert node_cache.cached_copy(str(tmp_path)) == str(tmp_path)  # local: read in place
    storage.copy_file(split_dir(uploaded) / "db-000000.json", "s3://data/odd/manifest.json")  # a part record
    with pytest.raises(UserError, match="neither a shard split nor a teacher feature store"):
        node_cache.cached_copy("s3://data/odd")


def test_the_upload_command_copies_a_folder_and_refuses_a_missing_bucket(uploaded, s3, capsys):
    from amldist.cli.main import main

    assert main(["data", "upload", str(split_dir(uploaded)), "s3://data/cli/db"]) == 0
    assert "copied 10 files" in capsys.readouterr().out
    assert ShardReader("s3://data/cli/db").read_bytes(2) == ShardReader(split_dir(uploaded)).read_bytes(2)
    assert main(["data", "upload", str(split_dir(uploaded) / "index.npy"), "s3://data/cli/one.npy"]) == 0
    assert "copied 1 files" in capsys.readouterr().out and storage.is_file("s3://data/cli/one.npy")
    assert main(["data", "upload", str(split_dir(uploaded)), "s3://no-such-bucket/db"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot copy" in err[0] and "s3://no-such-bucket/db" in err[0]
