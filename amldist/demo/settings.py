"""What one demo size runs: data, image sizes, the four training runs and their overrides.

The training runs are preset files (one row of Table 3 each): `presets/lite-*.yaml` (EfficientNet-Lite
networks from ImageNet weights, the default demo) or `presets/tiny-*.yaml` (plain CNNs from scratch,
the fastest). A demo size changes them only through `--set` overrides (data root, image size, epochs,
tuples per epoch), so every run still goes through `amldist train` with a preset, as a user would
run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from amldist.errors import UserError

TRAIN_DATASET = "retrieval-SfM-120k"
TEST_DATASETS = ("roxford5k", "rparis6k")


@dataclass(frozen=True)
class RunSpec:
    key: str            # short name in the report and for --force
    preset: str         # presets/<preset>.yaml
    description: str


@dataclass(frozen=True)
class DemoRuns:
    """The teacher and the students of one demo (same keys in every demo: 'teacher', then
    'contrplus', 'reg', 'baseline')."""

    teacher: RunSpec
    students: tuple[RunSpec, ...]


def _runs(prefix: str, teacher: str, student: str) -> DemoRuns:
    return DemoRuns(
        RunSpec("teacher", f"{prefix}-teacher-contr-sym", f"teacher: {teacher}, Contr (4), hard mining, sym"),
        (RunSpec("contrplus", f"{prefix}-student-contrplus-asym",
                 f"student: {student}, Contr+ (10), hard mining, asym"),
         RunSpec("reg", f"{prefix}-student-reg-asym", f"student: {student}, Reg (7), no mining, asym"),
         RunSpec("baseline", f"{prefix}-student-contr-sym",
                 f"student alone: {student}, Contr (4), hard mining, sym (baseline)")))


# ImageNet-pretrained EfficientNet-Lite2 teacher and Lite0 students (the paper's set-up, in miniature).
PRETRAINED_RUNS = _runs("lite", "efficientnet_lite2", "efficientnet_lite0")
# Plain CNNs from scratch: the fastest demo, and the test-suite's.
SCRATCH_RUNS = _runs("tiny", "small_cnn", "mini_cnn")
# Each run's key is the same in every demo; these name them (stage names, report rows).
TEACHER_RUN = PRETRAINED_RUNS.teacher
STUDENT_RUNS = PRETRAINED_RUNS.students


@dataclass(frozen=True)
class DemoSettings:
    name: str
    synth_preset: str
    data_root: Path
    runs_dir: Path
    report_dir: Path
    train_image_size: int
    test_image_size: int
    overrides: tuple[str, ...] = ()          # --set KEY=VALUE for every training run
    runs: DemoRuns = PRETRAINED_RUNS
    num_workers: int = 2                     # Ray Train workers per run
    seed: int = 0                            # synthetic data seed
    wandb: str = "offline"
    max_failures: int | None = None          # worker-group restarts per run (None: amldist train's default;
                                             # the tests use 0, so that no retry hides a failure)

    @property
    def teacher_run(self) -> RunSpec:
        return self.runs.teacher

    @property
    def student_runs(self) -> tuple[RunSpec, ...]:
        return self.runs.students

    def run_name(self, run: RunSpec) -> str:
        """Run folder name: the preset's name, with its first word (lite, tiny) replaced by this demo's."""
        return f"{self.name}-{run.preset.split('-', 1)[1]}"

    def run_dir(self, run: RunSpec) -> Path:
        return self.runs_dir / self.run_name(run)


@dataclass(frozen=True)
class DemoSize:
    synth_preset: str
    train_image_size: int
    test_image_size: int
    overrides: tuple[str, ...] = ()
    runs: DemoRuns = PRETRAINED_RUNS


# Sizes of `amldist demo --preset NAME`. lite (`make demo`'s) starts from ImageNet weights (EfficientNet-Lite2
# teacher, Lite0 students; docs/TRAINING.md "The pretrained presets"); tiny trains plain CNNs from scratch,
# the fastest; micro is the test-suite's: 1 epoch, 64-px images.
_SIZES = {
    "lite": DemoSize("lite", train_image_size=128, test_image_size=128),
    "tiny": DemoSize("tiny", train_image_size=128, test_image_size=128, runs=SCRATCH_RUNS),
    "small": DemoSize("small", train_image_size=192, test_image_size=256,
                      overrides=("mining.queries_per_epoch=400", "mining.pool_size=2000"), runs=SCRATCH_RUNS),
    "micro": DemoSize("micro", train_image_size=64, test_image_size=64,
                      overrides=("run.epochs=1", "mining.queries_per_epoch=10", "mining.pool_size=20",
                                 "run.batch_size=4", "data.workers=0"), runs=SCRATCH_RUNS),
}
DEMO_PRESETS = tuple(_SIZES)
DEFAULT_DEMO = "lite"


def demo_settings(name: str, *, data_root: str | Path | None = None, runs_dir: str | Path = "runs",
                  report_dir: str | Path | None = None, extra_overrides: tuple[str, ...] = (),
                  num_workers: int = 2, wandb: str = "offline") -> DemoSettings:
    if name not in _SIZES:
        raise UserError(f"unknown demo preset {name!r}; choose from {', '.join(DEMO_PRESETS)}")
    size = _SIZES[name]
    runs_dir = Path(runs_dir)
    return DemoSettings(
        name=name, synth_preset=size.synth_preset,
        data_root=Path(data_root) if data_root else Path("data") / f"synth-{size.synth_preset}",
        runs_dir=runs_dir,
        report_dir=(Path(report_dir) if report_dir
                    else runs_dir / ("demo" if name == DEFAULT_DEMO else f"demo-{name}")),
        train_image_size=size.train_image_size, test_image_size=size.test_image_size,
        overrides=size.overrides + tuple(extra_overrides), runs=size.runs, num_workers=num_workers,
        wandb=wandb)
