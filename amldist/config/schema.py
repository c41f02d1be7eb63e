"""The typed training configuration: one dataclass per section, defaults = the paper's §4.1.

Fields left None are filled by `amldist.config.resolve` from the loss registry and the model
(learning rate, margin and other loss options, similarity, mining kind, epochs, projection).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    root: str = "data"                    # data root in cirtorch's layout (docs/ARCHITECTURE.md)
    dataset: str = "retrieval-SfM-120k"   # training set: the train/val splits of its pkl
    image_size: int = 362                 # longest side of training images (§4.1)
    shards: str | None = None             # shard folder; None = layout.shards_dir(root, dataset, image_size)
    teacher_features: str | None = None   # teacher feature store (`amldist features --out`); None = derived
    workers: int = 8                      # data-loading processes per trainer (aml --workers)


@dataclass
class ModelConfig:
    arch: str = "mobilenet_v2"            # an amldist.nets architecture
    pooling: str = "gem"
    projection_dim: int | None = None     # 1x1 conv to this d; None = the public teacher's d if it differs
    pretrained: bool = True               # ImageNet weights for the backbone
    teacher: str | None = None            # "vgg16" / "resnet101" (public retrievalSfM120k-*-gem) or a file
    # None = frozen when pretrained (the reference), trained from scratch
    freeze_batchnorm: bool | None = None


@dataclass
class LossConfig:
    name: str = "contrastive"             # a registry name or alias (amldist.losses.LOSSES)
    asym: bool | None = None              # similarity (3) instead of (2); None = the loss's default
    form: str = "paper"                   # "paper" or the code variant ("cirtorch"/"aml", or "code")
    margin: float | None = None           # None = the registry default of the loss and form
    use_self: bool | None = None          # contrastive family: Table 2's SELF / POS / NEG switches
    use_positives: bool | None = None
    use_negatives: bool | None = None
    alpha: float | None = None            # multi-similarity, DarkRank
    beta: float | None = None
    list_length: int | None = None        # DarkRank: the teacher's top examples that take part
    angle_weight: float | None = None     # RKD-DA
    distance_weight: float | None = None
    reduction: str = "sum"                # over the tuples of a batch; "sum" as cirtorch/aml (see losses)


@dataclass
class MiningConfig:
    kind: str | None = None               # hard / random / none; None = the loss's default
    num_positives: int = 1                # per tuple (cirtorch: 1)
    num_negatives: int = 5                # per tuple; relational losses: the group is the anchor +
    queries_per_epoch: int = 2000         # num_positives + num_negatives random examples (same size)
    pool_size: int = 22000                # random images searched for hard negatives each epoch
    backend: str = "auto"                 # miner search backend (amldist.miner_actor.BACKENDS)


@dataclass
class OptimConfig:
    optimizer: str = "sgd"
    lr: float | None = None               # None = the paper's value for the loss/setting (§4.1)
    momentum: float = 0.9
    weight_decay: float = 1e-6
    lr_decay: float = 0.99                # per epoch; cirtorch/aml use exp(-0.01) = 0.99005
    update_every: int = 1                 # optimiser step every N batches (aml --update-every)
    projection_lr_multiplier: float = 1.0  # the student's new 1x1 projection learns at lr x this (aml: 1)


@dataclass
class RunConfig:
    name: str | None = None               # None = the preset's name, else "run"
    out_dir: str = "runs"
    epochs: int | None = None             # None = 100 (sym) or 300 (asym), §4.1
    batch_size: int = 10                  # tuples per batch (§4.1)
    val_freq: int = 1                     # validate every N epochs (0 = never)
    save_freq: int = 1                    # checkpoint every N epochs (0 = only the best and the last)
    seed: int = 0
    num_workers: int = 1                  # Ray Train workers
    use_gpu: bool = False
    wandb: bool = False
    wandb_project: str = "amldist"


@dataclass
class Config:
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "mining": MiningConfig,
            "optim": OptimConfig, "run": RunConfig}
TOP_LEVEL_FIELDS = ("description",)
