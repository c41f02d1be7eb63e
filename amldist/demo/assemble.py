"""The report stage: the Table-3 rows, the figures and the report text, from the stages' outputs.

Reads what the runs wrote (metrics.jsonl, negatives.jsonl, model_best.pth.tar) and the evaluation
results; the only computation is embedding a few test images for the t-SNE figure.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from amldist.atomic import atomic_write_json
from amldist.datasets import formats, layout
from amldist.demo import embeddings, plots
from amldist.demo.claims import Claim, check_claims, format_claims
from amldist.demo.evaluation import DESCRIPTORS_DATASET, load_descriptors, load_results
from amldist.demo.report import Figure, ReportContent, RunSummary, StageTiming
from amldist.demo.settings import TEACHER_RUN, TEST_DATASETS, TRAIN_DATASET, DemoSettings
from amldist.demo.stages import DemoState, RunOutcome
from amldist.demo.table import (
    DATASET_LABELS,
    SizeRow,
    TableRow,
    format_markdown,
    format_sizes,
    format_table,
    loss_label,
    scores_from_eval,
)
from amldist.wandb_log import read_metrics

log = logging.getLogger(__name__)

TABLE_JSON = "table.json"
CURVES_PNG = "training_curves.png"
NEGATIVES_PNG = "hard_negatives.png"
# Paper order: the teacher, the student trained alone, then the students that learned from the teacher.
ROW_ORDER = (TEACHER_RUN.key, "baseline", "contrplus", "reg")


def ordered_runs(state: DemoState) -> list[RunOutcome]:
    keys = [k for k in ROW_ORDER if k in state.runs] + [k for k in state.runs if k not in ROW_ORDER]
    return [state.runs[k] for k in keys]


def table_row(run: RunOutcome, teacher: RunOutcome, results: dict, variant: str = "whiten") -> TableRow:
    """The run's Table-3 row from its eval results; variant 'whiten' (learned whitening) or 'raw'."""
    from amldist.losses import LABELLED, loss_spec
    from amldist.training.paths import student_dim

    config = run.config
    if run is teacher:
        scores = {"sym": scores_from_eval(results, "teacher", variant)}
    else:
        scores = {mode: scores_from_eval(results, mode, variant) for mode in ("sym", "asym")
                  if mode in results}
    return TableRow(run=run.name, student=config.model.arch, dim=student_dim(config),
                    teacher=teacher.config.model.arch if config.model.teacher else None,
                    labels=loss_spec(config.loss.name).family == LABELLED, loss=loss_label(config.loss.name),
                    mining=config.mining.kind or "none", asym=bool(config.loss.asym), scores=scores)


def table_rows(state: DemoState, variant: str = "whiten") -> list[TableRow]:
    teacher = state.runs[TEACHER_RUN.key]
    rows = []
    for run in ordered_runs(state):
        stored = load_results(state.settings, run)
        if stored is None:
            raise RuntimeError(f"no evaluation results for {run.name}")
        rows.append(table_row(run, teacher, stored["results"], variant))
    return rows


def rows_by_key(state: DemoState, rows: list[TableRow]) -> dict[str, TableRow]:
    """{run key: row} of rows made by table_rows (same order as ordered_runs)."""
    return {run.spec.key: row for run, row in zip(ordered_runs(state), rows, strict=True)}


def paper_claims(state: DemoState, rows: list[TableRow], raw_rows: list[TableRow],
                 random_ranking: dict[str, dict[str, float]]) -> list[Claim]:
    return check_claims(rows_by_key(state, rows), rows_by_key(state, raw_rows), random_ranking)


def random_ranking_scores(truths: dict[str, formats.GroundTruth], repeats: int = 20,
                          seed: int = 0) -> dict[str, dict[str, float]]:
    """Mean mAP (%) of uniformly random rankings per dataset and setting: the floor the table's numbers
    should be read against (it depends only on how many positives each query has)."""
    from amldist.evaluate import evaluate_ranks

    rng = np.random.default_rng(seed)
    out = {}
    for name, truth in truths.items():
        runs = [evaluate_ranks(np.stack([rng.permutation(len(truth.imlist)) for _ in truth.qimlist]),
                               truth.gnd)
                for _ in range(repeats)]  # ranks (Q, N) per repeat
        out[name] = {s: float(np.mean([r[s]["mAP"] for r in runs])) for s in ("medium", "hard")}
    return out


def read_truths(settings: DemoSettings) -> dict[str, formats.GroundTruth]:
    return {name: formats.read_gnd(layout.gnd_path(settings.data_root, name)) for name in TEST_DATASETS}


def write_table_json(folder: Path, rows: list[TableRow], raw_rows: list[TableRow],
                     random_ranking: dict[str, dict[str, float]], claims: list[Claim]) -> Path:
    path = folder / TABLE_JSON
    atomic_write_json(path, {"datasets": list(TEST_DATASETS), "metric": "mAP (%)",
                             "rows": [row.to_dict() for row in rows],  # with learned whitening, as printed
                             "rows_without_whitening": [row.to_dict() for row in raw_rows],
                             "random_ranking": random_ranking, "claims": [c.to_dict() for c in claims]})
    return path


def random_ranking_note(random_ranking: dict[str, dict[str, float]]) -> str:
    parts = [f"{DATASET_LABELS.get(name, name)} medium {v['medium']:.1f}, hard {v['hard']:.1f}"
             for name, v in random_ranking.items()]
    return f"For reference, a random ranking scores (mean of 20): {'; '.join(parts)}."


TIME_CAPTION = ("Seconds per epoch, the mean over each run's epochs in metrics.jsonl (the slowest rank's "
                "figures). Mining runs from the start of the epoch until training starts: embedding the "
                "anchors (and, for symmetric runs, the pool) on the workers, "
                "plus the miner's answers. Waiting on the miner is only the time spent inside calls to the "
                "miner actor (the epoch's pool, the search, the teacher vectors); "
                "the target is at most 10% of an epoch.")


def time_table(records_by_run: dict[str, list[dict]]) -> str:
    """Markdown table of where each run's epochs went, from its metrics.jsonl records."""
    lines = ["| run | epochs | epoch s | training s | mining s | waiting on the miner s | wait / epoch |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, records in records_by_run.items():
        epochs = [r for r in records if "epoch_time_s" in r and "miner_wait_s" in r]
        if not epochs:
            continue
        mean = {key: float(np.mean([r.get(key, 0.0) for r in epochs]))
                for key in ("epoch_time_s", "train_time_s", "mining_time_s", "miner_wait_s")}
        share = (100.0 * mean["miner_wait_s"] / mean["epoch_time_s"] if mean["epoch_time_s"] > 0
                 else float("nan"))
        lines.append(f"| {name} | {len(epochs)} | {mean['epoch_time_s']:.1f} | {mean['train_time_s']:.1f} | "
                     f"{mean['mining_time_s']:.2f} | {mean['miner_wait_s']:.2f} | {share:.1f}% |")
    return "\n".join(lines)


# ---------------------------------------------------------------- figures


def curves_figure(state: DemoState, folder: Path) -> Figure:
    runs = {run.spec.key: read_metrics(run.run_dir) for run in ordered_runs(state)}
    plots.plot_training_curves(runs, folder / CURVES_PNG)
    return Figure(CURVES_PNG, "Training curves",
                  "Per epoch, from each run's metrics.jsonl: training loss per tuple (the losses differ in "
                  "kind across runs, so compare each curve with itself), "
                  "validation mAP on the training set's val split (solid: symmetric, dashed: asymmetric, "
                  "student queries against the teacher's vectors), and the mean distance between anchors and "
                  "their mined hard negatives.")


def negatives_figure(state: DemoState, folder: Path) -> Figure | None:
    """Fig. 2 from the Contr+ student's asymmetric mining (the teacher's sym mining if it has none)."""
    from amldist.shards import ShardReader
    from amldist.training.negatives_log import read_negatives

    for key, how in (("contrplus", "student anchors vs the teacher's database (asymmetric mining)"),
                     (TEACHER_RUN.key, "teacher anchors vs the teacher's pool (symmetric mining)")):
        run = state.runs.get(key)
        records = read_negatives(run.run_dir) if run else []
        if any(any(row) for record in records for row in record["negatives"]):
            break
    else:
        log.warning("no run recorded mined negatives; the report has no hard-negative figure")
        return None
    s = state.settings
    reader = ShardReader(layout.shards_dir(s.data_root, TRAIN_DATASET, s.train_image_size) / "train")
    plots.plot_negatives_over_epochs(records, lambda i: reader.read_image(int(i)), folder / NEGATIVES_PNG,
                                     title=f"{run.name}: hard negatives over epochs")
    return Figure(NEGATIVES_PNG, "Hard negatives over epochs (the paper's Fig. 2)",
                  f"Run {run.name}, {how}. Each panel is one fixed anchor (first column, green); each row "
                  "an epoch, followed by the negatives mined for the anchor at the start of that epoch, most "
                  "similar first (red). As the student's space aligns with the teacher's, the negatives "
                  "should look more like the anchor.")


def tsne_figure(state: DemoState, folder: Path, student: RunOutcome) -> Figure:
    """Fig. 3 from the database descriptors the eval stage kept (no network runs here)."""
    s = state.settings
    truth = formats.read_gnd(layout.gnd_path(s.data_root, DESCRIPTORS_DATASET))
    chosen = embeddings.pick_landmarks(truth)
    teacher = load_descriptors(s, state.runs[TEACHER_RUN.key])[chosen.positions]  # (N, D)
    teacher_xy, student_xy = embeddings.tsne_pairs(teacher, load_descriptors(s, student)[chosen.positions])
    filename = f"tsne_{student.spec.key}.png"
    plots.plot_tsne(teacher_xy, student_xy, chosen.labels, folder / filename,
                    title=f"teacher (circles) vs {student.spec.key} student (diamonds)")
    per = len(chosen.labels) // max(len(set(chosen.labels)), 1)
    return Figure(filename,
                  f"t-SNE of teacher and {student.spec.key} student embeddings (the paper's Fig. 3)",
                  f"{len(set(chosen.labels))} {DESCRIPTORS_DATASET} landmarks (colours), about {per} "
                  f"database images each, embedded by the teacher (circles) and by {student.name} "
                  "(diamonds); a line joins the two embeddings of each image. Short lines mean the "
                  "student maps images where the teacher does, which is what asymmetric testing needs.")


def build_figures(state: DemoState, folder: Path) -> list[Figure]:
    figures = [curves_figure(state, folder)]
    negatives = negatives_figure(state, folder)
    if negatives is not None:
        figures.append(negatives)
    for spec in state.settings.student_runs:
        run = state.runs.get(spec.key)
        if run is not None and run.config.model.teacher:
            figures.append(tsne_figure(state, folder, run))
    return figures


# ---------------------------------------------------------------- text


def split_counts(counts: dict) -> str:
    """A training split's synth.json counts in words: images, clusters, query/positive pairs."""
    return f"{counts['images']} images in {counts['clusters']} clusters ({counts['pairs']} pairs)"


def retrieval_counts(counts: dict) -> str:
    return f"{counts['db']} database images and {counts['queries']} queries"


def _projection_rate(config) -> str:
    multiplier = config.optim.projection_lr_multiplier
    return f" (projection x{multiplier:g})" if multiplier != 1 and config.model.projection_dim else ""


def setup_lines(settings: DemoSettings, state: DemoState) -> list[str]:
    import json

    synth = json.loads((settings.data_root / "synth.json").read_text())
    counts = synth["counts"]
    lines = [f"Synthetic landmarks (`amldist data synth --preset {settings.synth_preset}`, "
             f"seed {settings.seed}) in `{settings.data_root}`: training {split_counts(counts['train'])}, "
             f"validation {split_counts(counts['val'])}, "
             + ", ".join(f"{name} {retrieval_counts(counts[name])}" for name in TEST_DATASETS) + "."]
    for run in ordered_runs(state):
        c = run.config
        lines.append(f"`{run.name}`: {run.spec.description}; {c.run.epochs} epochs, "
                     f"{c.mining.queries_per_epoch} tuples/epoch, pool {c.mining.pool_size}, batch "
                     f"{c.run.batch_size}, {c.optim.optimizer} lr {c.optim.lr:g}{_projection_rate(c)}, "
                     f"images <= "
                     f"{c.data.image_size} px, {c.run.num_workers} Ray workers.")
    lines.append(f"Testing: single scale, images <= {settings.test_image_size} px (the paper: multi-scale at "
                 f"1024 px), learned whitening on the {TRAIN_DATASET} whitening pairs, "
                 "in the teacher's space for asymmetric testing.")
    return lines


SIZES_CAPTION = ("The networks' cost, as the paper's Table 1 gives it (FLOPs = 2 × "
                 "multiply-adds of one forward at the training image size; "
                 "parameters of the backbone and projection, `amldist nets info`).")


def size_rows(state: DemoState) -> list[SizeRow]:
    """The teacher's and each student's FLOPs and parameters (each architecture and d once)."""
    from amldist.flops import complexity
    from amldist.training.paths import student_dim

    rows, seen = [], set()
    for run in ordered_runs(state):
        model = run.config.model
        if (model.arch, model.projection_dim) in seen:
            continue
        seen.add((model.arch, model.projection_dim))
        cost = complexity(model.arch, model.projection_dim, state.settings.train_image_size, model.pooling)
        head = f" + 1×1 conv to {model.projection_dim}" if model.projection_dim else ""
        rows.append(SizeRow("teacher" if run.spec.key == TEACHER_RUN.key else "student", model.arch + head,
                            student_dim(run.config), cost.gflops, cost.params_m))
    return rows


def report_content(state: DemoState, rows: list[TableRow], raw_rows: list[TableRow], claims: list[Claim],
                   figures: list[Figure], stages: list[StageTiming], command: str,
                   random_ranking: dict[str, dict[str, float]]) -> ReportContent:
    """rows / raw_rows: table_rows with and without whitening; claims: paper_claims of them."""
    datasets = list(TEST_DATASETS)
    raw_caption = ("The same networks without whitening (raw descriptors). On small synthetic sets learned "
                   "whitening can lower the scores (docs/TRAINING.md, \"Why learned whitening does not help "
                   "here\").")
    raw = (raw_caption, format_markdown(raw_rows, datasets))
    times = (TIME_CAPTION, time_table({run.name: read_metrics(run.run_dir) for run in ordered_runs(state)}))
    sizes = (SIZES_CAPTION, format_sizes(size_rows(state), state.settings.train_image_size))
    runs = [RunSummary(run.name, run.spec.description, str(run.best_checkpoint), run.config.run.epochs,
                       tuple(str(p) for p in run.wandb_runs)) for run in ordered_runs(state)]
    start = "from ImageNet weights" if state.runs[TEACHER_RUN.key].config.model.pretrained else "from scratch"
    notes = [(f"The numbers are whatever this run produced: small networks trained {start} for a few "
              "epochs on a few hundred synthetic images, so they are far below the paper's; compare the "
              "rows with each other and with the random-ranking floor below, not with the paper."),
             ("ASYMMETRIC TESTING is empty for networks that did not learn from the teacher (their space is "
              "unrelated to the teacher's), as in the paper."), random_ranking_note(random_ranking)]
    return ReportContent(title=f"amldist demo ({state.settings.name})", command=command,
                         setup=setup_lines(state.settings, state), table_text=format_table(rows, datasets),
                         table_markdown=format_markdown(rows, datasets), notes=notes,
                         claims=format_claims(claims),
                         extra_tables=[sizes, raw, times], figures=figures, runs=runs, stages=stages)
