"""The per-image state of an import as flat arrays, and the decisions taken over all images at once
(duplicates, landmarks with too few images)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from amldist.datasets.importing import checks
from amldist.datasets.importing.output import hex_ids

MAX_LANDMARKS_NAMED = 3


@dataclass
class ImageState:
    landmark: np.ndarray  # (N,) int64, the cluster id of each listed image
    status: np.ndarray  # (N,) int8, checks.OK or why the image is left out
    digest: np.ndarray  # (N, 16) uint8, BLAKE2b-128 of the file's bytes
    nbytes: np.ndarray  # (N,) int64
    details: dict[int, str] = field(default_factory=dict)  # index -> detail of a skip (few entries)
    split_of: dict[str, np.ndarray] = field(default_factory=dict)  # split -> indices of its images

    @classmethod
    def for_source(cls, source) -> ImageState:
        count = len(source)
        return cls(np.asarray(source.landmark, np.int64), np.zeros(count, np.int8),
                   np.zeros((count, checks.DIGEST_BYTES), np.uint8), np.zeros(count, np.int64))

    def take(self, first: int, result: checks.CheckResult) -> None:
        """Store the result of the check job that began at image `first`."""
        last = first + len(result.status)
        self.status[first:last] = result.status
        self.digest[first:last] = result.digest
        self.nbytes[first:last] = result.nbytes
        self.details.update({first + k: text for k, text in result.details.items()})

    @cached_property
    def hex(self) -> np.ndarray:
        """(N,) 'S32': the cid of each image (valid once the check pass is over)."""
        return hex_ids(self.digest)

    def kept(self) -> np.ndarray:
        return np.flatnonzero(self.status == checks.OK)

    def cids(self, positions: np.ndarray) -> list[str]:
        return [h.decode() for h in self.hex[positions]]

    def reason_counts(self) -> dict[str, int]:
        counts = np.bincount(self.status, minlength=len(checks.REASON_KEYS) + 1)
        return {key: int(counts[status]) for status, key in checks.REASON_KEYS.items()}

    def mark_duplicates(self, source) -> None:
        """Same bytes twice: within one landmark keep the first listed copy; across landmarks the image
        would be a positive of one and a negative of the other, so drop every copy."""
        ok = self.kept()
        if len(ok) < 2:
            return
        halves = np.ascontiguousarray(self.digest[ok]).view(np.uint64).reshape(-1, 2)
        order = np.lexsort((ok, halves[:, 1], halves[:, 0]))  # by digest, then listing order
        rows, members = halves[order], ok[order]
        new_group = np.r_[True, np.any(rows[1:] != rows[:-1], axis=1)]
        starts = np.flatnonzero(new_group)
        sizes = np.diff(np.r_[starts, len(members)])
        for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
            self._resolve_group(source, members[start:start + size])

    def _resolve_group(self, source, group: np.ndarray) -> None:
        labels = sorted({source.landmark_label(int(c)) for c in self.landmark[group]})
        if len(labels) == 1:
            first = source.names(group[:1])[0]
            for index in group[1:]:
                self.status[index] = checks.DUPLICATE
                self.details[int(index)] = f"same bytes as {first}"
            return
        more = ", ..." if len(labels) > MAX_LANDMARKS_NAMED else ""
        shown = ", ".join(labels[:MAX_LANDMARKS_NAMED]) + more
        for index in group:
            self.status[index] = checks.CONFLICT
            self.details[int(index)] = f"same bytes in landmarks {shown}"

    def mark_small_landmarks(self, least: int) -> int:
        """Leave out every image of a landmark with fewer than `least` kept images; returns how many."""
        ok = self.kept()
        _, inverse, counts = np.unique(self.landmark[ok], return_inverse=True, return_counts=True)
        small = ok[counts[inverse] < least]
        self.status[small] = checks.SMALL_LANDMARK
        return len(small)
