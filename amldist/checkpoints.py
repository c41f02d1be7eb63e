"""Checkpoints: atomic save/load of amldist training state, and cirtorch/aml network files.

An amldist checkpoint is a torch file holding
    {'format': 'amldist-checkpoint', 'version': 1, 'state_dict', 'meta' (cirtorch-style dict), 'epoch',
     'optimizer', 'scheduler', 'config', 'metrics'}
— a superset of cirtorch's training checkpoint ({'epoch', 'meta', 'state_dict', 'min_loss', 'optimizer'}),
so either loads with `load_checkpoint`, and cirtorch can read the `state_dict` + `meta` of ours.
Public network files ({'state_dict', 'meta', ...}, meta possibly holding a whitening 'Lw' of numpy
arrays) load with `load_network_file`; `export_network_file` writes that plain form.

Every file is read with `torch.load(weights_only=True)`; the only extra globals allowed are the numpy
ones needed to rebuild arrays, so a file carrying any other pickled object is refused (UserError).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from amldist.atomic import atomic_path
from amldist.errors import UserError
from amldist.nets import NetMeta, RetrievalNet, build_net
from amldist.nets.backbones import check_architecture, num_backbone_layers

CHECKPOINT_FORMAT = "amldist-checkpoint"
CHECKPOINT_VERSION = 1

# Globals a numpy array or scalar pickle needs, under numpy 2 names and the numpy 1 names of older files.
_NUMPY_GLOBALS = [
    np.ndarray,
    np.dtype,
    (np._core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
    (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    (np._core.multiarray.scalar, "numpy._core.multiarray.scalar"),
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    *[type(np.dtype(code))
      for code in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "?")],
]


# A damaged file can fail anywhere inside torch.load: zip directory, unpickler opcodes, storage records.
_DAMAGED_FILE_ERRORS = (RuntimeError, EOFError, ValueError, struct.error, KeyError, IndexError, TypeError,
                        AttributeError, zipfile.BadZipFile, OSError)


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True plus numpy arrays; anything else is refused with a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _refused_global(err)
        if refused:
            raise UserError(f"{path}: refusing to load, the file holds pickled objects other than tensors, "
                            f"numbers, strings and numpy arrays ({refused})") from None
        raise UserError(f"{path}: not a readable torch file ({_first_line(err)})") from None
    except _DAMAGED_FILE_ERRORS as err:
        raise UserError(f"{path}: not a readable torch file ({_first_line(err)})") from None


def _refused_global(err: Exception) -> str | None:
    """The weights-only unpickler's reason for refusing a global, if that is why loading failed."""
    for line in str(err).splitlines():
        if "GLOBAL" in line:
            return line.strip()[:200]
    return None


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(err).__name__


def save_checkpoint(path: str | os.PathLike, model: RetrievalNet, *, epoch: int, optimizer=None,
                    scheduler=None, config: Any = None, metrics: dict | None = None) -> Path:
    """Write everything needed to resume or evaluate, atomically (a crash leaves the old file intact)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "state_dict": model.state_dict(),
        "meta": model.meta.to_dict(),
        "epoch": int(epoch),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "config": _plain(config),
        "metrics": _plain(metrics),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[RetrievalNet, dict]:
    """Load an amldist (or cirtorch/aml training) checkpoint: the network and the rest of the file.

    Resume with `optimizer.load_state_dict(info['optimizer'])` (see `restore_training_state`)."""
    state = safe_torch_load(path, map_location)
    net = network_from_state(state, source=str(path))
    info = {key: value for key, value in state.items() if key != "state_dict"}
    return net, info


def restore_training_state(info: dict, optimizer=None, scheduler=None) -> int:
    """Load the optimiser/scheduler state saved in a checkpoint; returns the epoch it finished."""
    if optimizer is not None and info.get("optimizer") is not None:
        optimizer.load_state_dict(info["optimizer"])
    if scheduler is not None and info.get("scheduler") is not None:
        scheduler.load_state_dict(info["scheduler"])
    return int(info.get("epoch", 0))


def load_network_file(path: str | os.PathLike, map_location: Any = "cpu") -> RetrievalNet:
    """A cirtorch/aml network file (e.g. retrievalSfM120k-vgg16-gem, aml's mobilenet_v2 students) as a
    RetrievalNet. A precomputed whitening in meta['Lw'] is kept in `net.meta.extra['Lw']`."""
    return network_from_state(safe_torch_load(path, map_location), source=str(path))


def export_network_file(path: str | os.PathLike, model: RetrievalNet) -> Path:
    """Write the plain {'state_dict', 'meta'} form that cirtorch/aml test scripts read."""
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "meta": model.meta.to_dict()}, tmp)
    return Path(path)


def network_from_state(state: Any, source: str) -> RetrievalNet:
    """Build the network a {'state_dict', 'meta'} dict describes and load its weights."""
    if not isinstance(state, dict) or "state_dict" not in state or "meta" not in state:
        raise UserError(f"{source}: not a network file (expected a dict with 'state_dict' and 'meta')")
    weights = state["state_dict"]
    meta_dict = state["meta"]
    if not isinstance(weights, dict):
        raise UserError(f"damaged network file {source}: 'state_dict' is a {type(weights).__name__}, "
                        "not a dict")
    architecture = str(meta_dict.get("architecture", "")) if isinstance(meta_dict, dict) else ""
    check_architecture(architecture)
    _refuse_torchvision_layout(architecture, weights, source)
    try:
        meta = NetMeta.from_dict(meta_dict, projection_dim=_stored_projection_dim(architecture, weights))
    except UserError as err:
        raise UserError(f"damaged network file {source}: {err}") from None
    with torch.device("meta"):  # build without allocating; load_state_dict(assign=True) brings the weights
        net = build_net(meta, pretrained=False)
    _load_weights(net, weights, source)
    return net


def _refuse_torchvision_layout(architecture: str, weights: dict, source: str) -> None:
    """amldist's efficientnet_b3 is timm's tf_efficientnet_b3, as in aml (whose files load); files from
    an amldist that built torchvision's EfficientNet-B3 hold '.block.' names: say so instead of listing
    keys."""
    if architecture == "efficientnet_b3" and any(".block." in key for key in weights):
        raise UserError(f"{source}: an EfficientNet-B3 in torchvision's layout (amldist before it used "
                        f"timm's tf_efficientnet_b3, as aml does); this amldist cannot load it")


def _stored_projection_dim(architecture: str, weights: dict) -> int | None:
    """aml files lack 'projection_dim': a 1x1 conv right after the backbone is the projection."""
    conv = weights.get(f"features.{num_backbone_layers(architecture)}.weight")
    if isinstance(conv, torch.Tensor) and conv.dim() == 4 and tuple(conv.shape[2:]) == (1, 1):
        return int(conv.shape[0])
    return None


def _load_weights(net: nn.Module, weights: dict, source: str) -> None:
    expected, found = set(net.state_dict()), set(weights)
    if expected != found:
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        raise UserError(f"{source}: weights do not match a {net.meta.architecture} network "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    try:
        net.load_state_dict(weights, assign=True)
    except RuntimeError as err:
        raise UserError(f"{source}: weights do not fit the network ({_first_mismatch(err)})") from None


def _first_mismatch(err: RuntimeError) -> str:
    lines = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
    return lines[0][:200] if lines else str(err).splitlines()[0][:200]


def _plain(value: Any) -> Any:
    """Config/metrics as builtins only, so weights_only loading can read them back."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint config/metrics")
