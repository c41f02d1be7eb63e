"""The paper's claims read from a demo table: each decision follows the numbers, on every test set."""

from __future__ import annotations

import pytest

from amldist.demo.claims import check_claims, format_claims
from amldist.demo.table import TableRow

DATASETS = ("roxford5k", "rparis6k")
FLOOR = {"roxford5k": {"medium": 3.4, "hard": 2.0}, "rparis6k": {"medium": 3.4, "hard": 2.0}}


def _row(run: str, sym: float, asym: float | None = None, hard: float = 10.0,
         per_dataset: dict[str, float] | None = None) -> TableRow:
    scores = {"sym": {d: {"medium": (per_dataset or {}).get(d, sym), "hard": hard} for d in DATASETS}}
    if asym is not None:
        scores["asym"] = {d: {"medium": asym, "hard": hard} for d in DATASETS}
    return TableRow(run=run, student="s", dim=8, teacher=None, labels=True, loss="Contr (4)", mining="hard",
                    asym=asym is not None, scores=scores)


def _table(teacher=60.0, baseline=50.0, contrplus=(55.0, 56.0), reg=(52.0, 58.0), teacher_hard=20.0):
    return {"teacher": _row("t", teacher, hard=teacher_hard), "baseline": _row("b", baseline),
            "contrplus": _row("c", *contrplus), "reg": _row("r", *reg)}


def _verdicts(rows, raw=None) -> dict[str, bool]:
    return {c.letter: c.holds for c in check_claims(rows, raw or rows, FLOOR)}


def test_every_claim_holds_on_a_table_shaped_like_the_papers():
    assert _verdicts(_table()) == dict.fromkeys("abcde", True)


@pytest.mark.parametrize("change, broken", [
    ({"teacher": 49.0}, "a"),                       # teacher below the student alone
    ({"contrplus": (49.0, 56.0)}, "b"),              # transfer did not help
    ({"reg": (52.0, 50.0)}, "c"),                   # Reg asym below 90% of the teacher (54)
    ({"reg": (52.0, 55.0)}, "c"),                   # Reg below Contr+ asym (56)
    ({"teacher_hard": 3.9}, "e"),                   # under twice the random floor (2.0)
])
def test_each_claim_fails_when_its_numbers_say_so(change, broken):
    verdicts = _verdicts(_table(**change))
    assert verdicts[broken] is False
    assert all(ok for letter, ok in verdicts.items() if letter != broken)


def test_whitening_claim_compares_whitened_with_raw_asymmetric_map():
    raw = _table(reg=(52.0, 64.0))                  # whitening took Reg from 64 to 58: kept 90.6%
    assert _verdicts(_table(), raw)["d"] is True
    raw = _table(reg=(52.0, 66.0))                  # 58 of 66 is 87.9%: whitening collapsed it
    assert _verdicts(_table(), raw)["d"] is False


def test_a_claim_must_hold_on_every_test_set():
    rows = _table()
    rows["baseline"] = _row("b", 50.0, per_dataset={"rparis6k": 61.0})  # beats the teacher on RPar only
    assert _verdicts(rows)["a"] is False


def test_lines_give_the_verdict_and_the_numbers_of_each_test_set():
    rows = _table(teacher=49.0)
    lines = format_claims(check_claims(rows, rows, FLOOR))
    assert len(lines) == 5
    assert lines[0].startswith("(a) DOES NOT HOLD:")
    assert "ROxf: teacher 49.0 vs alone 50.0" in lines[0] and "RPar: teacher 49.0 vs alone 50.0" in lines[0]
    assert lines[4].startswith("(e) holds:") and "teacher hard 20.0 vs random 2.0" in lines[4]
