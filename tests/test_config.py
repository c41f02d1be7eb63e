"""Config: presets load and validate, --set and aml flags map, bad input names its key."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from amldist import flops
from amldist.config import (
    AML_FLAGS,
    AML_MODES,
    TEACHER_DIMS,
    Config,
    add_config_arguments,
    apply_overrides,
    build_loss_from_config,
    config_from_args,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    list_presets,
    load_preset,
    preset_dict,
    presets_dir,
    with_overrides,
)
from amldist.config.resolve import DEFAULT_MINING, default_lr
from amldist.errors import UserError
from amldist.losses import LABELLED, LOSSES, TupleLoss
from amldist.nets import OUTPUT_CHANNELS

PRESETS = list_presets()
TABLE3_LOSSES = {"contrplus": "contrastive_plus", "contr": "contrastive", "triplet": "triplet",
                 "ms": "multi_similarity", "reg": "regression", "rkd": "rkd", "dr": "darkrank"}


def parse(argv: list[str]) -> Config:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


# ---------------------------------------------------------------- presets

def test_there_is_a_preset_for_every_row_of_table3_and_table2():
    table3 = {f"{s}-{t}-{loss}" + ("" if loss in ("rkd", "dr") else "-asym")
              for s in ("mnv2", "effb3") for t in ("vgg16", "r101") for loss in TABLE3_LOSSES}
    baselines = {f"{s}-{d}-contr-sym" for s in ("mnv2", "effb3") for d in (512, 2048)}
    teachers = {"vgg16-contr-sym", "r101-contr-sym"}
    table2 = {"mnv2-vgg16-contr-pos-asym", "mnv2-vgg16-contr-selfpos-asym"}
    tiny = {"tiny-teacher-contr-sym", "tiny-student-contrplus-asym", "tiny-student-reg-asym",
            "tiny-student-contr-sym"}
    lite = {name.replace("tiny-", "lite-") for name in tiny}
    assert set(PRESETS) == table3 | baselines | teachers | table2 | tiny | lite


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_validates_and_round_trips(name):
    config = load_preset(name)
    assert config.run.name == name
    assert config.description
    assert config_from_dict(config_to_dict(config)) == config
    assert config_from_dict(yaml.safe_load(config_to_yaml(config))) == config
    assert isinstance(build_loss_from_config(config), TupleLoss)


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith(("tiny-", "lite-"))])
def test_paper_presets_carry_the_section_4_1_settings(name):
    config = load_preset(name)
    raw = preset_dict(name)
    assert (config.optim.optimizer, config.optim.momentum, config.optim.weight_decay) == ("sgd", 0.9, 1e-6)
    assert config.optim.lr_decay == 0.99 and config.data.image_size == 362
    assert (config.mining.queries_per_epoch, config.mining.pool_size) == (2000, 22000)
    assert (config.mining.num_positives, config.mining.num_negatives, config.run.batch_size) == (1, 5, 10)
    assert config.run.epochs == (300 if config.loss.asym else 100)
    # The preset states its learning rate; it must be the registry's (= the paper's) value.
    assert "lr" in raw["optim"]
    assert config.optim.lr == default_lr(config.loss.name, asym=config.loss.asym,
                                         teacher=config.model.teacher, student=config.model.arch)
    spec = LOSSES[config.loss.name]
    if config.model.teacher is not None:
        assert config.model.projection_dim == TEACHER_DIMS[config.model.teacher]
    if spec.family == LABELLED:  # hard negatives; Table 2's rows without negatives mine nothing
        assert config.mining.kind == ("none" if config.loss.use_negatives is False else "hard")
    else:
        assert config.mining.kind == DEFAULT_MINING[spec.family]


@pytest.mark.parametrize("name",
                         [n for n in PRESETS if n.count("-") >= 2 and n.split("-")[1] in ("vgg16", "r101")
                          and not n.startswith(("vgg16-", "r101-"))])
def test_preset_names_say_what_the_preset_does(name):
    student, teacher, loss = name.split("-")[:3]
    config = load_preset(name)
    assert config.model.arch == {"mnv2": "mobilenet_v2", "effb3": "efficientnet_b3"}[student]
    assert config.model.teacher == {"vgg16": "vgg16", "r101": "resnet101"}[teacher]
    assert config.loss.name == TABLE3_LOSSES[loss]
    assert config.loss.asym == name.endswith("-asym")


def test_table2_ablation_presets_switch_the_right_terms():
    pos = load_preset("mnv2-vgg16-contr-pos-asym").loss
    assert (pos.use_self, pos.use_positives, pos.use_negatives) == (False, True, False)
    self_pos = load_preset("mnv2-vgg16-contr-selfpos-asym").loss
    assert (self_pos.use_self, self_pos.use_positives, self_pos.use_negatives) == (True, True, False)
    plus = load_preset("mnv2-vgg16-contrplus-asym").loss
    assert (plus.use_self, plus.use_positives, plus.use_negatives) == (True, True, True)


def test_tiny_presets_are_small_and_cpu_friendly():
    teacher = load_preset("tiny-teacher-contr-sym")
    assert teacher.model.teacher is None and not teacher.loss.asym and not teacher.model.pretrained
    for name in ("tiny-student-contrplus-asym", "tiny-student-reg-asym", "tiny-student-contr-sym"):
        config = load_preset(name)
        assert config.model.arch == "mini_cnn" and not config.model.pretrained
        assert config.model.freeze_batchnorm is False  # from scratch: BatchNorm trains
        assert 128 <= config.data.image_size <= 160 and config.run.epochs <= 30
        assert config.mining.pool_size <= 1000 and config.mining.queries_per_epoch <= 200
        # The students learn from the tiny teacher, projected to its dimension.
        if config.loss.asym:
            assert config.model.teacher.endswith(".pth.tar")
            assert config.model.projection_dim == OUTPUT_CHANNELS[teacher.model.arch]
            assert Path(config.model.teacher).parent.name == teacher.run.name


def test_lite_presets_start_from_imagenet_and_stay_cpu_sized():
    teacher = load_preset("lite-teacher-contr-sym")
    assert teacher.model.teacher is None and not teacher.loss.asym and teacher.model.pretrained
    for name in ("lite-student-contrplus-asym", "lite-student-reg-asym", "lite-student-contr-sym"):
        config = load_preset(name)
        assert config.model.pretrained and config.model.freeze_batchnorm  # the reference: frozen ImageNet BN
        assert config.data.image_size == teacher.data.image_size and config.run.epochs <= 20
        assert config.mining.pool_size <= 1000 and config.mining.queries_per_epoch <= 200
        if config.loss.asym:  # the teacher's run folder, and its dimension
            assert Path(config.model.teacher).parent.name == teacher.run.name
            student = config.model.projection_dim or OUTPUT_CHANNELS[config.model.arch]
            assert student == (teacher.model.projection_dim or OUTPUT_CHANNELS[teacher.model.arch])


@pytest.mark.parametrize("prefix", ["tiny", "lite"])
def test_the_demo_students_are_smaller_than_their_teacher(prefix):
    # The demo transfers from a large network to a small one, as the paper does (at a smaller ratio).
    teacher = load_preset(f"{prefix}-teacher-contr-sym").model
    big = flops.complexity(teacher.arch, teacher.projection_dim, image_size=128)
    for name in ("student-contrplus-asym", "student-reg-asym", "student-contr-sym"):
        student = load_preset(f"{prefix}-{name}").model
        small = flops.complexity(student.arch, student.projection_dim, image_size=128)
        assert small.flops < big.flops and small.params < big.params
        if prefix == "tiny":
            assert small.flops < big.flops / 2 and small.params < big.params / 2


def test_batchnorm_is_frozen_for_pretrained_networks_unless_set():
    assert load_preset("mnv2-vgg16-contrplus-asym").model.freeze_batchnorm is True
    assert config_from_dict({"model": {"pretrained": False}}).model.freeze_batchnorm is False
    assert config_from_dict({"model": {"pretrained": False, "freeze_batchnorm": True}}).model.freeze_batchnorm


# ---------------------------------------------------------------- registry defaults

def test_unset_loss_values_come_from_the_registry():
    config = config_from_dict({"model": {"teacher": "vgg16"}, "loss": {"name": "contr+"}})
    assert config.loss.name == "contrastive_plus" and config.loss.asym
    assert (config.loss.margin, config.optim.lr, config.run.epochs) == (0.7, 1e-3, 300)
    assert config.model.projection_dim == 512 and config.mining.kind == "hard"
    sym = config_from_dict({})
    assert (sym.loss.asym, sym.optim.lr, sym.run.epochs, sym.model.teacher) == (False, 1e-5, 100, None)
    dr = config_from_dict({"model": {"arch": "efficientnet_b3", "teacher": "resnet101"},
                           "loss": {"name": "darkrank"}})
    assert (dr.optim.lr, dr.mining.kind, dr.loss.asym, dr.model.projection_dim) == \
        (1e-7, "random", False, 2048)
    ms = config_from_dict({"loss": {"name": "ms", "form": "code"}})
    assert (ms.loss.form, ms.loss.margin, ms.loss.alpha, ms.loss.beta, ms.optim.lr) == \
        ("aml", 0.5, 2.0, 40.0, 1e-8)
    reg = config_from_dict({"model": {"teacher": "resnet101", "arch": "resnet50"}, "loss": {"name": "reg"}})
    assert reg.model.projection_dim is None  # resnet50 already has d = 2048
    assert (reg.mining.kind, reg.optim.lr, reg.loss.margin) == ("none", 1e-3, None)


def test_built_loss_follows_the_config():
    config = parse(["--preset", "mnv2-vgg16-ms-asym", "--set", "loss.form=aml", "--set", "loss.beta=10"])
    loss = build_loss_from_config(config)
    assert loss.name == "multi_similarity"
    assert (loss.options["margin"], loss.options["alpha"], loss.options["beta"]) == (0.6, 1.0, 10.0)


# ---------------------------------------------------------------- --set and aml flags

def test_set_overrides_are_parsed_as_yaml_and_type_checked():
    config = parse(["--preset", "mnv2-vgg16-contr-asym", "--set", "optim.lr=1e-4", "--set", "run.epochs=7",
                    "--set", "model.pretrained=false", "--set", "data.root=/tmp/x", "--set", "run.name=2024",
                    "--set", "mining.pool_size=1e3", "--set", "loss.margin=0.5"])
    assert config.optim.lr == 1e-4 and isinstance(config.optim.lr, float)
    assert config.run.epochs == 7 and config.model.pretrained is False
    assert config.data.root == "/tmp/x" and config.run.name == "2024"
    assert config.mining.pool_size == 1000 and isinstance(config.mining.pool_size, int)
    assert config.loss.margin == 0.5
    later_wins = parse(["--set", "run.seed=1", "--set", "run.seed=2"])
    assert later_wins.run.seed == 2
    cleared = parse(["--preset", "tiny-student-contrplus-asym", "--set", "optim.lr=null"])
    assert cleared.optim.lr == 1e-3  # null = back to the registry default for Contr+


# One example value per aml flag, and the config field and value it must produce.
AML_EXAMPLES = {
    "--arch": ("efficientnet_b3", "model.arch", "efficientnet_b3"),
    "--pool": ("mac", "model.pooling", "mac"),
    "--teacher": ("runs/t/model_best.pth.tar", "model.teacher", "runs/t/model_best.pth.tar"),
    "--loss": ("multi", "loss.name", "multi_similarity"),
    "--loss-margin": ("0.5", "loss.margin", 0.5),
    "--image-size": ("512", "data.image_size", 512),
    "--workers": ("3", "data.workers", 3),
    "--neg-num": ("7", "mining.num_negatives", 7),
    "--query-size": ("100", "mining.queries_per_epoch", 100),
    "--pool-size": ("20000", "mining.pool_size", 20000),
    "--epochs": ("12", "run.epochs", 12),
    "--batch-size": ("5", "run.batch_size", 5),
    "--update-every": ("2", "optim.update_every", 2),
    "--optimizer": ("adam", "optim.optimizer", "adam"),
    "--lr": ("1e-6", "optim.lr", 1e-6),
    "--momentum": ("0.5", "optim.momentum", 0.5),
    "--weight-decay": ("1e-4", "optim.weight_decay", 1e-4),
    "--val-freq": ("2", "run.val_freq", 2),
    "--save-freq": ("5", "run.save_freq", 5),
}


def field(config: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


@pytest.mark.parametrize("flag", [f.flag for f in AML_FLAGS if not f.is_switch and f.key])
def test_each_aml_flag_sets_its_key(flag):
    value, key, expected = AML_EXAMPLES[flag]
    base = ["--teacher", "resnet101"] if flag == "--arch" else []
    config = parse(["--preset", "mnv2-r101-contr-asym", *base, flag, value])
    assert field(config, key) == expected
    assert field(load_preset("mnv2-r101-contr-asym"), key) != expected  # the flag changed something


def test_aml_switches_and_set_after_flags():
    assert parse(["--sym"]).loss.asym is False
    assert parse(["--preset", "mnv2-vgg16-contr-asym", "--sym", "--set", "run.epochs=3"]).loss.asym is False
    assert parse(["--not-pretrained"]).model.pretrained is False
    assert parse(["--lr", "1e-3", "--set", "optim.lr=2e-3"]).optim.lr == 2e-3  # --set is applied last


@pytest.mark.parametrize("mode", list(AML_MODES))
def test_aml_modes_map_to_config(mode):
    config = parse(["--teacher", "vgg16", "--mode", mode])
    expected = AML_MODES[mode]
    assert config.loss.asym == expected["loss.asym"]
    assert config.mining.kind == expected["mining.kind"]
    if mode == "ts_self":
        assert config.loss.use_self is True  # contrastive + SELF = Contr+
    if mode.startswith("reg"):
        assert config.loss.name == "regression"
    # A mode that switches to regression drops the contrastive margin the preset set.
    assert parse(["--preset", "mnv2-vgg16-contr-asym", "--mode", "reg"]).loss.margin is None


def test_with_overrides_and_dotted_dicts_for_ray_tune():
    base = load_preset("mnv2-vgg16-reg-asym")
    trial = with_overrides(base, {"optim.lr": 3e-4, "run.seed": 4})
    assert (trial.optim.lr, trial.run.seed, trial.loss.name) == (3e-4, 4, "regression")
    flat = config_from_dict({**config_to_dict(base), "optim.lr": 5e-4})
    assert flat.optim.lr == 5e-4
    raw = apply_overrides(preset_dict("mnv2-vgg16-contr-asym"),
                          [("loss.name", "triplet"), ("loss.margin", None), ("optim.lr", None)])
    switched = config_from_dict(raw)
    assert (switched.loss.name, switched.loss.margin, switched.optim.lr) == ("triplet", 0.1, 1e-8)


def test_yaml_scientific_notation_without_a_dot_is_a_number(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model: {teacher: vgg16}\noptim:\n  lr: 1e-5\n  weight_decay: 1e-4\n")
    config = parse(["--preset", str(path)])
    assert (config.optim.lr, config.optim.weight_decay) == (1e-5, 1e-4)
    assert config.run.name == "mine"


# ---------------------------------------------------------------- errors name the key

@pytest.mark.parametrize("argv, key", [
    (["--set", "optim.lrr=1"], "optim.lrr"),
    (["--set", "training.lr=1"], "training.lr"),
    (["--set", "lr=1"], "lr"),
    (["--set", "optim.lr"], "--set"),
    (["--set", "optim.lr=fast"], "optim.lr"),
    (["--set", "optim.lr=-1"], "optim.lr"),
    (["--set", "optim.lr=.inf"], "optim.lr"),
    (["--set", "run.epochs=2.5"], "run.epochs"),
    (["--set", "run.epochs=0"], "run.epochs"),
    (["--set", "run.batch_size=-3"], "run.batch_size"),
    (["--set", "model.pretrained=maybe"], "model.pretrained"),
    (["--set", "model.arch=resnet9000"], "model.arch"),
    (["--set", "model.pooling=rmac"], "model.pooling"),
    (["--teacher", "alexnet"], "model.teacher"),
    (["--loss", "cross_entropy"], "loss.name"),
    (["--loss", "arcface"], "loss.name"),
    (["--neg-num", "-1"], "mining.num_negatives"),
    (["--pool-size", "-5"], "mining.pool_size"),
    (["--query-size", "0"], "mining.queries_per_epoch"),
    (["--image-size", "0"], "data.image_size"),
    (["--loss-margin", "1.5"], "loss.margin"),
    (["--loss", "triplet", "--loss-margin", "-0.2"], "loss.margin"),
    (["--momentum", "1.0"], "optim.momentum"),
    (["--optimizer", "rmsprop"], "optim.optimizer"),
    (["--set", "loss.alpha=2"], "loss.alpha"),
    (["--set", "loss.form=aml"], "loss.form"),
    (["--set", "loss.reduction=max"], "loss.reduction"),
    (["--set", "mining.kind=semi-hard"], "mining.kind"),
    (["--set", "mining.kind=none"], "mining.kind"),
    (["--set", "mining.backend=tpu"], "mining.backend"),
    (["--set", "optim.lr_decay=1.5"], "optim.lr_decay"),
    (["--mode", "rand_tpl"], "--mode"),
    (["--mode", "warp"], "--mode"),
    (["--sym", "--loss", "reg", "--teacher", "vgg16"], "loss.asym"),
    (["--teacher", "vgg16", "--loss", "rkd", "--set", "loss.asym=true"], "loss.asym"),
    (["--set", "loss.asym=true"], "model.teacher"),
    (["--loss", "regression"], "model.teacher"),
    (["--set", "loss.use_self=true"], "model.teacher"),
    (["--teacher", "vgg16", "--set", "model.projection_dim=2048"], "model.projection_dim"),
    (["--set", "loss.use_positives=false", "--set", "loss.use_negatives=false"], "loss.use_self"),
    (["--preset", "no-such-preset"], "--preset"),
])
def test_bad_keys_and_values_are_user_errors_naming_the_key(argv, key):
    with pytest.raises(UserError) as err:
        parse(argv)
    message = str(err.value)
    assert message.startswith(f"{key}:") or f"unknown config key '{key}'" in message, message
    assert "\n" not in message


def test_bad_dicts_and_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown config section 'optimizer'"):
        config_from_dict({"optimizer": {"lr": 1}})
    with pytest.raises(UserError, match="optim: expected a mapping"):
        config_from_dict({"optim": 3})
    with pytest.raises(UserError, match="model.teacher: a value is required|model.arch: a value is required"):
        config_from_dict({"model": {"arch": None}})
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        parse(["--preset", str(broken)])
    with pytest.raises(UserError, match="--preset: no such file"):
        parse(["--preset", str(tmp_path / "missing.yaml")])


def test_teacher_may_be_a_network_file():
    config = parse(["--teacher", "runs/teacher/model_best.pth.tar", "--set", "model.projection_dim=512"])
    assert config.model.teacher == "runs/teacher/model_best.pth.tar" and config.loss.asym


def test_choices_match_the_modules_they_name():
    from amldist.search import BACKENDS

    for backend in BACKENDS:  # the config accepts exactly the search module's back-ends
        assert config_from_dict({"mining": {"backend": backend}}).mining.backend == backend
    with pytest.raises(UserError, match="mining.backend"):
        config_from_dict({"mining": {"backend": "torch-cpu"}})
    assert set(TEACHER_DIMS) == {"vgg16", "resnet101"}
    assert all(OUTPUT_CHANNELS[name] == dim for name, dim in TEACHER_DIMS.items())


def _readme_preset_rows() -> dict[str, list[str]]:
    """presets/README.md table rows: preset name -> its cells after the name."""
    rows = {}
    for line in (presets_dir() / "README.md").read_text().splitlines():
        match = re.match(r"^\| `([^`]+)` \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split("|")]
    return rows


def test_presets_readme_lists_every_preset_as_it_is():
    rows = _readme_preset_rows()
    assert sorted(rows) == list_presets()
    for name, (arch, _teacher, dim, loss, mining, asym, lr, margin, epochs) in rows.items():
        config = load_preset(name)
        assert (arch, loss.split()[0], mining) == (config.model.arch, config.loss.name,
                                                   config.mining.kind), name
        assert (asym == "✓", int(epochs)) == (config.loss.asym, config.run.epochs), name
        assert lr.split() == [config.optim.optimizer, f"{config.optim.lr:g}"], name
        assert margin == ("–" if config.loss.margin is None else f"{config.loss.margin:g}"), name
        assert int(dim) == (config.model.projection_dim or OUTPUT_CHANNELS[arch]), name


def test_typos_in_values_and_sections_are_refused_not_defaulted(tmp_path):
    with pytest.raises(UserError, match=r"--set run.epochs=: no value; give one, or run.epochs=null"):
        parse(["--set", "run.epochs="])  # would read as null: 300 epochs instead of an error
    for bad in ("0", "''", "[]", "false"):  # a section that is not a mapping is a mistake, not an empty one
        path = tmp_path / "bad.yaml"
        path.write_text(f"mining: {bad}\n")
        with pytest.raises(UserError, match="mining: expected a mapping of fields"):
            parse(["--preset", str(path)])
    path.write_text("mining:\nrun:\n  epochs: 3\n")  # an empty section (YAML null) is fine
    assert parse(["--preset", str(path)]).run.epochs == 3
    path.write_bytes(b"run:\n  name: \xff\xfe\n")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        parse(["--preset", str(path)])
    for name in ("..", "../escape", "a/b", "."):  # the run folder is <storage>/<name>
        with pytest.raises(UserError, match="run.name: must be a plain folder name"):
            parse(["--set", f"run.name={name}"])
