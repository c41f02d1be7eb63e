"""What one demo size runs: data, image sizes, the four training runs and their overrides.

The training runs are the `presets/tiny-*.yaml` files (one row of Table 3 each); a demo size changes
them only through `--set` overrides (data root, image size, epochs, tuples per epoch), so every run
still goes through `amldist train` with a preset, as a user would run it.
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


TEACHER_RUN = RunSpec("teacher", "tiny-teacher-contr-sym", "teacher: small_cnn, Contr (4), hard mining, sym")
STUDENT_RUNS = (
    RunSpec("contrplus", "tiny-student-contrplus-asym", "student: mini_cnn, Contr+ (10), hard mining, asym"),
    RunSpec("reg", "tiny-student-reg-asym", "student: mini_cnn, Reg (7), no mining, asym"),
    RunSpec("baseline", "tiny-student-contr-sym",
            "student alone: mini_cnn, Contr (4), hard mining, sym (baseline)"),
)


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
    num_workers: int = 2                     # Ray Train workers per run
    seed: int = 0                            # synthetic data seed
    wandb: str = "offline"

    def run_name(self, run: RunSpec) -> str:
        """Run folder name: the preset's name, with its size prefix replaced by this demo's."""
        return f"{self.name}-{run.preset.removeprefix('tiny-')}"

    def run_dir(self, run: RunSpec) -> Path:
        return self.runs_dir / self.run_name(run)


@dataclass(frozen=True)
class DemoSize:
    synth_preset: str
    train_image_size: int
    test_image_size: int
    overrides: tuple[str, ...] = ()


# Sizes of `amldist demo --preset NAME`. micro is the test-suite's: 1 epoch, 64-px images.
_SIZES = {
    "tiny": DemoSize("tiny", train_image_size=128, test_image_size=128),
    "small": DemoSize("small", train_image_size=192, test_image_size=256,
                      overrides=("mining.queries_per_epoch=400", "mining.pool_size=2000")),
    "micro": DemoSize("micro", train_image_size=64, test_image_size=64,
                      overrides=("run.epochs=1", "mining.queries_per_epoch=10", "mining.pool_size=20",
                                 "run.batch_size=4", "data.workers=0")),
}
DEMO_PRESETS = tuple(_SIZES)


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
                    else runs_dir / ("demo" if name == "tiny" else f"demo-{name}")),
        train_image_size=size.train_image_size, test_image_size=size.test_image_size,
        overrides=size.overrides + tuple(extra_overrides), num_workers=num_workers, wandb=wandb)
