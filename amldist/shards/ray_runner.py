"""`Runner`'s interface over Ray tasks: the same functions on the same items, spread over a Ray cluster.

Items go out in batches (one task per batch, as the process pool sends chunks), at most `workers` tasks
in flight, each task one CPU; results come back in item order (or completion order when `unordered`).
On a cluster every node must see the data root and the output folder at the same paths (shared storage).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Self

import ray
from tqdm import tqdm

from amldist.errors import UserError
from amldist.ray_session import ensure_ray
from amldist.shards.runner import batch_size, progress_disabled


@ray.remote(num_cpus=1)
def _apply(fn: Callable[[Any], Any], batch: list[Any]) -> list[Any]:
    return [fn(item) for item in batch]


class RayRunner:
    """A context manager that joins (or starts, then stops) Ray and runs batches of items as Ray tasks."""

    def __init__(self, workers: int):
        if not isinstance(workers, int) or workers < 1:
            raise UserError(f"Ray workers must be a positive integer, got {workers!r}")
        self.workers = workers
        self._started = False

    def __enter__(self) -> Self:
        self._started = ensure_ray(self.workers)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._started:
            ray.shutdown()
            self._started = False

    def run(self, fn: Callable[[Any], Any], items: Iterable[Any], *, desc: str, unordered: bool = False,
            amount: Callable[[Any], int] = lambda result: 1, total: int | None = None,
            unit: str = "img") -> list[Any]:
        """[fn(item) for item in items], computed by Ray tasks; see `Runner.run`."""
        items = list(items)
        if not items:
            return []
        size = 1 if unordered else batch_size(len(items), self.workers)
        batches = [items[i:i + size] for i in range(0, len(items), size)]
        fn_ref = ray.put(fn)
        slots: list[list[Any] | None] = [None] * len(batches)
        done: list[Any] = []
        pending: dict[Any, int] = {}
        next_batch = 0
        with tqdm(total=len(items) if total is None else total, desc=desc, unit=unit,
                  disable=progress_disabled(), leave=False) as bar:
            while next_batch < len(batches) or pending:
                while next_batch < len(batches) and len(pending) < self.workers:
                    pending[_apply.remote(fn_ref, batches[next_batch])] = next_batch
                    next_batch += 1
                ready, _ = ray.wait(list(pending), num_returns=1)
                number = pending.pop(ready[0])
                slots[number] = ray.get(ready[0])
                done += slots[number]
                bar.update(sum(amount(result) for result in slots[number]))
        return done if unordered else [result for batch in slots for result in batch]
