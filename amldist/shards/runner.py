"""Run a function over many items, in a process pool or in-process, with a progress bar (`open_runner`
also offers the same over Ray tasks, amldist/shards/ray_runner.py)."""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any, Self

from tqdm import tqdm

from amldist.errors import UserError


def progress_disabled() -> bool:
    return os.environ.get("AMLDIST_NO_PROGRESS") == "1" or not sys.stderr.isatty()


def resolve_workers(workers: int | None) -> int:
    """None → the CPUs this process may use; 0 or 1 → run in-process."""
    if workers is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not isinstance(workers, int) or workers < 0:
        raise UserError(f"workers must be a non-negative integer, got {workers!r}")
    return max(workers, 1)


def batch_size(count: int, workers: int) -> int:
    """Items per hand-out: about 8 per worker over the run, so the last ones do not wait on a big batch."""
    return max(1, min(256, count // (workers * 8)))


def open_runner(workers: int | None = None, ray_workers: int | None = None):
    """A Runner over local processes, or with `ray_workers` one over that many Ray tasks at a time."""
    if ray_workers is None:
        return Runner(resolve_workers(workers))
    if workers is not None:
        raise UserError("choose local worker processes or Ray workers, not both")
    from amldist.shards.ray_runner import RayRunner  # Ray only where the work is spread over it

    return RayRunner(ray_workers)


class Runner:
    """A context manager owning an optional process pool (workers > 1)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = None

    def __enter__(self) -> Self:
        if self.workers > 1:
            self._pool = multiprocessing.get_context().Pool(self.workers)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._pool is None:
            return
        if exc_type is None:
            self._pool.close()
        else:
            self._pool.terminate()  # an error or Ctrl-C: do not wait for queued work
        self._pool.join()
        self._pool = None

    def run(self, fn: Callable[[Any], Any], items: Iterable[Any], *, desc: str, unordered: bool = False,
            amount: Callable[[Any], int] = lambda result: 1, total: int | None = None,
            unit: str = "img") -> list[Any]:
        """[fn(item) for item in items]; with unordered=True the results come in completion order.

        `amount(result)` is how far each result moves the progress bar (of `total`, default len(items)).
        """
        items = list(items)
        if not items:
            return []
        if self._pool is None:
            results = map(fn, items)
        else:
            mapper = self._pool.imap_unordered if unordered else self._pool.imap
            results = mapper(fn, items, chunksize=1 if unordered else batch_size(len(items), self.workers))
        done = []
        with tqdm(total=len(items) if total is None else total, desc=desc, unit=unit,
                  disable=progress_disabled(), leave=False) as bar:
            for result in results:
                done.append(result)
                bar.update(amount(result))
        return done
