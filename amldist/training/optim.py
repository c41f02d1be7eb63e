"""Optimiser, learning-rate schedule and train mode of the student, as cirtorch/aml set them (no Ray).

- Parameter groups from `RetrievalNet.param_groups`: GeM's p at 10x the rate without weight decay; the
  student's projection at `optim.projection_lr_multiplier` x the rate (1 in aml).
- SGD (momentum, weight decay) or Adam, from `config.optim`.
- ExponentialLR with gamma = optim.lr_decay (0.99 per epoch, §4.1), stepped at the *start* of every
  epoch as the reference does, so epoch e (0-based) runs at lr * gamma^(e + 1).
- Train mode with every BatchNorm in eval mode: running statistics stay frozen (the reference trains
  from ImageNet statistics with batches of one image), affine weights still learn. Frozen statistics
  are also what makes a padded batch embed exactly like one image at a time. A network trained from
  scratch has no statistics to freeze: by default its BatchNorm trains (batch statistics, running
  averages updated; `model.freeze_batchnorm`). Frozen statistics of a from-scratch network, when
  asked for, are first estimated on training images (`calibrate_batchnorm`); on the synthetic data
  such networks did not learn at all (docs/TRAINING.md, "BatchNorm").
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from amldist.errors import UserError
from amldist.nets import freeze_batchnorm


def make_optimizer(net: nn.Module, optim) -> torch.optim.Optimizer:
    """`optim` is a config.OptimConfig; `net` a RetrievalNet (the module inside DDP)."""
    groups = net.param_groups(optim.lr, optim.weight_decay, optim.projection_lr_multiplier)
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    if optim.optimizer == "adam":
        return torch.optim.Adam(groups, lr=optim.lr, weight_decay=optim.weight_decay)
    raise UserError(f"optim.optimizer: unknown optimizer {optim.optimizer!r}; choose sgd or adam")


def make_scheduler(optimizer: torch.optim.Optimizer,
                   lr_decay: float) -> torch.optim.lr_scheduler.ExponentialLR:
    return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=lr_decay)


def start_epoch_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler) -> float:
    """Step the schedule at the start of an epoch (the reference's order); returns the epoch's base lr."""
    with warnings.catch_warnings():  # torch warns that step() precedes optimizer.step(): intended here
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    return float(scheduler.optimizer.param_groups[0]["lr"])


def set_train_mode(model: nn.Module, freeze: bool = True) -> nn.Module:
    """model.train(), with BatchNorm statistics frozen unless `freeze` is False (call again after any
    eval-mode pass)."""
    model.train()
    return freeze_batchnorm(model) if freeze else model


def batchnorm_stats(model: nn.Module) -> list[torch.Tensor]:
    """Copies of every BatchNorm running mean and variance (to check that they stay frozen)."""
    stats = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            stats += [module.running_mean.detach().clone(), module.running_var.detach().clone()]
    return stats


def calibrate_batchnorm(net: nn.Module, images: Iterable[torch.Tensor],
                        device: torch.device | str = "cpu") -> int:
    """Estimate every BatchNorm's running statistics from `images` ((3, h, w) each, one per forward, in
    train mode, cumulative average), then freeze them; returns the number of images used.

    The reference freezes ImageNet statistics. A network trained from scratch has none: mean 0 and
    variance 1 make BatchNorm an identity, activations grow layer after layer, and MobileNetV2's ReLU6
    saturates so that no gradient flows (observed: its loss did not move). Statistics of the training
    images, frozen, give it the normalisation a pretrained network starts with."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average over the calibration images
    net.train()
    count = 0
    with torch.no_grad():
        for image in images:
            net(image[None].to(device))
            count += 1
    for module, momentum in zip(norms, momenta):
        module.momentum = momentum
    set_train_mode(net)
    return count
