"""Federation-level views of one or more runs, read from their records (no recomputation).

Everything here comes from ``metrics.jsonl`` and ``summary.json`` (and the run's
``policy.toml``, when it was started with ``--policy``): the model every site used in every
evaluated round and whether all sites ended up on one model, the per-site deployed metric
of each method, the worst site and Jain's index, the run's warnings about single results,
and the privacy budget spent per site when the records carry it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfew_med.evaluation.run import Run
from fedfew_med.evaluation.table import Table
from fedfew_med.metrics import result_flags, summarize
from fedfew_med.privacy import PrivacyPolicy, load_policy

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
    collapsed
        ``summary.json``'s ``model_use.collapsed``: the K final models are (nearly) one model.
    in_use
        How many distinct server models the sites deploy at the end (``model_use.in_use``, else
        counted from the last recorded round); None without server models.
    """

    rounds: np.ndarray
    sites: list[str]
    models: np.ndarray
    num_models: int
    note: str = ""
    collapsed: bool = False
    in_use: int | None = None

    def remark(self) -> str:
        """A plain statement when every site ends up on one model, else ``""``.

        Two ways K >= 2 shared models serve the sites as one: the K models collapsed into one
        (:attr:`collapsed`), or every site deploys the same one of them (:attr:`in_use` is 1).
        """
        if self.num_models < 2:
            return ""
        if self.collapsed:
            return (f"COLLAPSE: the {self.num_models} shared models collapsed into one, so all {len(self.sites)} sites are "
                    "in effect served by the same model; the choice among models changes nothing here and the result "
                    f"should be read as one shared model, like FedAvg ({self.note or 'summary.json: model_use'}).")
        if self.in_use == 1:
            last = {int(m) for m in self.models[:, -1] if m >= 0} if self.models.size else set()
            which = f"model {last.pop()}" if len(last) == 1 else "the same model"
            return (f"COLLAPSE: all {len(self.sites)} sites deploy {which}; the other {self.num_models - 1} shared "
                    "model(s) serve no site, so the run is in effect one shared model.")
        return ""

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
    summary = run.summary.get("model_use") or {}
    in_use = summary.get("in_use")
    if in_use is None and models.size and run.num_models >= 1 and (models[:, -1] >= 0).all():
        in_use = len(set(models[:, -1].tolist()))  # an older run: count the last round's server models
    return ModelUse(rounds, run.sites, models, run.num_models, str(summary.get("note", "")),
                    bool(summary.get("collapsed", False)), None if in_use is None else int(in_use))


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


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _privacy_entry(record: Mapping[str, Any], site: str) -> Mapping[str, Any] | None:
    """``site``'s privacy entry in one record: ``privacy[site]`` (or a bare ε), else ``site_info[site]``'s; None without ε."""
    sources = [record.get("privacy") or {}, {s: (info or {}).get("privacy", info) for s, info in (record.get("site_info") or {}).items()}]
    for source in sources:
        entry = source.get(site) if isinstance(source, Mapping) else None
        if _is_number(entry):
            return {"epsilon": float(entry)}  # type: ignore[arg-type]
        if isinstance(entry, Mapping) and _is_number(entry.get("epsilon")):
            return entry
    return None


def _epsilon(record: Mapping[str, Any], site: str) -> float | None:
    """ε of ``site`` in one record (see :func:`_privacy_entry`)."""
    entry = _privacy_entry(record, site)
    return None if entry is None else float(entry["epsilon"])


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


@dataclass(frozen=True)
class SitePrivacy:
    """What one site's records say about its differential privacy at the end of the run.

    Attributes
    ----------
    site
        Site name.
    dp
        Whether the site trained with DP-SGD (its records carry a privacy entry).
    epsilon, delta
        ε spent over the whole run at ``delta`` (None without DP).
    target_epsilon
        The site's own budget (``[privacy].epsilon``), None if not recorded.
    policy_epsilon
        The largest ε the run's privacy policy allows this site (``policy.toml`` in the run
        directory, written by ``simulate --policy``); None when the run has no policy.
    policy_name
        The policy's name, if any.
    stopped
        The site stopped training before the end to stay within its budget.
    dp_sites
        All sites of the run that trained with DP.
    """

    site: str
    dp: bool
    epsilon: float | None = None
    delta: float | None = None
    target_epsilon: float | None = None
    policy_epsilon: float | None = None
    policy_name: str | None = None
    stopped: bool = False
    dp_sites: tuple[str, ...] = ()

    def text(self) -> str:
        """The site's privacy position in plain words."""
        if not self.dp:
            others = (f" (other sites of this run did: {', '.join(self.dp_sites)})" if self.dp_sites
                      else "; the run is not a DP run")
            return (f"{self.site}: trained WITHOUT differential privacy{others}. Its model comes with no formal (ε, δ) "
                    "guarantee for the site's training records.")
        assert self.epsilon is not None
        out = f"{self.site}: trained with differential privacy (DP-SGD): ε = {self.epsilon:.3g} spent over the whole run"
        out += f" at δ = {self.delta:g}" if self.delta is not None else ""
        out += f", of its budget ε = {self.target_epsilon:g}." if self.target_epsilon is not None else "."
        if self.policy_epsilon is not None:
            within = "within it" if self.epsilon <= self.policy_epsilon else "ABOVE it"
            out += f" The run's privacy policy ({self.policy_name}) allows at most ε = {self.policy_epsilon:g} here: {within}."
        else:
            out += " The run has no privacy policy file (policy.toml), so no policy limit applies."
        if self.stopped:
            out += " The site stopped training before the last round to stay within its budget."
        return out + " Smaller ε means stronger protection of each training record (not of each patient)."


def _policy(run: Run) -> PrivacyPolicy | None:
    path = run.run_dir / "policy.toml"
    return load_policy(path) if path.is_file() else None


def site_privacy(run: Run, site: str | None = None) -> SitePrivacy:
    """``site``'s ε, δ and budget as its last record states them, with the run's policy limit (default: first site)."""
    name = run.resolve_site(site)
    entries = {s: next((e for r in reversed(run.records) if (e := _privacy_entry(r, s)) is not None), None) for s in run.sites}
    dp_sites = tuple(s for s, e in entries.items() if e is not None)
    entry = entries[name]
    if entry is None:
        return SitePrivacy(name, False, dp_sites=dp_sites)
    policy = _policy(run)

    def number(key: str) -> float | None:
        value = entry.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    return SitePrivacy(name, True, epsilon=number("epsilon"), delta=number("delta"), target_epsilon=number("target_epsilon"),
                       policy_epsilon=policy.epsilon_limit(name) if policy else None, policy_name=policy.name if policy else None,
                       stopped=bool(entry.get("stopped", False)), dp_sites=dp_sites)


def privacy_table(run: Run) -> Table | None:
    """Every site's ε spent, δ, budget and policy limit; None when no site of the run trained with DP."""
    rows = [site_privacy(run, s) for s in run.sites]
    if not any(r.dp for r in rows):
        return None
    policy = _policy(run)
    return Table(["site", "DP", "epsilon spent", "delta", "budget (epsilon)", "policy limit (epsilon)", "stopped early"],
                 [[r.site, "yes" if r.dp else "NO", r.epsilon, None if r.delta is None else f"{r.delta:g}", r.target_epsilon,
                   r.policy_epsilon, ("yes" if r.stopped else "no") if r.dp else None] for r in rows],
                 title=f"{run.label}: privacy budget per site at the end of the run",
                 notes=(f"Policy: {policy.name} ({run.run_dir / 'policy.toml'})." if policy
                        else "The run has no privacy policy file (policy.toml): no policy limit applies.",))


def result_warnings(run: Run) -> dict[str, list[str]]:
    """The run's warnings per site (``summary.json``'s ``per_site.<site>.flags``; from the final metrics for older runs)."""
    per_site = run.summary.get("per_site") or {}
    out = {}
    for site, metrics in run.final_metrics().items():
        flags = per_site.get(site, {}).get("flags")
        out[site] = [str(f) for f in flags] if flags is not None else result_flags(metrics)
    return out


def warnings_table(runs: Mapping[str, Run]) -> Table:
    """One row per (run, site) the run warns about: a single predicted class, or an AUC not distinguishable from chance."""
    rows = [[label, site, flag] for label, r in runs.items() for site, flags in result_warnings(r).items() for flag in flags]
    return Table(["run", "site", "warning"], rows, title="warnings about single results (whatever their accuracy)",
                 notes=() if rows else ("No warning: every site's model predicts more than one class and has an AUC "
                                        "distinguishable from chance (or the run does not check these).",))


def privacy_by_run(runs: Mapping[str, Run]) -> dict[str, PrivacySpent]:
    """:func:`privacy_spent` of the runs that record differential privacy (empty if none does)."""
    spent = {label: privacy_spent(r) for label, r in runs.items()}
    return {label: s for label, s in spent.items() if s is not None}
