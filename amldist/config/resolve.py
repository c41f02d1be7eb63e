"""Fill what a preset left unset, then check every value's range.

Defaults come from the loss registry (the loss's options) and from the training policy of §4.1 kept
here: the default mining of each loss family and the initial learning rate of each loss and setting.

`finalize(config)` is idempotent: a finalized config finalizes to itself, so configs can be
stored (checkpoints, Ray Tune) and read back unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import PurePath

from amldist.config.schema import Config, LossConfig
from amldist.errors import UserError
from amldist.losses import (
    LABELLED,
    LOSSES,
    MINING_KINDS,
    REDUCTIONS,
    REGRESSION,
    RELATIONAL,
    allowed_mining,
    loss_spec,
    needs_teacher,
    resolve_loss_name,
    resolve_loss_options,
)
from amldist.nets import ARCHITECTURES, OUTPUT_CHANNELS, POOLINGS, TEACHERS
from amldist.search import BACKENDS

# The public teachers (retrievalSfM120k-<name>-gem) and their descriptor dimension d.
TEACHER_DIMS = {name: OUTPUT_CHANNELS[name] for name in TEACHERS}
OPTIMIZERS = ("sgd", "adam")
LOSS_OPTION_FIELDS = ("form", "margin", "use_self", "use_positives", "use_negatives", "alpha", "beta",
                      "list_length", "angle_weight", "distance_weight")
TEACHER_FILE_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt")
SYM_EPOCHS, ASYM_EPOCHS = 100, 300

# §4.1: labelled losses mine hard negatives, the unlabelled relational ones draw random examples,
# regression needs no negatives.
DEFAULT_MINING = {LABELLED: "hard", REGRESSION: "none", RELATIONAL: "random"}
# Initial learning rates of §4.1 (SGD). Contrastive depends on the similarity, DarkRank on the
# teacher/student pair; a pair the paper did not train falls back to its VGG16-teacher value.
_LEARNING_RATES = {"triplet": 1e-8, "multi_similarity": 1e-8, "regression": 1e-3, "rkd": 1e-2}
_CONTRASTIVE_LR = {False: 1e-5, True: 1e-3}
_DARKRANK_LR = {("resnet101", "mobilenet_v2"): 1e-5, ("resnet101", "efficientnet_b3"): 1e-7}
_DARKRANK_DEFAULT_LR = 1e-6


def default_lr(name: str, *, asym: bool, teacher: str | None = None, student: str | None = None) -> float:
    """The paper's initial learning rate for a loss in a setting (§4.1)."""
    spec = loss_spec(name)
    if spec.name in ("contrastive", "contrastive_plus"):
        return _CONTRASTIVE_LR[bool(asym)]
    if spec.name == "darkrank":
        return _DARKRANK_LR.get((teacher, student), _DARKRANK_DEFAULT_LR)
    return _LEARNING_RATES[spec.name]


def finalize(config: Config) -> Config:
    config = resolve(config)
    validate(config)
    return config


def resolve(config: Config) -> Config:
    """Config with loss name canonical and every None default filled in."""
    model, loss = config.model, config.loss
    check_teacher(model.teacher)
    name = resolve_loss_name(loss.name)
    options = resolve_loss_options(name, loss_options(loss))
    asym = loss.asym if loss.asym is not None else default_asym(name, model.teacher)
    resolved_loss = dataclasses.replace(
        loss, name=name, asym=asym,
        **{key: options.get(key) for key in LOSS_OPTION_FIELDS})
    lr = config.optim.lr
    if lr is None:
        lr = default_lr(name, asym=asym, teacher=model.teacher, student=model.arch)
    return dataclasses.replace(
        config,
        model=dataclasses.replace(model, projection_dim=default_projection(model.arch, model.projection_dim,
                                                                          model.teacher),
                                  freeze_batchnorm=_unset_to(model.freeze_batchnorm, model.pretrained)),
        loss=resolved_loss,
        mining=dataclasses.replace(config.mining,
                                   kind=_unset_to(config.mining.kind, DEFAULT_MINING[LOSSES[name].family])),
        optim=dataclasses.replace(config.optim, lr=lr),
        run=dataclasses.replace(config.run, name=_unset_to(config.run.name, "run"),
                                epochs=_unset_to(config.run.epochs, ASYM_EPOCHS if asym else SYM_EPOCHS)))


def _unset_to(value, default):
    return default if value is None else value


def loss_options(loss: LossConfig) -> dict:
    """The loss options a LossConfig sets (None = default), as `build_loss` keywords."""
    return {key: getattr(loss, key) for key in LOSS_OPTION_FIELDS if getattr(loss, key) is not None}


def default_asym(name: str, teacher: str | None) -> bool:
    similarity = LOSSES[name].similarity
    if similarity == "either":
        return teacher is not None  # a labelled loss with a teacher is the paper's asymmetric training
    return similarity == "asym"


def default_projection(arch: str, projection_dim: int | None, teacher: str | None) -> int | None:
    if projection_dim is not None or teacher not in TEACHER_DIMS or arch not in OUTPUT_CHANNELS:
        return projection_dim
    teacher_dim = TEACHER_DIMS[teacher]
    return teacher_dim if OUTPUT_CHANNELS[arch] != teacher_dim else None


def check_teacher(teacher: str | None) -> None:
    if teacher is None or teacher in TEACHER_DIMS:
        return
    path = PurePath(teacher)
    if path.suffix in TEACHER_FILE_SUFFIXES or len(path.parts) > 1:
        return
    raise UserError(f"model.teacher: unknown teacher {teacher!r}; use {', '.join(TEACHER_DIMS)} "
                    f"or the path of a network file ({', '.join(TEACHER_FILE_SUFFIXES)})")


def validate(config: Config) -> None:
    """Range and consistency checks on a resolved config; UserError naming the key."""
    _validate_data(config)
    _validate_model(config)
    _validate_loss(config)
    _validate_mining(config)
    _validate_optim(config)
    _validate_run(config)


def _at_least(key: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise UserError(f"{key}: must be >= {minimum}, got {value}")


def _one_of(key: str, value: str, choices) -> None:
    if value not in choices:
        raise UserError(f"{key}: unknown value {value!r}; choose from {', '.join(choices)}")


def _validate_data(config: Config) -> None:
    _at_least("data.image_size", config.data.image_size, 16)
    _at_least("data.workers", config.data.workers, 0)
    for key in ("root", "dataset"):
        if not getattr(config.data, key):
            raise UserError(f"data.{key}: must not be empty")


def _validate_model(config: Config) -> None:
    model, loss = config.model, config.loss
    _one_of("model.arch", model.arch, ARCHITECTURES)
    _one_of("model.pooling", model.pooling, tuple(POOLINGS))
    if model.projection_dim is not None:
        _at_least("model.projection_dim", model.projection_dim, 1)
    if model.teacher is None and (loss.asym or needs_teacher(loss.name, {"use_self": loss.use_self})):
        why = "asymmetric similarity (3)" if loss.asym else f"the {loss.name} loss"
        raise UserError(f"model.teacher: {why} needs a teacher (vgg16, resnet101 or a network file)")
    compares_spaces = loss.asym or loss.use_self or loss.name == "regression"
    if compares_spaces and model.teacher in TEACHER_DIMS:
        student_dim = model.projection_dim or OUTPUT_CHANNELS[model.arch]
        teacher_dim = TEACHER_DIMS[model.teacher]
        if student_dim != teacher_dim:
            raise UserError(f"model.projection_dim: the student's d={student_dim} must equal the "
                            f"{model.teacher} teacher's d={teacher_dim} to compare the two spaces")


def _validate_loss(config: Config) -> None:
    loss = config.loss
    similarity = LOSSES[loss.name].similarity
    if similarity == "asym" and not loss.asym:
        raise UserError(f"loss.asym: the {loss.name} loss is asymmetric by definition; set it to true")
    if similarity == "none" and loss.asym:
        raise UserError(f"loss.asym: the {loss.name} loss compares the two spaces itself; set it to false")
    _one_of("loss.reduction", loss.reduction, REDUCTIONS)


def _validate_mining(config: Config) -> None:
    mining, loss = config.mining, config.loss
    _one_of("mining.kind", mining.kind, MINING_KINDS)
    allowed = allowed_mining(loss.name, {"use_negatives": loss.use_negatives})
    if mining.kind not in allowed:
        raise UserError(f"mining.kind: {mining.kind!r} does not fit the {loss.name} loss; "
                        f"use {' or '.join(allowed)}")
    _one_of("mining.backend", mining.backend, BACKENDS)
    for key in ("num_positives", "num_negatives"):
        _at_least(f"mining.{key}", getattr(mining, key), 0)
    _at_least("mining.queries_per_epoch", mining.queries_per_epoch, 1)
    _at_least("mining.pool_size", mining.pool_size, 1)
    if LOSSES[loss.name].family == LABELLED:
        if loss.use_positives is not False:
            _at_least("mining.num_positives", mining.num_positives, 1)
        if loss.use_negatives is not False:
            _at_least("mining.num_negatives", mining.num_negatives, 1)
    elif LOSSES[loss.name].family == RELATIONAL and mining.num_positives + mining.num_negatives < 1:
        raise UserError(f"mining.num_negatives: the {loss.name} loss needs examples besides the anchor "
                        "(num_positives + num_negatives >= 1)")
    if mining.kind == "hard" and mining.pool_size < mining.num_negatives:
        raise UserError(f"mining.pool_size: {mining.pool_size} is smaller than mining.num_negatives "
                        f"({mining.num_negatives})")


def _validate_optim(config: Config) -> None:
    optim = config.optim
    _one_of("optim.optimizer", optim.optimizer, OPTIMIZERS)
    if optim.lr <= 0:
        raise UserError(f"optim.lr: must be > 0, got {optim.lr}")
    if not 0 <= optim.momentum < 1:
        raise UserError(f"optim.momentum: must be in [0, 1), got {optim.momentum}")
    _at_least("optim.weight_decay", optim.weight_decay, 0)
    if not 0 < optim.lr_decay <= 1:
        raise UserError(f"optim.lr_decay: must be in (0, 1], got {optim.lr_decay}")
    _at_least("optim.update_every", optim.update_every, 1)


def _validate_run(config: Config) -> None:
    run = config.run
    if not run.name or not run.out_dir:
        raise UserError("run.name: must not be empty" if not run.name else "run.out_dir: must not be empty")
    if run.name in (".", "..") or any(sep in run.name for sep in "/\\"):
        # the run folder is <storage>/<name>: a path here would put the run outside the storage
        raise UserError(f"run.name: must be a plain folder name, got {run.name!r}")
    for key in ("epochs", "batch_size", "num_workers"):
        _at_least(f"run.{key}", getattr(run, key), 1)
    for key in ("val_freq", "save_freq", "seed"):
        _at_least(f"run.{key}", getattr(run, key), 0)
