"""Teacher feature store: round trip, memory map, refusal of a mismatched or corrupt store, atomic writes."""

import json

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
