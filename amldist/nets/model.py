"""`RetrievalNet`: backbone (+ optional 1x1 projection) -> global pooling -> L2N (-> optional whitening)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from amldist.errors import UserError
from amldist.nets.backbones import (
    OUTPUT_CHANNELS,
    backbone_layers,
    check_architecture,
    input_normalisation,
    num_backbone_layers,
    projection_layers,
)
from amldist.nets.meta import NetMeta
from amldist.nets.padding import PaddedForward, host_sizes, valid_mask
from amldist.nets.pooling import POOLINGS, l2_normalize

GEM_LR_MULTIPLIER = 10.0  # cirtorch trains GeM's p ten times faster, without weight decay


class RetrievalNet(nn.Module):
    """Maps images (B, 3, H, W) to L2-normalised descriptors (B, D), one row per image.

    Parameter names follow cirtorch (`features.N...`, `pool.p`, `whiten.weight`), so cirtorch and aml
    network files load into it directly.
    """

    def __init__(self, features: nn.Sequential, pool: nn.Module, meta: NetMeta,
                 whiten: nn.Linear | None = None):
        super().__init__()
        self.features = features
        self.pool = pool
        self.whiten = whiten
        self.meta = meta
        self._padded = PaddedForward()

    def forward(self, x: Tensor, valid_hw: Tensor | Sequence[Sequence[int]] | None = None) -> Tensor:
        """x: (B, 3, H, W); valid_hw: each image's (h, w) before zero-padding (bottom/right), a (B, 2) CPU
        tensor or B pairs of ints (kept on the host: a GPU forward never waits to read them)."""
        sizes = None if valid_hw is None else host_sizes(valid_hw)
        if sizes is None or all(size == tuple(x.shape[-2:]) for size in sizes):
            pooled = self.pool(self.features(x))  # (B, C)
        else:
            with self._padded.masking(self.features, x, sizes) as out_hw:
                fmap = self.features(x)  # (B, C, h, w)
            pooled = self.pool(fmap, valid_mask(out_hw, fmap.shape[-2], fmap.shape[-1]))
        descriptors = l2_normalize(pooled)  # (B, D)
        if self.whiten is not None:
            descriptors = l2_normalize(self.whiten(descriptors))
        return descriptors

    def param_groups(self, lr: float, weight_decay: float,
                     projection_lr_multiplier: float = 1.0) -> list[dict]:
        """cirtorch's optimiser groups: features; GeM p at lr x 10 without weight decay; whitening. With a
        multiplier other than 1, the 1x1 projection is its own group at lr x projection_lr_multiplier (it
        starts from random weights while the backbone starts from ImageNet's); at 1 the groups stay aml's,
        so optimiser states saved before this option still load."""
        head = self._projection_parameters() if projection_lr_multiplier != 1.0 else []
        backbone = [p for p in self.features.parameters() if all(p is not q for q in head)]
        groups = [{"params": backbone, "lr": lr, "weight_decay": weight_decay}]
        if head:
            groups.append({"params": head, "lr": lr * projection_lr_multiplier, "weight_decay": weight_decay})
        pool_params = list(self.pool.parameters())
        if pool_params:
            groups.append({"params": pool_params, "lr": lr * GEM_LR_MULTIPLIER, "weight_decay": 0.0})
        if self.whiten is not None:
            groups.append({"params": list(self.whiten.parameters()), "lr": lr, "weight_decay": weight_decay})
        return groups

    def _projection_parameters(self) -> list:
        if self.meta.projection_dim is None:
            return []
        return list(self.features[num_backbone_layers(self.meta.architecture):].parameters())

    def extra_repr(self) -> str:
        meta = self.meta
        return f"architecture={meta.architecture}, pooling={meta.pooling}, outputdim={meta.outputdim}"


def create_net(architecture: str, pooling: str = "gem", projection_dim: int | None = None,
               pretrained: bool = True, whitening: bool = False) -> RetrievalNet:
    """Build a retrieval network. `projection_dim` adds the student's 1x1 conv + ReLU to that dimension
    (the teacher's d); `whitening` adds cirtorch's learned FC whitening (the '-w' networks)."""
    check_architecture(architecture)
    mean, std = input_normalisation(architecture)
    meta = NetMeta(architecture=architecture, pooling=pooling,
                   outputdim=projection_dim or OUTPUT_CHANNELS[architecture], mean=list(mean), std=list(std),
                   projection_dim=projection_dim, whitening=whitening)
    return build_net(meta, pretrained=pretrained)


def build_net(meta: NetMeta, pretrained: bool = False) -> RetrievalNet:
    """Build the network a meta describes (weights random unless `pretrained`)."""
    check_architecture(meta.architecture)
    if meta.pooling not in POOLINGS:
        raise UserError(f"unknown pooling {meta.pooling!r}; choose one of {', '.join(POOLINGS)}")
    if meta.local_whitening or meta.regional:
        raise UserError("networks with local whitening or regional pooling are not supported")
    channels = OUTPUT_CHANNELS[meta.architecture]
    layers = backbone_layers(meta.architecture, pretrained)
    if meta.projection_dim is not None:
        if meta.projection_dim <= 0:
            raise UserError(f"projection dimension must be > 0, got {meta.projection_dim}")
        layers += projection_layers(channels, meta.projection_dim)
        channels = meta.projection_dim
    meta.outputdim = channels
    whiten = nn.Linear(channels, channels, bias=True) if meta.whitening else None
    return RetrievalNet(nn.Sequential(*layers), POOLINGS[meta.pooling](), meta, whiten)


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Put every BatchNorm in eval mode: running statistics stay fixed, affine weights still train.
    Call after `model.train()`, as the reference does."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model
