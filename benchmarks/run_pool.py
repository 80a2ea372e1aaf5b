"""A benchmark grid's independent runs in N forked processes (``quality.py --jobs N``).

A grid is many runs that share nothing but the data: each (configuration, seed) run builds its own
federation from its own seed. On the 2-core machine one run at one torch thread leaves a core idle, and
two threads per run are slower than one (``quality.py --threads``), so two runs side by side, one thread
each, use both cores (Br35H 4 sites α 0.1 at 80 rounds: 254 min of run time in about 2 h 5 min of wall time
with two lanes). Each worker is a fork of the benchmark taken after the data set is
loaded, so it holds the sites' data without copying them through a pipe; a task is a small tuple, a
result a metrics dict of about 1 kB.

The results come back **in the order of the tasks** (:meth:`multiprocessing.pool.Pool.imap`), whatever
order the runs finish in, and each run is the same computation as in one process (same seed, same thread
count), so a grid gives the same figures at any ``jobs`` on one machine. A failed run raises in the
parent, as it would in one process; the runs already finished stay in the run cache.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Generator, Iterable
from typing import Any, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

# The worker's run function, set once by the pool initializer in each worker process (inherited through
# fork, never pickled, so it may be a closure over the data set); the parent process never sets it.
_RUN: Callable[[Any], Any] | None = None


def _init(run: Callable[[Any], Any], threads: int) -> None:
    global _RUN
    _RUN = run
    torch.set_num_threads(threads)


def _call(task: Any) -> Any:
    assert _RUN is not None, "run_pool worker used before its initializer ran"
    return _RUN(task)


def map_runs(run: Callable[[T], R], tasks: Iterable[T], *, jobs: int = 1, threads: int = 1) -> Generator[R, None, None]:
    """``run(task)`` for every task, in ``jobs`` forked processes of ``threads`` torch threads each.

    Parameters
    ----------
    run
        One run: a task (e.g. a configuration and a seed) to its result. Called in the workers; with
        ``jobs = 1`` in this process, lazily, as the iterator is consumed.
    tasks
        The runs to make, in the order their results are wanted.
    jobs
        Worker processes (≥ 1). Each takes the next task as it finishes one.
    threads
        Torch intra-op threads of each worker.

    Yields
    ------
    The results in the order of ``tasks``. Close the generator (``contextlib.closing``) to stop the
    workers as soon as the last result is read, or early.
    """
    if jobs < 1:
        raise ValueError(f"--jobs must be an integer >= 1, got {jobs}")
    if jobs == 1:
        yield from map(run, tasks)
        return
    pool = multiprocessing.get_context("fork").Pool(jobs, initializer=_init, initargs=(run, threads))
    try:
        yield from pool.imap(_call, tasks, chunksize=1)  # chunksize 1: runs take minutes, hand them out one by one
        pool.close()
    finally:
        pool.terminate()  # stopped or failed: do not leave runs going after the benchmark has gone
        pool.join()
