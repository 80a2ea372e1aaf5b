"""Federation-level views of one or more runs, read from their records (no recomputation).

Everything here comes from ``metrics.jsonl`` and ``summary.json``: the model every site
used in every evaluated round, the per-site deployed metric of each method, the worst
site and Jain's index, and the privacy budget spent per site when the records carry it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfew_med.evaluation.run import Run
from fedfew_med.evaluation.table import Table
from fedfew_med.metrics import summarize

OWN_MODEL = -1
"""Code in :attr:`ModelUse.models` for a site-local model (Local, Ditto's personal model)."""


@dataclass(frozen=True)
class ModelUse:
    """Which model each site deployed in each round.

    Attributes
    ----------
    rounds
        Round numbers (R,).
    sites
        Site names (S,).
    models
        (S, R) server-model index; :data:`OWN_MODEL` for a site-local model; ``-2`` where the
        round's record has no assignment for the site.
    num_models
        K of the run.
    note
        The run's one-line verdict on model use (``summary.json``'s ``model_use.note``: how many
        of the K models the sites deploy, whether the K models collapsed into one, re-seeds).
    """

    rounds: np.ndarray
    sites: list[str]
    models: np.ndarray
    num_models: int
    note: str = ""

    def switches(self) -> dict[str, int]:
        """How many times each site changed model between consecutive recorded rounds."""
        return {s: int(np.count_nonzero(np.diff(row))) for s, row in zip(self.sites, self.models, strict=True)}

    def table(self) -> Table:
        """Per site: the model deployed in the last recorded round and how often the site switched."""
        switches = self.switches()
        rows = [[s, _model_name(int(row[-1])) if row.size else "-", switches[s]] for s, row in zip(self.sites, self.models, strict=True)]
        title = "model use over the rounds" + (f": {self.note}" if self.note else "")
        return Table(["site", "model in the last round", "switches"], rows, title=title)


def _model_name(code: int) -> str:
    return {OWN_MODEL: "own model", -2: "not recorded"}.get(code, f"model {code}")


def model_use(run: Run) -> ModelUse:
    """The deployed model per site per round, from the records' ``assignments``."""
    rounds = np.asarray([r["round"] for r in run.records], dtype=np.int64)
    models = np.full((len(run.sites), len(rounds)), -2, dtype=np.int64)
    for j, rec in enumerate(run.records):
        for i, site in enumerate(run.sites):
            if site in rec.get("assignments", {}):
                k = rec["assignments"][site]
                models[i, j] = OWN_MODEL if k is None else int(k)
    note = str(run.summary.get("model_use", {}).get("note", ""))
    return ModelUse(rounds, run.sites, models, run.num_models, note)


@dataclass(frozen=True)
class MethodMetrics:
    """One metric of every site under every method (the deployed model on the test split).

    Attributes
    ----------
    metric
        Metric name.
    methods
        Run labels (M,).
    sites
        Site names (S,), the union over runs.
    values
        (M, S); NaN where a run lacks the site or the metric.
    """

    metric: str
    methods: list[str]
    sites: list[str]
    values: np.ndarray

    def table(self) -> Table:
        """Sites as rows, methods as columns."""
        rows = [[s, *[float(v) for v in self.values[:, j]]] for j, s in enumerate(self.sites)]
        return Table(["site", *self.methods], rows, title=f"{self.metric} of each site's deployed model")


def metric_by_method(runs: Mapping[str, Run], metric: str | None = None) -> MethodMetrics:
    """Per-site ``metric`` (default: the task's headline metric) for every run, as recorded."""
    if not runs:
        raise ValueError("metric_by_method needs at least one run")
    tasks = {r.task for r in runs.values()}
    if len(tasks) > 1:
        raise ValueError(f"runs mix tasks {sorted(tasks)}; compare runs of one task")
    name = metric or next(iter(runs.values())).metric
    sites = sorted({s for r in runs.values() for s in r.sites})
    values = np.full((len(runs), len(sites)), np.nan)
    for i, r in enumerate(runs.values()):
        final = r.final_metrics()
        for j, s in enumerate(sites):
            if s in final and name in final[s]:
                values[i, j] = float(final[s][name])
    return MethodMetrics(name, list(runs), sites, values)


def fairness(runs: Mapping[str, Run], metric: str | None = None) -> Table:
    """Mean, worst site, best and Jain's index ``(Σ a)² / (M Σ a²)`` of ``metric`` for every run."""
    mm = metric_by_method(runs, metric)
    rows: list[list[Any]] = []
    for i, label in enumerate(mm.methods):
        per_site = {s: float(v) for s, v in zip(mm.sites, mm.values[i], strict=True) if not math.isnan(v)}
        summ = summarize(per_site)
        worst = min(per_site, key=lambda s: (per_site[s], s)) if per_site else None
        rows.append([label, summ["mean"], summ["worst"], worst, summ["best"], summ["jain"]])
    return Table(["run", f"mean {mm.metric}", "worst site value", "worst site", "best site value", "Jain's index"], rows,
                 title=f"{mm.metric}: average, worst-served site and fairness",
                 notes=("Jain's index is 1 when every site gets the same value and 1/M when one site gets everything.",))


@dataclass(frozen=True)
class History:
    """A run's headline metric over the evaluated rounds.

    Attributes
    ----------
    metric
        Metric name.
    rounds
        (R,) round numbers.
    sites
        (S,) site names.
    per_site
        (S, R) each site's deployed metric; NaN where not recorded.
    mean, worst, jain
        (R,) the federation summary of each round.
    """

    metric: str
    rounds: np.ndarray
    sites: list[str]
    per_site: np.ndarray
    mean: np.ndarray
    worst: np.ndarray
    jain: np.ndarray


def history(run: Run, metric: str | None = None) -> History:
    """Per-site ``metric`` and its mean / worst / Jain over the rounds, from the records."""
    name = metric or run.metric
    rounds = np.asarray([r["round"] for r in run.records], dtype=np.int64)
    per_site = np.full((len(run.sites), len(rounds)), np.nan)
    for j, rec in enumerate(run.records):
        for i, site in enumerate(run.sites):
            value = rec.get("metrics", {}).get(site, {}).get(name)
            if value is not None:
                per_site[i, j] = float(value)
    summaries = [summarize({s: float(v) for s, v in zip(run.sites, per_site[:, j], strict=True)}) for j in range(len(rounds))]
    return History(name, rounds, run.sites, per_site,
                   np.asarray([s["mean"] for s in summaries]), np.asarray([s["worst"] for s in summaries]),
                   np.asarray([s["jain"] for s in summaries]))


@dataclass(frozen=True)
class PrivacySpent:
    """Differential-privacy budget ε spent by each site, as recorded round by round.

    Attributes
    ----------
    rounds
        (R,) round numbers.
    sites
        (S,) site names.
    epsilon
        (S, R) cumulative ε after each round; NaN where the round recorded none for the site.
    """

    rounds: np.ndarray
    sites: list[str]
    epsilon: np.ndarray

    def final(self) -> dict[str, float]:
        """The last recorded ε of each site (NaN if never recorded)."""
        out = {}
        for site, row in zip(self.sites, self.epsilon, strict=True):
            finite = row[np.isfinite(row)]
            out[site] = float(finite[-1]) if finite.size else float("nan")
        return out

    def table(self) -> Table:
        return Table(["site", "epsilon spent"], [[s, e] for s, e in self.final().items()], title="privacy budget spent per site")


def _epsilon(record: Mapping[str, Any], site: str) -> float | None:
    """ε of ``site`` in one record: ``privacy[site].epsilon`` (or a bare number), else ``site_info[site]``'s."""
    sources = [record.get("privacy") or {}, {s: (info or {}).get("privacy", info) for s, info in (record.get("site_info") or {}).items()}]
    for source in sources:
        entry = source.get(site) if isinstance(source, Mapping) else None
        if isinstance(entry, Mapping):
            entry = entry.get("epsilon")
        if isinstance(entry, int | float) and not isinstance(entry, bool):
            return float(entry)
    return None


def privacy_spent(run: Run) -> PrivacySpent | None:
    """ε per site per round if the records carry it (a ``privacy`` entry per site with ``epsilon``), else None."""
    rounds = np.asarray([r["round"] for r in run.records], dtype=np.int64)
    eps = np.full((len(run.sites), len(rounds)), np.nan)
    for j, rec in enumerate(run.records):
        for i, site in enumerate(run.sites):
            value = _epsilon(rec, site)
            if value is not None:
                eps[i, j] = value
    if not np.isfinite(eps).any():
        return None
    return PrivacySpent(rounds, run.sites, eps)


def privacy_by_run(runs: Mapping[str, Run]) -> dict[str, PrivacySpent]:
    """:func:`privacy_spent` of the runs that record differential privacy (empty if none does)."""
    spent = {label: privacy_spent(r) for label, r in runs.items()}
    return {label: s for label, s in spent.items() if s is not None}
