"""Retrieval evaluation: exact ranking, average precision, mAP and mP@k, revisited and old protocols.

Conventions (batch-first): descriptors are (N, D) rows; `ranks` is (Q, N) or (Q, k) int64, row i
listing database indices for query i, best first (cirtorch stores the transpose, N × Q).

Protocol facts (cirtorch/revisitop `compute_map`):
- AP interpolates precision trapezoidally between recall steps; junk images are removed from the
  ranking before positions are counted; queries with no positives are left out of the mean.
- P@k uses k capped by the position of the last positive, kq = min(last positive, k).
- Revisited ROxford5k/RParis6k: easy (ok = easy; junk += hard), medium (ok = easy + hard),
  hard (ok = hard; junk += easy). Old Oxford5k/Paris6k: the file's ok/junk as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from amldist.search import search

log = logging.getLogger(__name__)

KAPPAS = (1, 5, 10)
REVISITED_SETTINGS = ("easy", "medium", "hard")
OLD_SETTING = "old"


def rank_database(db: np.ndarray, queries: np.ndarray, topk: int | None = None) -> np.ndarray:
    """Exact ranking by inner product: (Q, N) database indices, or (Q, topk) when topk is given."""
    k = len(db) if topk is None else min(int(topk), len(db))
    _, ids = search(db, queries, k)  # (Q, k)
    return ids


def rank_with_distractors(db: np.ndarray, distractors: np.ndarray, queries: np.ndarray,
                          topk: int | None = None) -> np.ndarray:
    """Rank test db + distractors together (+R1M). Distractor j gets database index len(db) + j,
    which no ground-truth list mentions, so the metrics need no other change."""
    combined = np.concatenate([np.asarray(db, np.float32), np.asarray(distractors, np.float32)])  # (N + M, D)
    return rank_database(combined, queries, topk=topk)


def compute_ap(positions: np.ndarray, num_positives: int) -> float:
    """AP from the sorted 0-based, junk-adjusted positions of the retrieved positives.

    The j-th positive (0-based) at position r adds the mean of the precision just before it,
    j / r (1 when r == 0), and just at it, (j + 1) / (r + 1), weighted by 1 / num_positives.
    """
    r = np.asarray(positions, dtype=np.float64)
    if num_positives <= 0 or r.size == 0:
        return 0.0
    j = np.arange(r.size, dtype=np.float64)
    before = np.where(r == 0, 1.0, j / np.maximum(r, 1.0))
    at = (j + 1.0) / (r + 1.0)
    return float(np.sum((before + at) / 2.0) / num_positives)


def _positions_of(rank_row: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Sorted positions in `rank_row` of those `items` it contains (items missing from a top-k list
    are simply not found)."""
    if items.size == 0:
        return np.zeros(0, np.int64)
    valid = rank_row >= 0
    position_of = np.full(max(int(rank_row.max(initial=-1)), int(items.max())) + 1, -1, np.int64)
    position_of[rank_row[valid]] = np.flatnonzero(valid)
    found = position_of[items]
    return np.sort(found[found >= 0])


def _query_scores(rank_row: np.ndarray, ok: np.ndarray, junk: np.ndarray,
                  kappas: Sequence[int]) -> tuple[float, np.ndarray]:
    """AP and P@k of one query with at least one positive."""
    pos = _positions_of(rank_row, ok)
    junk_pos = _positions_of(rank_row, junk)
    # Remove junk from the ranking: each positive moves up by the junk images ranked above it.
    pos = pos - np.searchsorted(junk_pos, pos)
    ap = compute_ap(pos, len(ok))
    prs = np.zeros(len(kappas))
    if pos.size:
        pos1 = pos + 1  # 1-based
        for j, kappa in enumerate(kappas):
            kq = min(int(pos1.max()), int(kappa))
            prs[j] = np.count_nonzero(pos1 <= kq) / kq
    return ap, prs


def compute_map(ranks: np.ndarray, gnd: Sequence[dict[str, Any]],
                kappas: Sequence[int] = ()) -> dict[str, Any]:
    """mAP and mean P@k over queries; gnd[i] holds 'ok' and optionally 'junk' database indices.

    Returns fractions in [0, 1]: {'mAP', 'aps' (Q,), 'mP' (K,), 'prs' (Q, K), 'num_evaluated'}.
    Queries with no positives get NaN in aps/prs and are left out of the means.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or len(ranks) != len(gnd):
        raise ValueError(f"ranks must be (Q, N) with Q = {len(gnd)} queries, got shape {ranks.shape}")
    aps = np.full(len(gnd), np.nan)
    prs = np.full((len(gnd), len(kappas)), np.nan)
    for i, query in enumerate(gnd):
        ok = np.asarray(query["ok"], dtype=np.int64).reshape(-1)
        if ok.size == 0:
            continue
        junk = np.asarray(query.get("junk", []), dtype=np.int64).reshape(-1)
        aps[i], prs[i] = _query_scores(ranks[i], ok, junk, kappas)
    evaluated = int(np.count_nonzero(~np.isnan(aps)))
    mean_ap = float(np.nansum(aps) / evaluated) if evaluated else float("nan")
    mean_pr = np.nansum(prs, axis=0) / evaluated if evaluated else np.full(len(kappas), np.nan)
    return {"mAP": mean_ap, "aps": aps, "mP": mean_pr, "prs": prs, "num_evaluated": evaluated}


def _ints(query: dict[str, Any], key: str) -> np.ndarray:
    return np.asarray(query.get(key, []), dtype=np.int64).reshape(-1)


def revisited_gnd(gnd: Sequence[dict[str, Any]], setting: str) -> list[dict[str, np.ndarray]]:
    """ok/junk lists of one revisited setting (easy, medium or hard)."""
    out = []
    for q in gnd:
        easy, hard, junk = _ints(q, "easy"), _ints(q, "hard"), _ints(q, "junk")
        if setting == "easy":
            out.append({"ok": easy, "junk": np.concatenate([junk, hard])})
        elif setting == "medium":
            out.append({"ok": np.concatenate([easy, hard]), "junk": junk})
        elif setting == "hard":
            out.append({"ok": hard, "junk": np.concatenate([junk, easy])})
        else:
            raise ValueError(f"unknown revisited setting {setting!r}")
    return out


def protocol_of(gnd: Sequence[dict[str, Any]]) -> str:
    """'revisited' when the entries carry easy/hard lists, else 'old' (ok/junk)."""
    return "revisited" if gnd and "easy" in gnd[0] else "old"


def _summary(result: dict[str, Any], kappas: Sequence[int]) -> dict[str, float]:
    """Plain dict of percentages: {'mAP': .., 'mP@1': .., ...}."""
    out = {"mAP": 100.0 * result["mAP"]}
    out.update({f"mP@{k}": 100.0 * float(p) for k, p in zip(kappas, result["mP"])})
    return out


def evaluate_ranks(ranks: np.ndarray, gnd: Sequence[dict[str, Any]],
                   kappas: Sequence[int] = KAPPAS) -> dict[str, dict[str, float]]:
    """Metrics ×100 per setting: {'easy', 'medium', 'hard'} (revisited) or {'old'}, each
    {'mAP', 'mP@k'...}."""
    if protocol_of(gnd) == "revisited":
        return {s: _summary(compute_map(ranks, revisited_gnd(gnd, s), kappas), kappas)
                for s in REVISITED_SETTINGS}
    old = [{"ok": _ints(q, "ok"), "junk": _ints(q, "junk")} for q in gnd]
    return {OLD_SETTING: _summary(compute_map(ranks, old, kappas), kappas)}


def evaluate_descriptors(db: np.ndarray, queries: np.ndarray, gnd: Sequence[dict[str, Any]],
                         distractors: np.ndarray | None = None,
                         kappas: Sequence[int] = KAPPAS) -> dict[str, dict[str, float]]:
    """Rank (optionally with distractors) and score: db (N, D), queries (Q, D) -> evaluate_ranks."""
    if distractors is None:
        ranks = rank_database(db, queries)
    else:
        ranks = rank_with_distractors(db, distractors, queries)
    return evaluate_ranks(ranks, gnd, kappas)


# ---------------------------------------------------------------- report

_REVISITED_COLUMNS = (("E", "easy", "mAP"), ("M", "medium", "mAP"), ("H", "hard", "mAP"),
                      ("M@10", "medium", "mP@10"), ("H@10", "hard", "mP@10"))
_OLD_COLUMNS = (("mAP", OLD_SETTING, "mAP"), ("mP@10", OLD_SETTING, "mP@10"))
_VARIANT_LABELS = {"raw": "-", "whiten": "Lw"}


def _cell(value: float | None) -> str:
    return "  n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:5.1f}"


def format_table(results: dict[str, dict[str, dict[str, dict[str, dict[str, float]]]]]) -> str:
    """Table 3 of the paper, as text: one row per testing mode (sym/teacher/asym) and whitening
    (-/Lw), per dataset mAP easy/medium/hard and mP@10 medium/hard (old protocol: mAP, mP@10).

    `results[mode][dataset][variant]` is an `evaluate_ranks` dict, variant 'raw' or 'whiten'.
    """
    datasets = list(dict.fromkeys(d for per_mode in results.values() for d in per_mode))
    columns = {}
    for d in datasets:
        sample = next(results[m][d] for m in results if d in results[m])
        settings = next(iter(sample.values()))
        columns[d] = _OLD_COLUMNS if OLD_SETTING in settings else _REVISITED_COLUMNS
    widths = {d: max(len(d), 6 * len(columns[d]) - 1) for d in datasets}
    head = "mode    Lw  " + " | ".join(d.center(widths[d]) for d in datasets)
    sub = " " * 12 + " | ".join(" ".join(f"{c[0]:>5}" for c in columns[d]).rjust(widths[d]) for d in datasets)
    lines = [head, sub, "-" * len(head)]
    for mode, per_mode in results.items():
        variants = list(dict.fromkeys(v for d in per_mode.values() for v in d))
        for variant in variants:
            cells = []
            for d in datasets:
                scores = per_mode.get(d, {}).get(variant)
                row = [_cell(scores[s][k] if scores else None) for _, s, k in columns[d]]
                cells.append(" ".join(row).rjust(widths[d]))
            lines.append(f"{mode:<7} {_VARIANT_LABELS.get(variant, variant):<3} " + " | ".join(cells))
    return "\n".join(line.rstrip() for line in lines)
