"""Hyper-parameter search with Ray Tune over our Ray Train runs (`amldist tune`).

    start_ray(local=True)
    plan = plan_search(preset_dict("tiny-student-contrplus-asym"),
                       searches=["optim.lr=loguniform(1e-4,1e-2)"], settings=SearchSettings(num_samples=4))
    outcome = run_search(plan, storage="runs", name="tune-tiny")
    print(format_table(outcome.results)); outcome.files["best"]      # best.yaml: `amldist train --config`

Each trial is a Ray Tune function trainable (`run_trial`) that trains one full run through
`amldist.driver.run_training` (its own miner actor, its Ray Train workers, the same worker loop as
`amldist train`), Ray 2.60's way to tune a Train V2 run (docs/TUNING.md); a Train callback hands the
metrics of every epoch to the trial, which reports them to Tune, so ASHA can stop a trial after any
validation. One Ray serves all
trials; the val teacher store is computed once, here, before any trial starts; trials read the same
teacher stores (memory-mapped, never re-extracted). A search lives in `<storage>/<name>/`: Tune's
state, one folder per trial (`trial_<id>/`: Tune's files and the training run's), and the results
(`amldist.tuning.results`). `resume=True` continues an interrupted search: finished trials stay as they
are, unfinished ones continue from their last checkpoint, the rest start.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.util.queue import Empty, Queue

from amldist.atomic import atomic_write_json
from amldist.config import Config
from amldist.driver import run_training
from amldist.errors import require
from amldist.runs import DEFAULT_MAX_FAILURES, checkpointed_records, local_run_dir
from amldist.storage import is_uri, storage_filesystem, storage_filesystem_path
from amldist.training.paths import prepare_inputs, with_absolute_paths
from amldist.tuning.plan import SearchPlan
from amldist.tuning.plots import plot_search
from amldist.tuning.results import PLOT_FILE, SearchResults, TrialRecord, last_per_epoch, write_results
from amldist.tuning.space import Dimension

log = logging.getLogger(__name__)

TRIAL_CPU = 0.01      # the trial's own actor only waits on its TorchTrainer; Tune refuses 0 (STACK.md §2)
SEARCH_FILE = "search.json"
_TUNE_FUNCTIONS = {"grid": "grid_search"}  # our function names are Ray Tune's, but for this one


@dataclass(frozen=True)
class TrialJob:
    """What every trial needs besides the values it drew."""

    plan: SearchPlan
    cwd: str                       # the search's working folder: the config's relative paths start there
    storage: str                   # made absolute, as the trials run in their own folders
    name: str                      # the search's name: trials train as `<name>/trial_<id>` in storage
    max_failures: int              # worker-group restarts per trial (Ray Train's FailureConfig)
    cpus_per_worker: float | None  # a fraction lets several trials share the CPUs; None = Ray's 1


@dataclass(frozen=True)
class SearchOutcome:
    results: SearchResults
    folder: Path                   # the search folder (results, best.yaml, search.png)
    files: dict[str, Path]


def trial_folder(trial_id: str) -> str:
    return f"trial_{trial_id}"


def _trial_folder_of(trial) -> str:  # Tune's trial name and folder creator (module level: Tune pickles it)
    return trial_folder(trial.trial_id)


class EpochsToTrial(ray.train.UserCallback):
    """Hands each epoch's rank-0 metrics (and checkpoint path) from the Train controller to the trial.

    This is Ray's `TuneReportCallback`'s job, but there the trial's main thread reports what arrives
    while the trial function may already have returned: under load, the last epoch's report then
    arrived after the trial's end and blocked the trial forever (Ray 2.60, seen here). So the trial
    reports every item itself, in order, before it returns (`run_trial`)."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        item = dict(metrics[0])
        if checkpoint is not None:
            item["checkpoint_path"] = checkpoint.path
        self.queue.put(item)  # returns once the item is in the queue: before the run can end


def run_trial(params: dict[str, Any], job: TrialJob) -> None:
    """One trial: a full training run of the drawn config, fitted in a thread while this one reports its
    epochs to Tune. A trial restarted by a resumed search finds its run's checkpoints under the same name
    and continues."""
    config = with_absolute_paths(job.plan.trial_config(params), job.cwd)
    name = f"{job.name}/{trial_folder(tune.get_context().get_trial_id())}"
    # Tune restarts a trial that a resumed search finds unfinished from nothing (no Tune checkpoint) and
    # drops what it had recorded of it; its run continues from its checkpoint, so the epochs already
    # trained are reported again first, for the results and for ASHA's rungs.
    for record in checkpointed_records(local_run_dir(config.run.out_dir, job.storage, name)):
        tune.report(record)
    epochs: Queue = Queue(maxsize=1, actor_options={"num_cpus": 0})  # the run waits for a slow Tune
    ended, failure = threading.Event(), []

    def fit() -> None:
        try:
            run_training(config, storage=job.storage, name=name, callbacks=[EpochsToTrial(epochs)],
                         wandb="off", max_failures=job.max_failures, image_every=0,
                         cpus_per_worker=job.cpus_per_worker)
        except BaseException as err:  # noqa: BLE001  (raised again in the trial's thread, where Tune sees it)
            failure.append(err)
        finally:
            ended.set()

    threading.Thread(target=fit, name="fit", daemon=True).start()
    while not (ended.is_set() and epochs.empty()):  # every item is queued before the fit ends
        try:
            tune.report(epochs.get(timeout=1.0))
        except Empty:
            continue
    if failure:
        raise failure[0]


def trial_resources(config: Config, max_concurrent: int | None,
                    cluster: Mapping[str, float]) -> tuple[int, float | None]:
    """(trials at once, CPUs per training worker). By default as many trials as the cluster holds with a
    CPU (or GPU) per worker; more trials at once than that get the CPUs shared out in fractions."""
    workers = config.run.num_workers
    if config.run.use_gpu:
        return max_concurrent or max(1, int(cluster.get("GPU", 0) // workers)), None
    cpus = float(cluster.get("CPU", 1))
    concurrent = max_concurrent or max(1, int(cpus // workers))
    share = math.floor((cpus - concurrent * TRIAL_CPU) / (concurrent * workers) * 100) / 100
    require(share >= 0.01, f"--max-concurrent {concurrent}: {concurrent} trials of {workers} workers do not "
                           f"fit on {cpus:g} CPUs")
    return concurrent, min(1.0, share)


def search_folder(plan: SearchPlan, storage: str, name: str) -> Path:
    """Where the search's results go: the Tune experiment folder, or run.out_dir/<name> for a URI storage."""
    return local_run_dir(plan.base_config().run.out_dir, storage, name)


def check_search_folder(plan: SearchPlan | None, storage: str, name: str, resume: bool,
                        wandb: str) -> tuple[SearchPlan, str]:
    """(the plan to run, its wandb mode). A new search needs an empty folder; `resume` needs the stored
    search, and a plan given with it must be that one (a search's space cannot change midway)."""
    folder = local_run_dir(plan.base_config().run.out_dir if plan else "runs", storage, name)
    stored = folder / SEARCH_FILE
    if not resume:
        require(plan is not None, "--config: give a preset name or YAML file")
        require(not folder.exists() or not any(folder.iterdir()),
                f"{folder} already holds a search named {name!r}; pass --resume to continue it, or --name to "
                "start a new one")
        return plan, wandb
    require(stored.is_file(), f"nothing to resume: no search in {folder} ({SEARCH_FILE} is missing)")
    data = json.loads(stored.read_text())
    previous = SearchPlan.from_dict(data["plan"])
    if plan is not None:
        changed = _changed_fields(previous, plan)
        require(not changed, f"--resume: this search was started with other settings ({', '.join(changed)} "
                             "differ); drop those flags to continue it as it was, or pass --name for a new "
                             "search")
    return previous, data["wandb"]


def _changed_fields(old: SearchPlan, new: SearchPlan) -> list[str]:
    before, after = (json.loads(json.dumps(plan.to_dict())) for plan in (old, new))
    return [key for key in before if before[key] != after.get(key)]


def param_space(dimensions: Sequence[Dimension]) -> dict[str, Any]:
    """Ray Tune's sampling domains, keyed by the dotted config keys."""
    space = {}
    for dimension in dimensions:
        function = getattr(tune, _TUNE_FUNCTIONS.get(dimension.function, dimension.function))
        values = dimension.args
        listed = dimension.function in ("choice", "grid")
        space[dimension.key] = function(list(values)) if listed else function(*values)
    return space


def _scheduler(plan: SearchPlan):
    if plan.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", max_t=plan.max_epochs,
                         grace_period=plan.grace_period, reduction_factor=plan.reduction_factor)


def _wandb_callbacks(mode: str, project: str, group: str) -> list:
    """One wandb run per trial, all in the group `group` (Ray's WandbLoggerCallback, for Tune only)."""
    if mode == "off":
        return []
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        log.warning("wandb online needs WANDB_API_KEY; logging the trials offline instead")
        mode = "offline"
    if mode == "offline":
        os.environ["WANDB_MODE"] = "offline"  # Ray's callback then asks for no API key
    import wandb

    logger = _wandb_logger_class()
    return [logger(project=project, group=group, mode=mode, settings=wandb.Settings(silent=True))]


def _wandb_logger_class():
    """Ray's WandbLoggerCallback whose per-trial logging actor also shuts wandb's service down when its
    run ends: Ray kills the actor then, and wandb's own exit hook printed a ConnectionResetError
    traceback for every trial."""
    from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor

    class QuietLoggingActor(_WandbLoggingActor):
        def run(self):
            super().run()
            self._wandb.teardown()

    return type("WandbLogger", (WandbLoggerCallback,), {"_logger_actor_cls": QuietLoggingActor})


def run_search(plan: SearchPlan, *, storage: str, name: str, wandb: str = "off", resume: bool = False,
               max_failures: int = DEFAULT_MAX_FAILURES, callbacks: Sequence[Any] = ()) -> SearchOutcome:
    """Run (or with `resume`, continue) the search on the connected Ray; write and return its results.
    `callbacks`: extra Ray Tune callbacks. Check the folder first with `check_search_folder`."""
    if not ray.is_initialized():
        raise RuntimeError("run_search needs a running Ray (ray.init) first")
    base = plan.base_config()
    folder = search_folder(plan, storage, name)
    experiment, filesystem = experiment_path(storage, name), storage_filesystem(storage)
    prepare_inputs(base)  # the val teacher store, once for all trials; every trial then only opens it
    concurrent, cpus = trial_resources(base, plan.max_concurrent, ray.cluster_resources())
    trial_storage = storage if is_uri(storage) else storage_filesystem_path(storage)  # trials run elsewhere
    job = TrialJob(plan, os.getcwd(), trial_storage, name, max_failures, cpus)
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), {"cpu": TRIAL_CPU})
    if base.run.val_freq > 1:
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # epochs without validation lack the metric
    log.info("search %s: %d trials at once, %s CPU per training worker", name, concurrent, cpus or "1")
    if resume:
        _wandb_callbacks(wandb, base.run.wandb_project, name)  # the restored callback needs its environment
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=filesystem)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / SEARCH_FILE, {"plan": plan.to_dict(), "wandb": wandb})
        tuner = tune.Tuner(
            trainable, param_space=param_space(plan.dimensions),
            tune_config=tune.TuneConfig(metric=plan.metric, mode=plan.mode, num_samples=plan.num_samples,
                                        scheduler=_scheduler(plan),  # concurrency: the generator's
                                        search_alg=BasicVariantGenerator(random_state=base.run.seed,
                                                                         max_concurrent=concurrent),
                                        trial_name_creator=_trial_folder_of,
                                        trial_dirname_creator=_trial_folder_of),
            run_config=tune.RunConfig(name=name, storage_path=storage_filesystem_path(storage),
                                      storage_filesystem=filesystem, verbose=1,
                                      callbacks=[*_wandb_callbacks(wandb, base.run.wandb_project, name),
                                                 *callbacks]))
    tuner.fit()
    results = collect_results(plan, name, storage)
    files = write_results(results, folder)
    if any(trial.curve(plan.metric) for trial in results.trials):
        files["plot"] = plot_search(results, folder / PLOT_FILE)
    return SearchOutcome(results, folder, files)


def experiment_path(storage: str, name: str) -> str:
    """The Tune experiment folder of a search, inside `storage_filesystem(storage)` for a URI."""
    return f"{storage_filesystem_path(storage).rstrip('/')}/{name}"


def collect_results(plan: SearchPlan, name: str, storage: str) -> SearchResults:
    """Every trial of the search as Ray Tune recorded it (its state and each trial's result.json)."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(experiment_path(storage, name),
                                  storage_filesystem=storage_filesystem(storage),
                                  default_metric=plan.metric, default_mode=plan.mode)
    frames = analysis.trial_dataframes
    base = plan.base_config()
    trials = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id.rsplit("_", 1)[-1]):
        params = {d.key: trial.config.get(d.key) for d in plan.dimensions}
        frame = frames.get(trial.trial_id)
        rows = [] if frame is None or not len(frame) else json.loads(frame.to_json(orient="records",
                                                                                double_precision=15))
        planned = plan.trial_config(params).run.epochs if None not in params.values() else plan.max_epochs
        folder = local_run_dir(base.run.out_dir, storage, f"{name}/{trial_folder(trial.trial_id)}")
        trials.append(TrialRecord(trial.trial_id, params, str(trial.status), planned, last_per_epoch(rows),
                                  (trial.last_result or {}).get("time_total_s"), str(folder)))
    return SearchResults(plan, name, trials)
