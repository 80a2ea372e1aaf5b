"""Sites of an in-process simulation computed in N worker processes (``simulate --workers N``).

Each worker is a fork of the simulating process taken once the federation is built, so it
holds the sites' data, the network and the algorithm without copying them through a pipe.
Per round, a job carries what changes: the round's broadcast, the models sent to the site and
the site's state; the worker returns the site's reply and its would-be new state, and the
parent validates, commits and aggregates them **in the sequential order of the sites**, so a
run with workers gives the sequential run's numbers to the bit (at the same threads per
process) and its memory stays flat in M: at most ``2 · N`` site jobs and results are held at once.

Threads: the process's torch threads (``[run].threads``, else torch's default) are split
between the workers (``max(1, threads // N)`` each).

Not combined with DP sites (their ledgers are spent where the site trains, and must be spent
in the parent's copy) nor with ``[faults].site_timeout_s`` (a worker cannot be stopped and
handed the next site): :func:`check_workers` refuses both with a ConfigError. Layer 3.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from fedfew_med.algorithms import Params, RoundInfo, SiteReply
from fedfew_med.config import ConfigError, FederationConfig
from fedfew_med.training import SiteState

if TYPE_CHECKING:
    from fedfew_med.runtime import SiteRuntime

# The worker's own copy of the site runtimes, set once by the pool initializer in each worker
# process (inherited through fork, never pickled); the parent process never sets it.
_SITES: Mapping[str, SiteRuntime] = {}


def check_workers(config: FederationConfig, workers: int, *, private_sites: Sequence[str]) -> None:
    """Refuse a worker count that cannot give the sequential result (ConfigError naming the reason)."""
    if workers < 1:
        raise ConfigError(f"--workers must be an integer >= 1, got {workers}")
    if workers == 1:
        return
    if private_sites:
        raise ConfigError(f"{config.source}: --workers {workers} cannot run DP sites ({', '.join(private_sites)}): "
                          "their privacy ledgers are spent where they train; run with --workers 1")
    if config.faults.site_timeout_s > 0:
        raise ConfigError(f"{config.source}: --workers {workers} cannot bound a site's round by [faults].site_timeout_s "
                          f"= {config.faults.site_timeout_s:g} (a worker process cannot be stopped mid-round); "
                          "set it to 0 or run with --workers 1")


def _init(sites: Mapping[str, SiteRuntime], threads: int) -> None:
    global _SITES
    _SITES = sites
    torch.set_num_threads(threads)


def _train(job: tuple[str, RoundInfo, Mapping[int, Params], SiteState]) -> tuple[SiteReply, SiteState] | Exception:
    site, info, sent, state = job
    runtime = _SITES[site]
    runtime.state = state
    try:
        return runtime.compute(info, sent)
    except Exception as exc:  # handed back: the parent records it as the site's failure for the round
        return exc


def _evaluate(job: tuple[str, Sequence[Params], int, SiteState]) -> dict[str, Any] | Exception:
    site, models, round_idx, state = job
    runtime = _SITES[site]
    runtime.state = state
    try:
        return runtime.evaluate(models, round_idx)
    except Exception as exc:
        return exc


class SitePool:
    """N forked workers computing site rounds and evaluations; results come back in submission order.

    Parameters
    ----------
    sites
        The federation's site runtimes (the workers' copies are taken at construction).
    workers
        Number of processes (>= 2).
    threads
        Torch threads of this process, split between the workers.
    """

    def __init__(self, sites: Mapping[str, SiteRuntime], workers: int, *, threads: int) -> None:
        self.workers = workers
        self.threads_per_worker = max(1, threads // workers)
        context = multiprocessing.get_context("fork")  # the workers inherit the data; nothing is pickled at start
        self._pool: multiprocessing.pool.Pool = context.Pool(workers, initializer=_init, initargs=(sites, self.threads_per_worker))

    def _ordered(self, fn: Callable[[Any], Any], jobs: Iterator[tuple[Any, ...]]) -> Iterator[tuple[str, Any]]:
        """``(site, result or exception)`` in job order, with at most ``2 · workers`` jobs submitted and unread.

        Twice the workers: a worker that finishes a short site picks the next job while the
        parent still waits for a long one at the head of the order (sites differ in size).
        """
        pending: deque[tuple[str, multiprocessing.pool.AsyncResult[Any]]] = deque()

        def submit() -> None:
            job = next(jobs, None)
            if job is not None:  # a job's first item is its site
                pending.append((job[0], self._pool.apply_async(fn, (job,))))

        for _ in range(2 * self.workers):
            submit()
        while pending:
            site, result = pending.popleft()
            value = result.get()
            submit()
            yield site, value

    def train(self, jobs: Iterator[tuple[str, RoundInfo, Mapping[int, Params], SiteState]]
              ) -> Iterator[tuple[str, tuple[SiteReply, SiteState] | Exception]]:
        """Each job's ``SiteRuntime.compute`` result, or the exception it raised, in job order."""
        return self._ordered(_train, jobs)

    def evaluate(self, jobs: Iterator[tuple[str, Sequence[Params], int, SiteState]]
                 ) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
        """Each job's ``SiteRuntime.evaluate`` entry, or the exception it raised, in job order."""
        return self._ordered(_evaluate, jobs)

    def close(self) -> None:
        """Stop the workers (waits for nothing: every result has been read)."""
        self._pool.terminate()
        self._pool.join()
