"""Retrieval networks: backbones, pooling, projection, `RetrievalNet` and its meta."""

from amldist.nets.backbones import (
    ARCHITECTURES,
    OUTPUT_CHANNELS,
    STUDENTS,
    TEACHERS,
    has_imagenet_weights,
    imagenet_state_dict,
    input_normalisation,
    weights_location,
)
from amldist.nets.meta import IMAGENET_MEAN, IMAGENET_STD, NetMeta
from amldist.nets.model import RetrievalNet, build_net, create_net, freeze_batchnorm
from amldist.nets.pooling import MAC, POOLINGS, GeM, SPoC, gem, l2_normalize, mac, spoc

__all__ = [
    "ARCHITECTURES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAC",
    "OUTPUT_CHANNELS",
    "POOLINGS",
    "STUDENTS",
    "TEACHERS",
    "GeM",
    "NetMeta",
    "RetrievalNet",
    "SPoC",
    "build_net",
    "create_net",
    "freeze_batchnorm",
    "gem",
    "has_imagenet_weights",
    "imagenet_state_dict",
    "input_normalisation",
    "l2_normalize",
    "mac",
    "spoc",
    "weights_location",
]
