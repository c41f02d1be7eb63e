"""Typed training configuration: dataclass sections, YAML presets, --set overrides, aml flag names.

    cfg = load_preset("mnv2-vgg16-contrplus-asym")          # finalized: defaults filled and checked
    cfg = load_config("tiny-student-contrplus-asym", ["run.epochs=5"], {"run.num_workers": 2})
    cfg = config_from_args(args)                              # after add_config_arguments(parser)
    cfg = with_overrides(cfg, {"optim.lr": 1e-4})             # e.g. one Ray Tune trial
    config_from_dict(config_to_dict(cfg)) == cfg              # round trip through plain dicts

Bad keys and values raise UserError naming the key. Details in docs/LOSSES.md and presets/README.md.
"""

from amldist.config.cli import (
    AML_FLAGS,
    AML_MODES,
    add_config_arguments,
    apply_overrides,
    config_from_args,
    config_from_dict,
    load_config,
    parse_set,
    raw_config_from_args,
    with_overrides,
)
from amldist.config.presets import (
    TUNE_SECTION,
    list_presets,
    preset_dict,
    preset_path,
    preset_sections,
    presets_dir,
)
from amldist.config.resolve import TEACHER_DIMS, loss_options
from amldist.config.schema import (
    Config,
    DataConfig,
    LossConfig,
    MiningConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
)
from amldist.config.values import config_to_dict, config_to_yaml
from amldist.losses import TupleLoss, build_loss


def load_preset(name_or_path: str) -> Config:
    """The finalized Config of a preset name or a YAML file."""
    return config_from_dict(preset_dict(name_or_path))


def build_loss_from_config(config: Config) -> TupleLoss:
    """The configured loss: `loss(TupleBatch) -> (B,)`; reduce with config.loss.reduction."""
    return build_loss(config.loss.name, **loss_options(config.loss))


__all__ = [
    "AML_FLAGS", "AML_MODES", "TEACHER_DIMS", "TUNE_SECTION", "Config", "DataConfig", "LossConfig",
    "MiningConfig", "ModelConfig", "OptimConfig", "RunConfig", "add_config_arguments", "apply_overrides",
    "build_loss_from_config", "config_from_args", "config_from_dict", "config_to_dict", "config_to_yaml",
    "list_presets", "load_config", "load_preset", "loss_options", "parse_set", "preset_dict", "preset_path",
    "preset_sections", "presets_dir", "raw_config_from_args", "with_overrides",
]
