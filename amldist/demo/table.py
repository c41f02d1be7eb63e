"""The demo's results table, shaped like the paper's Table 3, as text, markdown and JSON (no I/O here).

A row describes one trained network (student, d, teacher, LAB, loss, mining, ASYM at training) and
holds its mAP with learned whitening, per testing mode ('sym': the network alone; 'asym': its
queries against the teacher's database), revisited setting ('medium', 'hard') and dataset.

    text = format_table(rows)          # printed by `amldist demo`
    parse_table(text) == rows' numbers # the printed table reads back (tests rely on it)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

MODES = ("sym", "asym")
SETTINGS = ("medium", "hard")
DATASET_LABELS = {"roxford5k": "ROxf", "rparis6k": "RPar", "oxford5k": "Oxf", "paris6k": "Par"}
MODE_TITLES = {"sym": "SYMMETRIC TESTING", "asym": "ASYMMETRIC TESTING"}
# The paper's short loss names; the equation numbers come from the loss registry.
LOSS_LABELS = {"contrastive": "Contr", "contrastive_plus": "Contr+", "triplet": "Triplet",
               "multi_similarity": "MS", "regression": "Reg", "rkd": "RKD", "darkrank": "DR"}
MISSING = "–"
SEPARATOR = " | "
DESCRIPTION_NAMES = ("STUDENT", "d", "TEACHER", "LAB", "LOSS", "MINING", "ASYM")
NUMBER_WIDTH = 7

# scores[mode][dataset][setting] = mAP (percent) or None when not measured
Scores = dict[str, dict[str, dict[str, float | None]]]


@dataclass
class TableRow:
    run: str                  # run folder name, e.g. tiny-student-contrplus-asym
    student: str              # architecture
    dim: int
    teacher: str | None       # architecture of the teacher it learned from; None = trained alone
    labels: bool              # LAB: uses labels in training
    loss: str                 # display label, e.g. "Contr+ (10)"
    mining: str               # hard / random / none
    asym: bool                # asymmetric similarity (3) at training
    scores: Scores = field(default_factory=dict)

    def score(self, mode: str, dataset: str, setting: str) -> float | None:
        return self.scores.get(mode, {}).get(dataset, {}).get(setting)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TableRow:
        return cls(**data)


def loss_label(name: str) -> str:
    """'contrastive_plus' -> 'Contr+ (10)', with the paper's equation number."""
    from amldist.losses.registry import loss_spec

    return f"{LOSS_LABELS.get(name, name)} {loss_spec(name).equation}"


def scores_from_eval(results: dict[str, Any], mode: str,
                     variant: str = "whiten") -> dict[str, dict[str, float | None]]:
    """mAP per dataset and setting of one testing mode of an `amldist eval` result
    (`results[mode][dataset][variant][setting]['mAP']`)."""
    out: dict[str, dict[str, float | None]] = {}
    for dataset, variants in results.get(mode, {}).items():
        settings = variants.get(variant) or {}
        out[dataset] = {s: _number(settings.get(s, {}).get("mAP")) for s in SETTINGS}
    return out


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _columns(datasets: Sequence[str]) -> list[tuple[str, str, str]]:
    """(mode, setting, dataset) of every number column, in the paper's order."""
    return [(m, s, d) for m in MODES for s in SETTINGS for d in datasets]


def _cell(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else MISSING


def _description(row: TableRow) -> list[str]:
    return [row.student, str(row.dim), row.teacher or MISSING, "✓" if row.labels else "", row.loss,
            row.mining if row.mining != "none" else MISSING, "✓" if row.asym else ""]


def _widths(rows: Sequence[TableRow]) -> list[int]:
    cells = [_description(row) for row in rows]
    return [max([len(name)] + [len(c[i]) for c in cells]) + 2 for i, name in enumerate(DESCRIPTION_NAMES)]


def format_table(rows: Sequence[TableRow], datasets: Sequence[str]) -> str:
    """Fixed-width text: description columns, ' | ', then the mAP columns under two group lines
    (testing mode, then setting)."""
    widths = _widths(rows)
    left = sum(widths) + len(SEPARATOR)
    group = NUMBER_WIDTH * len(SETTINGS) * len(datasets)
    sub = NUMBER_WIDTH * len(datasets)
    line1 = " " * left + "".join(MODE_TITLES[m].center(group) for m in MODES)
    line2 = " " * left + "".join(s.upper().center(sub) for _ in MODES for s in SETTINGS)
    header = "".join(name.ljust(w) for name, w in zip(DESCRIPTION_NAMES, widths)) + SEPARATOR
    header += "".join(DATASET_LABELS.get(d, d).rjust(NUMBER_WIDTH) for _, _, d in _columns(datasets))
    lines = [line1.rstrip(), line2.rstrip(), header, "-" * len(header)]
    for row in rows:
        text = "".join(value.ljust(w) for value, w in zip(_description(row), widths)) + SEPARATOR
        text += "".join(_cell(row.score(m, d, s)).rjust(NUMBER_WIDTH) for m, s, d in _columns(datasets))
        lines.append(text)
    return "\n".join(lines)


def parse_table(text: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Read a `format_table` text back: (dataset labels, rows as {'student', ..., 'scores'})."""
    lines = text.splitlines()
    try:
        at = next(i for i, line in enumerate(lines) if line.startswith(DESCRIPTION_NAMES[0]))
    except StopIteration:
        raise ValueError(f"no header line starting with {DESCRIPTION_NAMES[0]}") from None
    head, _, labels_text = lines[at].partition(SEPARATOR.strip())
    starts = _column_starts(head)
    labels = labels_text.split()
    per_dataset = len(MODES) * len(SETTINGS)
    if not labels or len(labels) % per_dataset:
        raise ValueError(f"unexpected number columns: {labels}")
    datasets = labels[:len(labels) // per_dataset]
    rows = []
    for line in lines[at + 2:]:  # after the header and its rule, up to the first blank line
        if not line.strip():
            break
        rows.append(_parse_row(line, starts, datasets))
    return datasets, rows


def _column_starts(head: str) -> list[int]:
    starts, position = [], 0
    for name in DESCRIPTION_NAMES:
        position = head.find(name, position)
        if position < 0:
            raise ValueError(f"header has no column {name!r}")
        starts.append(position)
        position += len(name)
    return starts


def _parse_row(line: str, starts: list[int], datasets: list[str]) -> dict[str, Any]:
    description, bar, numbers_text = line.partition(SEPARATOR.strip())
    if not bar:
        raise ValueError(f"row without {SEPARATOR.strip()!r}: {line!r}")
    ends = starts[1:] + [len(description)]
    values = {name: description[a:b].strip() for name, a, b in zip(DESCRIPTION_NAMES, starts, ends)}
    numbers = numbers_text.split()
    if len(numbers) != len(datasets) * len(MODES) * len(SETTINGS):
        raise ValueError(f"row has {len(numbers)} numbers: {line!r}")
    scores: dict[str, dict[str, dict[str, float | None]]] = {}
    for (mode, setting, dataset), cell in zip(_columns(datasets), numbers):
        scores.setdefault(mode, {}).setdefault(dataset, {})[setting] = (None if cell == MISSING
                                                                        else float(cell))
    return {"student": values["STUDENT"], "dim": int(values["d"]),
            "teacher": None if values["TEACHER"] == MISSING else values["TEACHER"],
            "labels": values["LAB"] == "✓", "loss": values["LOSS"],
            "mining": "none" if values["MINING"] == MISSING else values["MINING"],
            "asym": values["ASYM"] == "✓", "scores": scores}


def format_markdown(rows: Sequence[TableRow], datasets: Sequence[str]) -> str:
    """The same table as GitHub markdown (mode/setting folded into the column names)."""
    columns = _columns(datasets)
    names = list(DESCRIPTION_NAMES) + [
        f"{m.upper()} {s[0].upper()} {DATASET_LABELS.get(d, d)}" for m, s, d in columns]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in rows:
        cells = _description(row) + [_cell(row.score(m, d, s)) for m, s, d in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class SizeRow:
    role: str                 # "teacher" / "student"
    network: str              # architecture (+ its 1x1 projection)
    dim: int
    gflops: float             # one forward of an image_size x image_size image
    params_m: float           # millions (backbone + projection; no classifier)


def format_sizes(rows: Sequence[SizeRow], image_size: int) -> str:
    """Table 1 of the paper for the demo's networks, as markdown: FLOPs and parameters, and both
    relative to the teacher's (the first 'teacher' row)."""
    teacher = next((row for row in rows if row.role == "teacher"), rows[0] if rows else None)
    header = (f"| role | network | d | GFLOPs at {image_size}×{image_size} | params (M) | FLOPs vs teacher "
              "| params vs teacher |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row.role} | {row.network} | {row.dim} | {row.gflops:.3f} | {row.params_m:.2f} | "
                     f"{row.gflops / teacher.gflops:.2f} | {row.params_m / teacher.params_m:.2f} |")
    return "\n".join(lines)
