"""Learned (Lw) and PCA whitening: the defining identities, application, files."""

import numpy as np
import pytest
import torch

from amldist import whiten
from amldist.errors import UserError


def _pairs_data(num_images=200, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((num_images, dim)) * np.linspace(3.0, 0.5, dim)  # anisotropic
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    qidxs = np.arange(0, 100)
    pidxs = (qidxs + 1 + rng.integers(0, 50, size=100)) % num_images
    return X, qidxs, pidxs


def test_whitened_pair_difference_covariance_is_identity():
    X, qidxs, pidxs = _pairs_data()
    w = whiten.learn_whitening(X, qidxs, pidxs)
    diffs = (X[qidxs] - X[pidxs]) @ w.P.T  # (M, D), P (x_q - m) - P (x_p - m)
    np.testing.assert_allclose(diffs.T @ diffs / len(qidxs), np.eye(X.shape[1]), atol=1e-8)
    np.testing.assert_allclose(w.m, X[qidxs].mean(axis=0))


def test_lw_rotation_orders_variance_descending():
    X, qidxs, pidxs = _pairs_data(seed=1)
    w = whiten.learn_whitening(X, qidxs, pidxs)
    Y = (X - w.m) @ w.P.T  # (N, D)
    C = Y.T @ Y
    # After the rotation the total scatter is diagonal with a descending diagonal.
    np.testing.assert_allclose(C - np.diag(np.diag(C)), 0, atol=1e-6 * np.abs(C).max())
    assert np.all(np.diff(np.diag(C)) <= 1e-9)


def test_singular_pair_covariance_gets_jitter():
    X, _, _ = _pairs_data(dim=6)
    # 3 pairs in 6 dimensions: S has rank <= 3, plain Cholesky fails.
    w = whiten.learn_whitening(X, [0, 1, 2], [3, 4, 5])
    assert np.all(np.isfinite(w.P))
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(np.cov((X[[0, 1, 2]] - X[[3, 4, 5]]).T, bias=True))


def test_apply_whitening_projects_centres_and_normalises():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((10, 4))
    P = rng.standard_normal((4, 4))
    w = whiten.Whitening(m=np.full(4, 0.5), P=P)
    out = whiten.apply_whitening(X, w, dims=2)
    expected = (X - 0.5) @ P[:2].T
    expected /= np.linalg.norm(expected, axis=1, keepdims=True) + 1e-6
    assert out.shape == (10, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    with pytest.raises(UserError):
        whiten.apply_whitening(X, w, dims=5)
    with pytest.raises(UserError):
        whiten.apply_whitening(X[:, :3], w)


def test_pca_whitening_gives_identity_covariance():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((300, 5)) @ rng.standard_normal((5, 5))
    w = whiten.learn_pca_whitening(X)
    Y = (X - w.m) @ w.P.T
    np.testing.assert_allclose(Y.T @ Y / len(X), np.eye(5), atol=1e-8)


def test_save_load_roundtrip_is_weights_only_safe(tmp_path):
    X, qidxs, pidxs = _pairs_data()
    w = whiten.learn_whitening(X, qidxs, pidxs)
    w.meta.update({"image_size": 1024, "scales": (1.0, 0.5), "dropped": object()})
    path = tmp_path / "net.retrieval-SfM-120k-1024.whiten-ms.pt"
    whiten.save_whitening(path, w)
    raw = torch.load(path, weights_only=True)  # plain tensors and plain meta only
    assert set(raw) == {"m", "P", "meta"}
    back = whiten.load_whitening(path)
    np.testing.assert_array_equal(back.P, w.P)
    np.testing.assert_array_equal(back.m, w.m)
    assert back.meta["scales"] == [1.0, 0.5] and "dropped" not in back.meta
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def test_load_cirtorch_style_numpy_whitening(tmp_path):
    # cirtorch/aml save {'m': D x 1 numpy, 'P': D x D numpy} with torch.save.
    path = tmp_path / "student_whitening.pth"
    torch.save({"m": np.ones((3, 1)), "P": 2 * np.eye(3, dtype=np.float32)}, path)
    w = whiten.load_whitening(path)
    assert w.m.shape == (3,) and w.P.shape == (3, 3)
    np.testing.assert_allclose(whiten.apply_whitening(np.array([[2.0, 1.0, 1.0]]), w), [[1, 0, 0]], atol=1e-6)


def test_bad_inputs_are_user_errors(tmp_path):
    X, _, _ = _pairs_data()
    with pytest.raises(UserError):
        whiten.learn_whitening(X, [0, 1], [2])
    with pytest.raises(UserError):
        whiten.learn_whitening(X, [0], [len(X)])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(UserError):
        whiten.load_whitening(bad)
    with pytest.raises(UserError):
        whiten.whitening_from_dict({"m": np.zeros(3), "P": np.zeros((3, 4))})


# random bytes that fail torch.load with IndexError, UnicodeDecodeError, KeyError
@pytest.mark.parametrize("seed", [17, 54, 62])
def test_random_bytes_whitening_file_is_one_line_user_error(tmp_path, seed):
    bad = tmp_path / "random.whiten.pt"
    bad.write_bytes(np.random.default_rng(seed).bytes(256))
    with pytest.raises(UserError, match="cannot read whitening file"):
        whiten.load_whitening(bad)


def test_non_numeric_whitening_values_name_the_file(tmp_path):
    bad = tmp_path / "text.whiten.pt"
    torch.save({"m": "abc", "P": torch.eye(3, dtype=torch.float64)}, bad)
    with pytest.raises(UserError, match=f"damaged whitening file {bad}: whitening 'm' is not an array"):
        whiten.load_whitening(bad)
    with pytest.raises(UserError, match="'P' is not an array"):
        whiten.whitening_from_dict({"m": np.zeros(2), "P": [[1.0, 2.0], [3.0]]})
