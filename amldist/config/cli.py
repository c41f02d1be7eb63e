"""Command-line access to the config: --preset, --set KEY=VALUE and budnikm/aml's flag names.

Precedence, lowest first: schema defaults < preset < aml flags < --set (in the order given).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from amldist.config.presets import list_presets, preset_dict
from amldist.config.resolve import finalize
from amldist.config.schema import Config
from amldist.config.values import (
    build_config,
    config_to_dict,
    expand_dotted,
    parse_scalar,
    set_in,
    split_key,
)
from amldist.errors import UserError

_SWITCH = object()


@dataclass(frozen=True)
class AmlFlag:
    """One budnikm/aml training flag and the config key it sets (a switch sets `value`)."""

    flag: str
    key: str | None
    help: str
    value: Any = _SWITCH

    @property
    def dest(self) -> str:
        return "aml_" + self.flag.lstrip("-").replace("-", "_")

    @property
    def is_switch(self) -> bool:
        return self.value is not _SWITCH


# The one table mapping aml's flags to config keys; applied in this order.
AML_FLAGS = (
    AmlFlag("--arch", "model.arch", "student architecture"),
    AmlFlag("--pool", "model.pooling", "pooling (gem, mac, spoc)"),
    AmlFlag("--not-pretrained", "model.pretrained", "no ImageNet weights", value=False),
    AmlFlag("--teacher", "model.teacher", "vgg16, resnet101 or a network file"),
    AmlFlag("--loss", "loss.name", "loss name (aml's contrastive, triplet, multi, rkd, or ours)"),
    AmlFlag("--loss-margin", "loss.margin", "loss margin"),
    AmlFlag("--mode", None, "aml training mode: std, ts, ts_self, ts_rand, reg, reg_only_pos, rand"),
    AmlFlag("--sym", "loss.asym", "symmetric similarity (2) at training", value=False),
    AmlFlag("--image-size", "data.image_size", "longest side of training images"),
    AmlFlag("--workers", "data.workers", "data-loading processes"),
    AmlFlag("--neg-num", "mining.num_negatives", "negatives per tuple"),
    AmlFlag("--query-size", "mining.queries_per_epoch", "tuples per epoch"),
    AmlFlag("--pool-size", "mining.pool_size", "images searched for hard negatives per epoch"),
    AmlFlag("--epochs", "run.epochs", "epochs"),
    AmlFlag("--batch-size", "run.batch_size", "tuples per batch"),
    AmlFlag("--update-every", "optim.update_every", "optimiser step every N batches"),
    AmlFlag("--optimizer", "optim.optimizer", "sgd or adam"),
    AmlFlag("--lr", "optim.lr", "initial learning rate"),
    AmlFlag("--momentum", "optim.momentum", "SGD momentum"),
    AmlFlag("--weight-decay", "optim.weight_decay", "weight decay"),
    AmlFlag("--val-freq", "run.val_freq", "validate every N epochs"),
    AmlFlag("--save-freq", "run.save_freq", "checkpoint every N epochs"),
)

# aml's --mode values as config settings. A mode that changes the loss also clears the options
# the previous loss may have set.
_LOSS_OPTIONS_CLEARED = {"loss.margin": None, "loss.use_self": None, "loss.use_positives": None,
                         "loss.use_negatives": None}
AML_MODES: dict[str, dict[str, Any]] = {
    "std": {"loss.asym": False, "mining.kind": "hard"},
    "ts": {"loss.asym": True, "mining.kind": "hard"},
    "ts_self": {"loss.asym": True, "mining.kind": "hard", "loss.use_self": True},
    "ts_rand": {"loss.asym": True, "mining.kind": "random"},
    "reg": {"loss.name": "regression", "loss.asym": True, "mining.kind": "none", **_LOSS_OPTIONS_CLEARED},
    "reg_only_pos": {"loss.name": "regression", "loss.asym": True, "mining.kind": "none",
                     **_LOSS_OPTIONS_CLEARED},
    "rand": {"loss.asym": False, "mining.kind": "random"},
}
UNSUPPORTED_MODES = {
    "rand_tpl": "random triplets ranked by the teacher are not part of the paper",
    "rand_tpl_a": "random triplets ranked by the teacher are not part of the paper",
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset, --set and aml's flag names, for `amldist train` and friends."""
    group = parser.add_argument_group("configuration (precedence: preset < aml flags < --set)")
    group.add_argument("--preset", metavar="NAME|FILE",
                       help=f"a preset name ({len(list_presets())} in presets/) or a YAML file")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one field, e.g. --set optim.lr=1e-4 (repeatable)")
    aml = parser.add_argument_group("budnikm/aml flag names")
    for flag in AML_FLAGS:
        if flag.is_switch:
            aml.add_argument(flag.flag, dest=flag.dest, action="store_true", help=f"{flag.help} ({flag.key})")
        else:
            target = flag.key or "several keys"
            aml.add_argument(flag.flag, dest=flag.dest, default=None, metavar="VALUE",
                             help=f"{flag.help} ({target})")


def config_from_args(args: argparse.Namespace, extra: Mapping[str, Any] | None = None) -> Config:
    """The finalized Config a parsed command line describes; `extra` (typed dotted keys, e.g. a command's
    own flags such as {"run.num_workers": 4}) applies last."""
    return config_from_dict(raw_config_from_args(args, extra))


def raw_config_from_args(args: argparse.Namespace, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The unresolved nested dict behind `config_from_args` (a search varies keys of it before resolving)."""
    base = preset_dict(args.preset) if getattr(args, "preset", None) else {}
    overrides = aml_overrides(args) + [parse_set(text) for text in getattr(args, "overrides", []) or []]
    return apply_overrides(base, [*overrides, *(extra or {}).items()])


def load_config(preset: str, sets: Iterable[str] = (), extra: Mapping[str, Any] | None = None) -> Config:
    """The finalized Config of a preset name or YAML file with `--set KEY=VALUE` texts and typed dotted-key
    overrides applied, in that order: what `amldist train --config PRESET --set ...` builds."""
    overrides = [parse_set(text) for text in sets] + list((extra or {}).items())
    return config_from_dict(apply_overrides(preset_dict(preset), overrides))


def aml_overrides(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """(key, value) pairs for the aml flags present on the command line, in table order."""
    pairs: list[tuple[str, Any]] = []
    for flag in AML_FLAGS:
        given = getattr(args, flag.dest, None)
        if given is None or given is False:
            continue
        if flag.is_switch:
            pairs.append((flag.key, flag.value))
        elif flag.key is None:
            pairs.extend(mode_overrides(given))
        else:
            pairs.append((flag.key, parse_scalar(given)))
    return pairs


def mode_overrides(mode: str) -> list[tuple[str, Any]]:
    if mode in UNSUPPORTED_MODES:
        raise UserError(f"--mode: aml's {mode!r} is not supported: {UNSUPPORTED_MODES[mode]}")
    if mode not in AML_MODES:
        raise UserError(f"--mode: unknown aml mode {mode!r}; choose from {', '.join(AML_MODES)}")
    return list(AML_MODES[mode].items())


def parse_set(text: str) -> tuple[str, Any]:
    """'optim.lr=1e-4' -> ('optim.lr', '1e-4' read as a YAML scalar); the key is checked."""
    key, sep, value = str(text).partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set: expected KEY=VALUE, got {text!r}")
    key = key.strip()
    split_key(key)
    if not value.strip():  # `--set run.epochs=` would read as null, i.e. the default: a typo, not a wish
        raise UserError(f"--set {key}=: no value; give one, or {key}=null for the default")
    return key, parse_scalar(value)


def apply_overrides(base: Mapping[str, Any], overrides: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """A copy of a raw nested dict with dotted-key overrides applied (keys checked, not values)."""
    merged = expand_dotted(base)
    for key, value in overrides:
        set_in(merged, key, value)
    return merged


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """The finalized Config of a nested dict (dotted top-level keys allowed, as Ray Tune may pass)."""
    return finalize(build_config(data))


def with_overrides(config: Config | Mapping[str, Any], overrides: Mapping[str, Any]) -> Config:
    """A finalized Config with typed dotted-key overrides, e.g. {"optim.lr": 3e-4} from a Tune trial.

    A finalized config has every option of its loss filled in; to vary `loss.name` itself, start
    from the unresolved `preset_dict(...)` so the previous loss's options do not carry over.
    """
    base = config_to_dict(config) if isinstance(config, Config) else config
    return config_from_dict(apply_overrides(base, overrides.items()))
