"""One benchmark run and a grid of them: the run cache, resuming, twins made from one training, selection on validation, the rounds rule."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import torch
from quality_data import Dataset
from quality_grid import Config, deployment_twins
from quality_scores import redeploy, run_result, skipped_replies
from run_pool import map_runs

from fedfew_med import checkpoint
from fedfew_med.config import MAX_ROUNDS, FederationConfig
from fedfew_med.rundir import RunDirError
from fedfew_med.simulation import run

log = logging.getLogger(__name__)
IN_PROGRESS = "in-progress"  # <cache>/in-progress/<key>/: the folder of a run not yet finished (resumed by the next grid)

CACHE_VERSION = 3  # 2: FedFew's defaults became preset "default"; 3: the key holds the resolved algorithm options
ROUNDS_GAIN = 0.01  # rounds are enough when doubling them gains FedAvg less than this on the validation mean


def algorithm_options(config: FederationConfig) -> dict[str, Any]:
    """The algorithm's options as resolved (a preset's values filled in): what a run actually used."""
    import dataclasses

    from fedfew_med.algorithms import build_algorithm

    options = build_algorithm(config.algorithm.name, config.algorithm.params).options  # type: ignore[attr-defined]
    return dataclasses.asdict(options)


def cache_key(dataset: Dataset, config: FederationConfig) -> str:
    """What a run's result depends on: the data set (its sites), the whole run config and the algorithm's
    resolved options (so a preset whose values change does not reuse runs made with the old values).

    A run that evaluates only at its end is keyed with ``eval_every = 10**6``, however it is
    written, as the first cached runs were (before [run].eval_every was bounded).
    """
    resolved = config.identity()  # the resolved config without where it ran (device) and the defaults added since v3
    if resolved["run"]["eval_every"] >= resolved["run"]["rounds"]:
        resolved["run"]["eval_every"] = 10**6
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    blob = json.dumps({"version": CACHE_VERSION, "dataset": dataset.name,
                       "sites": [(s.name, s.size("train"), s.size("val"), s.size("test")) for s in dataset.sites],
                       "meta": dataset.meta, "config": digest, "options": algorithm_options(config), "torch": torch.__version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def run_config(dataset: Dataset, cfg: Config, seed: int) -> FederationConfig:
    """The whole config of one run (``cfg`` on ``seed``), evaluated only at its end; :func:`cache_key` keys it."""
    return dataset.with_overrides([*cfg.overrides, f"run.seed={seed}", f"run.eval_every={MAX_ROUNDS}"])


def cache_file(cache: Path, dataset: Dataset, config: FederationConfig) -> Path:
    """Where the run cache keeps the result of the run ``config`` (``<cache>/<key>.json``, key: :func:`cache_key`)."""
    return cache / f"{cache_key(dataset, config)}.json"


class Pace:
    """A grid's progress: runs made of those the cache did not hold, and the time the rest take at the pace so far.

    The estimate is the mean ``seconds`` of the runs made so far × the runs left ÷ the ``lanes`` that run
    side by side (``--jobs``): each run's own time, so the first runs of two lanes are not charged the time
    the other lane was busy. It assumes the runs left cost what the runs made did on average (FedFew's K
    local trainings make its runs about K times a FedAvg run): an estimate, not a promise.
    """

    def __init__(self, to_make: int, lanes: int = 1) -> None:
        self.to_make, self.lanes, self.made, self.seconds = to_make, max(lanes, 1), 0, 0.0

    def step(self, result: dict[str, Any]) -> str | None:
        """Count ``result``; the progress line to log after a run that was made (None for a cached one)."""
        if result.get("cached"):
            return None
        self.made += 1
        self.seconds += float(result["seconds"])
        left = max(self.to_make - self.made, 0)
        eta = self.seconds / self.made * left / self.lanes
        return f"{self.made}/{self.to_make} runs made" + (f", about {duration(eta)} left at this pace" if left else "")


def duration(seconds: float) -> str:
    """``seconds`` for a reader: ``45 s``, ``12 min``, ``3 h 05 min``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def run_one(dataset: Dataset, cfg: Config, seed: int, tmp: Path, cache: Path | None = None,
            twins: Sequence[Config] = ()) -> dict[str, Any]:
    """One run: test summary, per-site test and validation metrics, bytes per round, wall time.

    With ``cache``, a finished run's result is kept as ``<cache>/<key>.json`` (key: :func:`cache_key`)
    and reused, so a benchmark stopped after some configurations continues where it stopped, and
    several invocations with disjoint ``--methods`` can share the work. A run in progress lives in
    ``<cache>/in-progress/<key>/`` (checkpointed every round, removed once its result is cached), so a
    benchmark stopped mid-run resumes that run at its last completed round, with the same result as an
    uninterrupted run (``seconds`` then adds the recorded times of the rounds run before the stop, and
    ``resumed_after_round`` says where it went on). Without a cache the run's folder is in ``tmp``.

    ``twins``: configurations that train exactly as ``cfg`` and only deploy otherwise (``fedfew_ft`` at
    FedFew's μ and lr, FedAvg + FT at FedAvg's lr: :func:`quality_grid.deployment_twins`). When ``cfg`` is
    run, each twin's result is made from the same training, its own deployment applied to the final
    checkpoint (:func:`quality_scores.redeploy`), and cached under the twin's own key, so a grid trains once for them all.
    """
    config = run_config(dataset, cfg, seed)
    cached = cache_file(cache, dataset, config) if cache is not None else None
    if cached is not None and cached.is_file():
        return {**json.loads(cached.read_text()), "cached": True}
    # with a cache, the run's folder outlives the process: a grid stopped mid-run resumes the run at its last round
    run_dir = (cache / IN_PROGRESS if cache is not None else tmp) / cache_key(dataset, config)
    t = time.perf_counter()
    resumed = checkpoint.latest_round(run_dir) if run_dir.is_dir() else None
    try:
        result = run(config, run_dir=run_dir, sites=dataset.sites, resume=resumed is not None, overwrite=True)
    except RunDirError as exc:  # a checkpoint it cannot continue (damaged, say): start the run again
        log.warning("%s %s seed %d: %s; running it from round 0", cfg.method, cfg.setting, seed, exc)
        resumed = None
        result = run(config, run_dir=run_dir, sites=dataset.sites, overwrite=True)
    records = _records(run_dir)  # every round's record, those before a resume too
    new = {r["round"] for r in result.records}
    earlier = sum(r["seconds"] for r in records if r["round"] not in new)  # the rounds a stopped process ran
    out = run_result(dataset, config, run_dir, result.summary, records, time.perf_counter() - t + earlier)
    if resumed is not None:
        out["resumed_after_round"] = resumed
    if cache is not None and cached is not None:
        _keep(cached, out)
        for twin in twins:
            twin_config = run_config(dataset, twin, seed)
            twin_file = cache_file(cache, dataset, twin_config)
            if twin_file.is_file():
                continue
            try:
                made = redeploy(dataset, twin_config, run_dir, records, out["seconds"])
            except Exception as exc:  # the twin is then run on its own, as any run missing from the cache
                log.warning("%s %s seed %d: not made from %s's training (%s: %s); it will run on its own",
                            twin.method, twin.setting, seed, cfg.method, type(exc).__name__, exc)
                continue
            _keep(twin_file, {**made, "training_of": cached.stem})
        shutil.rmtree(run_dir)  # its result and its twins' are cached: the folder has served
        (run_dir.parent / f".{run_dir.name}.lock").unlink(missing_ok=True)  # the simulator's lock file
    return out


def _records(run_dir: Path) -> list[dict[str, Any]]:
    """The round records of ``run_dir`` (``metrics.jsonl``), in order."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]


def _keep(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` to the run cache at ``path``, atomically (a killed benchmark never leaves half a result)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    part.write_text(json.dumps(result) + "\n")  # without a "cached" flag: only reuse sets it
    os.replace(part, path)


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    means = [r["mean"] for r in runs]
    return {
        "mean": statistics.fmean(means),
        "mean_std_over_seeds": statistics.pstdev(means) if len(means) > 1 else 0.0,
        "worst": statistics.fmean(r["worst"] for r in runs),
        "jain": statistics.fmean(r["jain"] for r in runs),
        "val_mean": statistics.fmean(r["val_mean"] for r in runs),
        "bytes_per_round": statistics.fmean(r["bytes_per_round"] for r in runs),
        "seconds_per_run": statistics.fmean(r["seconds"] for r in runs),
    }


def run_many(dataset: Dataset, tasks: Sequence[tuple[Config, int]], cache: Path | None, *, jobs: int = 1,
             threads: int = 1, twins: Mapping[Config, Sequence[Config]] | None = None) -> Generator[dict[str, Any], None, None]:
    """:func:`run_one` for each (configuration, seed), in ``jobs`` forked processes (:mod:`run_pool`), in task order.

    ``twins`` maps a configuration to the one whose result its training also gives (:func:`run_one`).
    The runs' folders live in one temporary folder, removed when the generator is exhausted or closed.
    """
    pairs = twins or {}
    with tempfile.TemporaryDirectory() as tmp:
        yield from map_runs(lambda task: run_one(dataset, task[0], task[1], Path(tmp), cache, pairs.get(task[0], ())), tasks,
                            jobs=jobs, threads=threads)


def run_grid(dataset: Dataset, grid: Sequence[Config], seeds: Sequence[int], log: Callable[[str], None],
             cache: Path | None = None, *, jobs: int = 1, threads: int = 1) -> dict[str, Any]:
    """Every configuration on every seed; per method the configuration with the best validation mean.

    With ``jobs`` > 1 the runs go to that many forked processes (:mod:`run_pool`), ``threads`` torch
    threads each; the results, and so the tables, are the same as in one process.
    """
    by_config: dict[Config, dict[str, Any]] = {}
    tasks = [(cfg, seed) for cfg in grid for seed in seeds]
    twins = deployment_twins(grid) if cache is not None else {}  # a twin's result goes through the cache
    held = {(c, s) for c, s in tasks if cache is not None and cache_file(cache, dataset, run_config(dataset, c, s)).is_file()}
    made_from = {twin: base for base, group in twins.items() for twin in group}
    shared = [(c, s) for c, s in tasks if (c, s) not in held and c in made_from and (made_from[c], s) not in held]
    pace = Pace(len(tasks) - len(held) - len(shared), lanes=jobs)
    log(f"{len(tasks)} runs: {len(held)} in the run cache, {len(shared)} to come from another row's training "
        f"(fedfew_ft from FedFew's, FedAvg + FT from FedAvg's), {pace.to_make} to make")
    with closing(run_many(dataset, tasks, cache, jobs=jobs, threads=threads, twins=twins)) as results:
        for i, cfg in enumerate(grid):
            runs = []
            for seed in seeds:
                runs.append(next(results))
                line = pace.step(runs[-1])
                if line is not None:
                    log(f"  {cfg.method} {cfg.setting} seed {seed}: {runs[-1]['seconds']:.0f} s; {line}")
            by_config[cfg] = {**aggregate(runs), "per_seed": runs}
            row = by_config[cfg]
            log(f"[{i + 1}/{len(grid)}] {cfg.method:<12} {cfg.setting:<20} test {row['mean']:.3f} ± {row['mean_std_over_seeds']:.3f} "
                f"worst {row['worst']:.3f} val {row['val_mean']:.3f} ({row['seconds_per_run']:.1f} s/run)")
    methods: dict[str, Any] = {}
    for cfg, row in by_config.items():
        best = methods.get(cfg.method)
        if best is None or row["val_mean"] > best["val_mean"]:
            methods[cfg.method] = {**row, "selected": cfg.setting}
    for name, row in methods.items():
        row["grid"] = {c.setting: {"test_mean": r["mean"], "val_mean": r["val_mean"], "worst": r["worst"],
                                   "skipped": skipped_replies(r["per_seed"])}
                       for c, r in by_config.items() if c.method == name}
        mine = [(c, x) for c, r in by_config.items() if c.method == name for x in r["per_seed"]]
        # a twin's seconds include the training the run it was made from already counts: counted once here
        row["run_seconds"] = sum(x["seconds"] - _base_seconds(by_config, made_from, c, x) for c, x in mine)
        row["cached_runs"] = sum((c, x["seed"]) in held for c, x in mine)
        row["shared_training_runs"] = sum("training_of" in x for _, x in mine)
    return methods


def _base_seconds(by_config: Mapping[Config, dict[str, Any]], made_from: Mapping[Config, Config], cfg: Config,
                  result: dict[str, Any]) -> float:
    """The training seconds inside ``result`` (a run of ``cfg``) that the run it was made from already counts, else 0."""
    base = by_config.get(made_from[cfg]) if "training_of" in result and cfg in made_from else None
    same_seed = [b["seconds"] for b in base["per_seed"] if b["seed"] == result["seed"]] if base else []
    return same_seed[0] if same_seed else 0.0


def rounds_check(dataset: Dataset, seeds: Sequence[int], cache: Path | None, log: Callable[[str], None], *,
                 jobs: int = 1, threads: int = 1) -> dict[str, Any]:
    """The rounds rule: FedAvg (the data set's lr) at R and 2R rounds; R is enough when 2R gains < 1 point of validation.

    Only validation is looked at. Runs are cached like every other run (``jobs``: as in :func:`run_grid`).
    """
    rounds = dataset.config.run.rounds
    base = ("algorithm.name='fedavg'", "algorithm.params={}")
    # 2R first: the longest runs start first when they run side by side
    tasks = [(Config("rounds check", f"rounds={r}", (*base, f"run.rounds={r}")), s) for r in (2 * rounds, rounds) for s in seeds]
    vals = [r["val_mean"] for r in run_many(dataset, tasks, cache, jobs=jobs, threads=threads)]
    at = {2 * rounds: vals[:len(seeds)], rounds: vals[len(seeds):]}
    v1, v2 = statistics.fmean(at[rounds]), statistics.fmean(at[2 * rounds])
    out = {"rounds": rounds, "fedavg_val_mean": v1, "fedavg_val_mean_2x": v2, "gain": v2 - v1, "threshold": ROUNDS_GAIN,
           "flat": v2 - v1 < ROUNDS_GAIN, "seeds": list(seeds)}
    log(f"rounds check: FedAvg validation mean {v1:.3f} at {rounds} rounds, {v2:.3f} at {2 * rounds}: "
        f"{'flat' if out['flat'] else 'NOT flat'} (gain {v2 - v1:+.3f}, rule < {ROUNDS_GAIN})")
    return out
