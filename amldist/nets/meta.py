"""The description stored with every network, interchangeable with cirtorch's `meta` dict.

cirtorch and budnikm/aml keep a plain dict in each network file: architecture, pooling, mean, std,
outputdim, and the flags local_whitening / regional / whitening (plus an optional precomputed
whitening 'Lw'). `NetMeta` holds the same fields typed, adds `projection_dim` (the student's 1x1
convolution to the teacher's dimension) and keeps every other key in `extra`, so a file read and
written again loses nothing. A student trained in a teacher's space records that teacher in
`extra[TEACHER_KEY]` ({'network_sha256', 'architecture', 'dim', 'network'}, from the teacher's feature
store), which is how a gallery indexed by the teacher recognises its students.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from amldist.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TEACHER_KEY = "teacher"

# Keys with a typed field; anything else in a meta dict (e.g. 'Lw') goes to `extra`.
_TYPED_KEYS = ("architecture", "pooling", "outputdim", "mean", "std", "projection_dim",
               "local_whitening", "regional", "whitening")


@dataclass
class NetMeta:
    architecture: str
    pooling: str
    outputdim: int
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    projection_dim: int | None = None
    local_whitening: bool = False
    regional: bool = False
    whitening: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A cirtorch-compatible meta dict (cirtorch reads the keys it knows and ignores the rest)."""
        meta = {key: getattr(self, key) for key in _TYPED_KEYS}
        meta["mean"], meta["std"] = list(self.mean), list(self.std)
        meta.update(self.extra)
        return meta

    @classmethod
    def from_dict(cls, meta: dict[str, Any], projection_dim: int | None = None) -> NetMeta:
        """Read a cirtorch/aml/amldist meta dict; `projection_dim` fills in files that predate the key."""
        if not isinstance(meta, dict):
            raise UserError(f"network meta must be a dict, found {type(meta).__name__}")
        missing = [key for key in ("architecture", "pooling", "mean", "std") if key not in meta]
        if missing:
            raise UserError(f"network meta lacks the key(s) {', '.join(missing)}")
        stored_projection = meta.get("projection_dim")
        return cls(
            architecture=str(meta["architecture"]),
            pooling=str(meta["pooling"]),
            outputdim=_whole_number(meta.get("outputdim", 0), "outputdim"),
            mean=_three_numbers(meta["mean"], "mean"),
            std=_three_numbers(meta["std"], "std", positive=True),
            projection_dim=(_whole_number(stored_projection, "projection_dim")
                            if stored_projection is not None else projection_dim),
            local_whitening=bool(meta.get("local_whitening", False)),
            regional=bool(meta.get("regional", False)),
            whitening=bool(meta.get("whitening", False)),
            extra={key: value for key, value in meta.items() if key not in _TYPED_KEYS},
        )


def _whole_number(value: Any, key: str) -> int:
    """meta[key] as an int; a damaged file may hold text or a float there (int() would crash or truncate)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or value != int(value) or value < 0):
        raise UserError(f"meta[{key!r}] must be a whole number >= 0, found {value!r:.60}")
    return int(value)


def _three_numbers(value: Any, key: str, positive: bool = False) -> list[float]:
    """meta['mean'] / meta['std']: one finite number per RGB channel (images are normalised per channel)."""
    try:  # text would iterate as characters ('123' -> 1, 2, 3), so only sequences count
        values = [] if isinstance(value, (str, bytes, dict)) else [float(v) for v in value]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        rule = "3 numbers > 0" if positive else "3 finite numbers"
        raise UserError(f"meta[{key!r}] must be {rule} (one per RGB channel), found {value!r:.60}")
    return values
