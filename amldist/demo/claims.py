"""The paper's qualitative claims, read from the demo's own table: each one holds or not, with its numbers.

    claims = check_claims(rows, raw_rows, random_ranking)   # rows: {run key: TableRow}
    lines = format_claims(claims)                           # printed by `amldist demo`, in report.md

(a) the teacher beats the student trained alone in symmetric testing; (b) the Contr+ student beats the
student alone in symmetric testing (knowledge transfer helps); (c) in asymmetric testing the Reg and Contr+
students land near the teacher's own symmetric mAP, Reg at least as high as Contr+; (d) learned whitening
helps asymmetric testing, or at least does not collapse it; (e) the teacher's hard mAP is clearly above the
random-ranking floor. Every claim is checked on each test set (medium setting unless it says hard), with
learned whitening as the paper's Table 3, except (d), which compares with the raw descriptors. No I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from amldist.demo.table import DATASET_LABELS, TableRow

NEAR_FRACTION = 0.9        # (c): "near" = at least 90% of the teacher's symmetric mAP
NO_COLLAPSE_FRACTION = 0.9  # (d): whitened asymmetric mAP keeps at least 90% of the raw one
FLOOR_FACTOR = 2.0         # (e): "clearly above" = at least twice the random ranking's hard mAP


@dataclass(frozen=True)
class Claim:
    letter: str
    statement: str
    holds: bool
    evidence: str          # the numbers it was decided on

    def to_dict(self) -> dict:
        return asdict(self)


def _score(row: TableRow, mode: str, dataset: str, setting: str = "medium") -> float:
    value = row.score(mode, dataset, setting)
    return float("nan") if value is None else value


def _label(dataset: str) -> str:
    return DATASET_LABELS.get(dataset, dataset)


def _per_dataset(datasets: Sequence[str], check) -> tuple[bool, str]:
    """check(dataset) -> (holds, evidence); the claim holds when it holds on every dataset."""
    results = [check(d) for d in datasets]
    evidence = "; ".join(f"{_label(d)}: {text}" for d, (_, text) in zip(datasets, results, strict=True))
    return all(ok for ok, _ in results), evidence


def _beats(winner: TableRow, loser: TableRow, names: tuple[str, str],
           datasets: Sequence[str]) -> tuple[bool, str]:
    def check(d: str) -> tuple[bool, str]:
        a, b = _score(winner, "sym", d), _score(loser, "sym", d)
        return a > b, f"{names[0]} {a:.1f} vs {names[1]} {b:.1f}"
    return _per_dataset(datasets, check)


def _near_teacher(rows: Mapping[str, TableRow], datasets: Sequence[str]) -> tuple[bool, str]:
    def check(d: str) -> tuple[bool, str]:
        teacher = _score(rows["teacher"], "sym", d)
        reg, plus = _score(rows["reg"], "asym", d), _score(rows["contrplus"], "asym", d)
        ok = min(reg, plus) >= NEAR_FRACTION * teacher and reg >= plus
        return ok, f"Reg {reg:.1f}, Contr+ {plus:.1f} vs teacher {teacher:.1f}"
    return _per_dataset(datasets, check)


def _whitening_keeps_asym(rows: Mapping[str, TableRow], raw: Mapping[str, TableRow],
                          datasets: Sequence[str]) -> tuple[bool, str]:
    def check(d: str) -> tuple[bool, str]:
        parts, ok = [], True
        for key, name in (("contrplus", "Contr+"), ("reg", "Reg")):
            white, plain = _score(rows[key], "asym", d), _score(raw[key], "asym", d)
            ok = ok and white >= NO_COLLAPSE_FRACTION * plain
            parts.append(f"{name} {plain:.1f} raw -> {white:.1f} whitened")
        return ok, ", ".join(parts)
    return _per_dataset(datasets, check)


def _teacher_hard(rows: Mapping[str, TableRow], random_ranking: Mapping[str, Mapping[str, float]],
                  datasets: Sequence[str]) -> tuple[bool, str]:
    def check(d: str) -> tuple[bool, str]:
        hard, floor = _score(rows["teacher"], "sym", d, "hard"), random_ranking[d]["hard"]
        return hard >= FLOOR_FACTOR * floor, f"teacher hard {hard:.1f} vs random {floor:.1f}"
    return _per_dataset(datasets, check)


def check_claims(rows: Mapping[str, TableRow], raw_rows: Mapping[str, TableRow],
                 random_ranking: Mapping[str, Mapping[str, float]]) -> list[Claim]:
    """rows / raw_rows: the table with learned whitening / without, by run key ('teacher', 'baseline',
    'contrplus', 'reg'); random_ranking: {dataset: {'medium', 'hard'}} mAP of random rankings."""
    datasets = list(random_ranking)
    checks = [
        ("a", "the teacher beats the student alone in symmetric testing",
         _beats(rows["teacher"], rows["baseline"], ("teacher", "alone"), datasets)),
        ("b", "the Contr+ student beats the student alone in symmetric testing (knowledge transfer helps)",
         _beats(rows["contrplus"], rows["baseline"], ("Contr+", "alone"), datasets)),
        ("c", (f"asymmetric Reg and Contr+ students reach {NEAR_FRACTION:.0%} of the teacher's symmetric "
               "mAP, Reg at least as high as Contr+"), _near_teacher(rows, datasets)),
        ("d", (f"learned whitening keeps at least {NO_COLLAPSE_FRACTION:.0%} of raw asymmetric mAP "
               "(helps, or does not collapse it)"), _whitening_keeps_asym(rows, raw_rows, datasets)),
        ("e", f"the teacher's hard mAP is at least {FLOOR_FACTOR:g}x the random ranking's",
         _teacher_hard(rows, random_ranking, datasets)),
    ]
    return [Claim(letter, statement, holds, evidence) for letter, statement, (holds, evidence) in checks]


def format_claims(claims: Sequence[Claim]) -> list[str]:
    """One line per claim: '(a) holds: ... -- ROxf: ...; RPar: ...'."""
    return [f"({c.letter}) {'holds' if c.holds else 'DOES NOT HOLD'}: {c.statement} -- {c.evidence}"
            for c in claims]
