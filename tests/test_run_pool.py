"""benchmarks/run_pool.py: a grid's runs in forked processes give the one-process results, in task order."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_pool import map_runs  # noqa: E402


def seeded_run(task: tuple[int, int]) -> tuple[int, float, int, int]:
    """A stand-in for one run: a seeded computation, plus where and at how many threads it ran."""
    seed, size = task
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, size, generator=g, dtype=torch.float64)
    return seed, float((x @ x.T).trace()), os.getpid(), torch.get_num_threads()


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_results_come_back_in_task_order_and_equal_one_process(jobs: int) -> None:
    tasks = [(seed, 40 - 4 * seed) for seed in range(8)]  # later tasks are smaller: they finish first with workers
    serial = [seeded_run(t)[:2] for t in tasks]  # the reference: a plain loop in this process
    out = list(map_runs(seeded_run, tasks, jobs=jobs, threads=1))
    assert [r[:2] for r in out] == serial  # same figures to the bit, in the order of the tasks
    pids = {r[2] for r in out}
    assert (pids == {os.getpid()}) if jobs == 1 else (os.getpid() not in pids)
    if jobs > 1:
        assert {r[3] for r in out} == {1}  # each worker at the threads asked for


def test_a_closure_over_unpicklable_state_reaches_the_workers() -> None:
    weights = torch.arange(6.0)
    unpicklable = lambda i: float(weights[i] * 2)  # noqa: E731  (a lambda: pickle refuses it; fork inherits it)
    assert list(map_runs(unpicklable, range(6), jobs=2)) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]


def fails_on_three(i: int) -> int:
    if i == 3:
        raise RuntimeError(f"run {i} failed")
    return i


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failed_run_raises_in_the_caller_after_the_earlier_results(jobs: int) -> None:
    seen: list[int] = []
    with pytest.raises(RuntimeError, match="run 3 failed"):
        for r in map_runs(fails_on_three, range(6), jobs=jobs):
            seen.append(r)
    assert seen == [0, 1, 2]


def test_jobs_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="--jobs must be an integer >= 1, got 0"):
        list(map_runs(seeded_run, [(0, 2)], jobs=0))
