"""Validation mAP on the training set's val split (no Ray).

The protocol (ours; cirtorch validates by loss, aml by loss too, and the paper only says the val set
picks the model):
- queries: the distinct query images of the val split's (qidxs, pidxs) pairs;
- database: every val image;
- positives of a query: the other images of its cluster (3D model); the query itself is in the
  database and is marked junk, i.e. removed from its own ranking, so a query never counts as its own
  match (in asym testing its teacher vector would otherwise always rank first);
- sym: student queries against the student database; asym: student queries against the teacher
  database (the teacher's vectors of the val images), the paper's asymmetric testing.
mAP is in percent, like the paper's tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from amldist.evaluate import compute_map, rank_database
from amldist.training.family import tuple_family
from amldist.training.plan import SplitLabels


@dataclass(frozen=True)
class ValidationSet:
    query_ids: np.ndarray  # (Q,) val image ids used as queries
    gnd: list[dict]        # per query: 'ok' (same cluster, not itself), 'junk' (itself)

    @classmethod
    def from_labels(cls, labels: SplitLabels) -> ValidationSet:
        query_ids = np.unique(labels.qidxs)
        gnd = []
        for query in query_ids:
            same = np.flatnonzero(labels.clusters == labels.clusters[query])
            gnd.append({"ok": same[same != query], "junk": np.array([query], np.int64)})
        return cls(query_ids, gnd)

    def mean_ap(self, database: np.ndarray, queries: np.ndarray) -> float:
        """mAP (%) of query vectors (Q, D) ranked against database vectors (N, D), row = image id."""
        ranks = rank_database(np.asarray(database, np.float32), np.asarray(queries, np.float32))  # (Q, N)
        return 100.0 * float(compute_map(ranks, self.gnd)["mAP"])

    def scores(self, student_db: np.ndarray, teacher_db: np.ndarray | None) -> dict[str, float]:
        """{'val_map_sym': ..., 'val_map_asym': ... (with a teacher)} from the student's vectors of
        every val image (N, D) and, optionally, the teacher's (N, D)."""
        queries = student_db[self.query_ids]
        out = {"val_map_sym": self.mean_ap(student_db, queries)}
        if teacher_db is not None:
            out["val_map_asym"] = self.mean_ap(teacher_db, queries)
        return out


def selection_metric(config, has_teacher_store: bool) -> str:
    """The validation score that picks a run's best model (and a search's best trial): asym mAP when the
    student is trained against the teacher's space (asym labelled losses, regression) and the run has the
    teacher's val vectors, else sym mAP; the training loss when the run never validates (run.val_freq 0)."""
    if not config.run.val_freq:
        return "loss"
    return "val_map_asym" if tuple_family(config).asym and has_teacher_store else "val_map_sym"


def higher_is_better(metric: str) -> bool:
    """val mAP rises as a run improves, the loss falls."""
    return metric != "loss"
