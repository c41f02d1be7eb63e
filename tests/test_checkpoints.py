"""Checkpoints: round trips, cirtorch/aml network files, and refusal of pickled code."""

from __future__ import annotations

import io
import os
import zipfile

import numpy as np
import pytest
import torch

from amldist.checkpoints import (
    export_network_file,
    load_checkpoint,
    load_network_file,
    restore_training_state,
    save_checkpoint,
)
from amldist.errors import UserError
from amldist.nets import create_net


def _trained_net_and_optimizer():
    torch.manual_seed(0)
    net = create_net("small_cnn", projection_dim=32, pretrained=False)
    optimizer = torch.optim.SGD(net.param_groups(lr=0.1, weight_decay=1e-6), momentum=0.9)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.99)
    for _ in range(2):
        optimizer.zero_grad()
        net(torch.randn(2, 3, 32, 40)).sum().backward()
        optimizer.step()
        scheduler.step()
    return net.eval(), optimizer, scheduler


def test_checkpoint_round_trip_restores_outputs_and_optimizer(tmp_path):
    net, optimizer, scheduler = _trained_net_and_optimizer()
    path = tmp_path / "run" / "model_epoch2.pth"
    save_checkpoint(path, net, epoch=2, optimizer=optimizer, scheduler=scheduler,
                    config={"loss": "contrastive", "lr": 0.1, "data": tmp_path},
                    metrics={"val_loss": np.float32(0.25)})
    loaded, info = load_checkpoint(path)
    x = torch.randn(3, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), net(x), rtol=0, atol=0)
    assert loaded.meta.to_dict() == net.meta.to_dict()
    assert info["epoch"] == 2 and info["metrics"] == {"val_loss": 0.25}
    assert info["config"] == {"loss": "contrastive", "lr": 0.1, "data": str(tmp_path)}

    fresh_optimizer = torch.optim.SGD(loaded.param_groups(lr=0.1, weight_decay=1e-6), momentum=0.9)
    fresh_scheduler = torch.optim.lr_scheduler.ExponentialLR(fresh_optimizer, gamma=0.99)
    assert restore_training_state(info, fresh_optimizer, fresh_scheduler) == 2
    old_state, new_state = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert new_state["param_groups"] == old_state["param_groups"]
    assert fresh_scheduler.last_epoch == 2
    for key, value in old_state["state"].items():
        torch.testing.assert_close(new_state["state"][key]["momentum_buffer"], value["momentum_buffer"])
    assert [p.name for p in tmp_path.joinpath("run").iterdir()] == ["model_epoch2.pth"]  # no temp left


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    net, _, _ = _trained_net_and_optimizer()
    path = tmp_path / "model_best.pth"
    save_checkpoint(path, net, epoch=1)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, net, epoch=2)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["model_best.pth"]


def _cirtorch_style_file(path, net, extra_meta=None):
    """A file laid out like cirtorch's public networks: cirtorch's own meta keys only, plus Lw."""
    meta = {key: value for key, value in net.meta.to_dict().items() if key != "projection_dim"}
    meta.update(extra_meta or {})
    torch.save({"state_dict": net.state_dict(), "meta": meta, "epoch": 30, "min_loss": 0.1}, path)


def test_cirtorch_teacher_file_with_numpy_whitening_loads(tmp_path):
    torch.manual_seed(2)
    teacher = create_net("resnet18", pretrained=False, whitening=True).eval()
    whitening = {"retrieval-SfM-120k": {"ss": {"m": np.random.rand(512, 1),
                                               "P": np.eye(512, dtype=np.float32)},
                                        "ms": {"m": np.zeros((512, 1)), "P": np.ones((512, 512))}}}
    path = tmp_path / "retrievalSfM120k-resnet18-gem-w.pth"
    _cirtorch_style_file(path, teacher, {"Lw": whitening})
    loaded = load_network_file(path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), teacher(x), rtol=0, atol=0)
    assert loaded.meta.projection_dim is None and loaded.whiten is not None
    lw = loaded.meta.extra["Lw"]["retrieval-SfM-120k"]["ss"]
    assert isinstance(lw["P"], np.ndarray) \
        and np.array_equal(lw["m"], whitening["retrieval-SfM-120k"]["ss"]["m"])


def test_aml_student_file_without_projection_key_loads(tmp_path):
    torch.manual_seed(3)
    student = create_net("mobilenet_v2", projection_dim=512, pretrained=False).eval()
    path = tmp_path / "mobilenet_v2_gem_contr_plus_vgg16.pth.tar"
    _cirtorch_style_file(path, student)
    loaded = load_network_file(path).eval()
    assert loaded.meta.projection_dim == 512 and loaded.meta.outputdim == 512
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), student(x), rtol=0, atol=0)


def test_files_written_by_numpy_1_load(tmp_path):
    """Public files were pickled under numpy 1, whose arrays name numpy.core.multiarray._reconstruct."""
    net = create_net("small_cnn", pretrained=False).eval()
    buffer = io.BytesIO()
    torch.save({"state_dict": net.state_dict(), "meta": {**net.meta.to_dict(), "Lw": {"m": np.arange(4.0)}}},
               buffer)
    source = zipfile.ZipFile(buffer)
    path = tmp_path / "old.pth"
    with zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray\n" in data
                data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
            target.writestr(item, data)
    loaded = load_network_file(path)
    assert np.array_equal(loaded.meta.extra["Lw"]["m"], np.arange(4.0))


def test_exported_file_is_plain_cirtorch_format(tmp_path):
    net, optimizer, _ = _trained_net_and_optimizer()
    checkpoint = save_checkpoint(tmp_path / "ckpt.pth", net, epoch=5, optimizer=optimizer)
    exported = export_network_file(tmp_path / "student.pth", load_network_file(checkpoint))
    plain = torch.load(exported, weights_only=True)  # what a cirtorch/aml user's torch.load sees
    assert set(plain) == {"state_dict", "meta"}
    assert {"architecture", "pooling", "mean", "std", "outputdim", "local_whitening", "regional",
            "whitening"} <= set(plain["meta"])
    assert "features.12.weight" in plain["state_dict"] and "pool.p" in plain["state_dict"]
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(load_network_file(exported).eval()(x), net(x), rtol=0, atol=0)


class _Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    net = create_net("small_cnn", pretrained=False)
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": net.state_dict(), "meta": net.meta.to_dict(), "epoch": _Payload(marker)}, path)
    for load in (load_checkpoint, load_network_file):
        with pytest.raises(UserError, match="refusing to load") as err:
            load(path)
        assert "\n" not in str(err.value)
    assert not marker.exists()


def test_bad_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="not a readable torch file"):
        load_network_file(junk)
    wrong = tmp_path / "wrong.pth"
    resnet = create_net("resnet18", pretrained=False)
    torch.save({"state_dict": resnet.state_dict(),
                "meta": {**resnet.meta.to_dict(), "architecture": "small_cnn"}},
               wrong)
    with pytest.raises(UserError, match="do not match a small_cnn network"):
        load_network_file(wrong)
    shapes = tmp_path / "shapes.pth"
    small = create_net("small_cnn", pretrained=False)
    torch.save({"state_dict": small.state_dict(), "meta": {**small.meta.to_dict(), "pooling": "mac"}}, shapes)
    with pytest.raises(UserError, match="do not match"):  # GeM's pool.p has no place in a MAC network
        load_network_file(shapes)
    not_a_net = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_a_net)
    with pytest.raises(UserError, match="not a network file"):
        load_network_file(not_a_net)


@pytest.mark.parametrize("damage, message", [
    (lambda state: state["meta"].update(outputdim="big"), "meta['outputdim']"),
    (lambda state: state["meta"].update(mean="abc"), "meta['mean']"),
    (lambda state: state["meta"].update(projection_dim="x"), "meta['projection_dim']"),
    (lambda state: state["meta"].update(std=[0.2, 0.2]), "meta['std'] must be 3 numbers"),
    (lambda state: state.update(state_dict=list(state["state_dict"].values())), "'state_dict' is a list"),
])
def test_damaged_metadata_is_a_user_error_naming_the_file(tmp_path, damage, message):
    path = tmp_path / "model_best.pth.tar"
    save_checkpoint(path, create_net("small_cnn", pretrained=False), epoch=3)
    state = torch.load(path, weights_only=True)
    damage(state)
    torch.save(state, path)
    with pytest.raises(UserError) as exc:
        load_checkpoint(path)
    text = str(exc.value)
    assert text.startswith(f"damaged network file {path}: ") and message in text and "\n" not in text
