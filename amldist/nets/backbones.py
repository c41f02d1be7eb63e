"""Convolutional backbones with the classifier removed, laid out as cirtorch and aml lay them out.

The module order fixes the parameter names, so networks saved by cirtorch/aml load unchanged:
- vgg16: torchvision `features` without the last max-pool (ends in ReLU)     -> features.0 ... features.29
- resnet18/50/101: torchvision children without avgpool and fc                -> features.0 ... features.7
- mobilenet_v2: torchvision `features` as one block                            -> features.0.*
- efficientnet_b3, efficientnet_lite0/1/2: timm's tf_ EfficientNets in aml's order
  (amldist.nets.timm_backbones)                                                -> features.0 ... features.6
- mini_cnn / small_cnn / wide_cnn: four conv-BN-ReLU layers, widths up to 128 / 128 / 256
                                                                              -> features.0 ... features.11
  (tests and the CPU demo: unlike the ImageNet networks, they learn from scratch in CPU-minutes)
A student's 1x1 projection (no bias) and its ReLU follow the backbone inside `features`, as in aml
(`features.1.weight` for mobilenet_v2, `features.7.weight` for the EfficientNets).
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from urllib.error import URLError

import torch
import torchvision
from torch import nn

from amldist.errors import UserError
from amldist.nets import timm_backbones
from amldist.nets.meta import IMAGENET_MEAN, IMAGENET_STD
from amldist.nets.timm_backbones import TIMM_ARCHITECTURES

log = logging.getLogger(__name__)

# Channels of the last feature map (= descriptor dimension without projection).
OUTPUT_CHANNELS = {
    "vgg16": 512,
    "resnet18": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "mobilenet_v2": 1280,
    **{architecture: spec.channels for architecture, spec in TIMM_ARCHITECTURES.items()},
    "mini_cnn": 128,
    "small_cnn": 128,
    "wide_cnn": 256,
}
# Plain conv-BN-ReLU stacks that learn from scratch in CPU-minutes (the CPU demo's teacher and student).
_PLAIN_CNN_WIDTHS = {"mini_cnn": (16, 32, 64, 128), "small_cnn": (32, 64, 128, 128),
                     "wide_cnn": (64, 128, 256, 256)}
ARCHITECTURES = tuple(OUTPUT_CHANNELS)
TEACHERS = ("vgg16", "resnet101")
STUDENTS = ("mobilenet_v2", "efficientnet_b3")

# The ImageNet weights `pretrained=True` gave when cirtorch/aml were written.
_IMAGENET_WEIGHTS = "IMAGENET1K_V1"
OFFLINE_ENV = "AMLDIST_OFFLINE"


def check_architecture(architecture: str) -> None:
    if architecture not in OUTPUT_CHANNELS:
        raise UserError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")


def backbone_layers(architecture: str, pretrained: bool) -> list[nn.Module]:
    """The backbone as the list of modules that start `RetrievalNet.features`."""
    check_architecture(architecture)
    if architecture in _PLAIN_CNN_WIDTHS:
        if pretrained:
            log.debug("%s has no pretrained weights; it starts from random weights", architecture)
        return _plain_cnn_layers(_PLAIN_CNN_WIDTHS[architecture])
    if architecture in TIMM_ARCHITECTURES:
        return timm_backbones.timm_backbone_layers(architecture, pretrained)
    net = getattr(torchvision.models, architecture)(weights=None)
    if pretrained:
        net.load_state_dict(imagenet_state_dict(architecture))
    if architecture.startswith("vgg"):
        return list(net.features.children())[:-1]
    if architecture.startswith("resnet"):
        return list(net.children())[:-2]
    return [net.features]


def projection_layers(in_channels: int, projection_dim: int) -> list[nn.Module]:
    """aml's student head: 1x1 convolution without bias, then ReLU (keeps GeM's input non-negative)."""
    return [nn.Conv2d(in_channels, projection_dim, kernel_size=1, bias=False), nn.ReLU(inplace=True)]


def num_backbone_layers(architecture: str) -> int:
    """Where the projection sits in `features` (its index), without allocating any weights."""
    with torch.device("meta"):
        return len(backbone_layers(architecture, pretrained=False))


def input_normalisation(architecture: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) of the images the architecture's ImageNet weights were trained on."""
    spec = TIMM_ARCHITECTURES.get(architecture)
    return (spec.mean, spec.std) if spec is not None else (IMAGENET_MEAN, IMAGENET_STD)


def has_imagenet_weights(architecture: str) -> bool:
    """Whether ImageNet weights exist for the architecture at all (on disk or not: `weights_location`)."""
    return architecture not in _PLAIN_CNN_WIDTHS


def weights_location(architecture: str) -> tuple[Path | None, str]:
    """Where the ImageNet weights of `architecture` are on disk (None: not there, or none exist) and
    where they come from, for `amldist nets info`."""
    check_architecture(architecture)
    if not has_imagenet_weights(architecture):
        return None, "none (learns from scratch)"
    if architecture in TIMM_ARCHITECTURES:
        return timm_backbones.weights_location(architecture)
    cached, url = hub_checkpoint_path(architecture)
    return (cached if cached.is_file() else None), f"torch hub {url}"


def _plain_cnn_layers(widths: tuple[int, ...]) -> list[nn.Module]:
    """Four (conv 3x3 stride 2, BN, ReLU) blocks of the given output widths."""
    layers: list[nn.Module] = []
    for cin, cout in itertools.pairwise((3, *widths)):
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                   nn.ReLU(inplace=True)]
    return layers


def hub_checkpoint_path(architecture: str) -> tuple[Path, str]:
    """Where torch hub keeps (or would keep) the ImageNet weights of `architecture`, and their URL."""
    url = torchvision.models.get_model_weights(architecture)[_IMAGENET_WEIGHTS].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url), url


def imagenet_state_dict(architecture: str) -> dict[str, torch.Tensor]:
    """The ImageNet weights in the parameter names of the library that builds the architecture: torchvision's
    from the torch hub cache, else downloaded (unless offline); timm's see amldist.nets.timm_backbones."""
    check_architecture(architecture)
    if architecture in TIMM_ARCHITECTURES:
        return timm_backbones.imagenet_state_dict(architecture)
    cached, url = hub_checkpoint_path(architecture)
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    hint = f"put {cached.name} into {cached.parent} or pass --no-pretrained"
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise UserError(f"no ImageNet weights for {architecture} and {OFFLINE_ENV} is set: {hint}")
    log.info("downloading ImageNet weights for %s from %s", architecture, url)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True,
                                                  progress=False, weights_only=True)
    except (OSError, URLError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot download ImageNet weights for {architecture} ({reason}): {hint}") from None
