"""The public evaluation API used by the clinician notebooks (``notebooks/``).

Load a run directory, see which model a site deploys and why, score it on the site's
held-out test split with bootstrap confidence intervals, compare it with baseline
runs, and read federation-level views (model use over rounds and whether all sites ended
up on one model, worst site, fairness, the run's warnings, privacy spent per site). Plots
live in :mod:`fedfew_med.evaluation.plots` (matplotlib is imported only there, and only
when a plot is drawn).

>>> from fedfew_med import evaluation as ev
>>> run = ev.load_run("runs/demo")                          # doctest: +SKIP
>>> site = run.resolve_site("")                             # doctest: +SKIP  ("" = the run's first site)
>>> report = run.site_report(site)                          # doctest: +SKIP
>>> report.deployed.reason, report.metrics["accuracy"]      # doctest: +SKIP
>>> ev.compare({"FedFew": run, **ev.load_runs({"FedAvg": "runs/fedavg"})}, site)  # doctest: +SKIP
"""

from fedfew_med.evaluation.federation import (
    OWN_MODEL,
    History,
    MethodMetrics,
    ModelUse,
    PrivacySpent,
    SitePrivacy,
    fairness,
    history,
    metric_by_method,
    model_use,
    privacy_by_run,
    privacy_spent,
    privacy_table,
    result_warnings,
    site_privacy,
    warnings_table,
)
from fedfew_med.evaluation.geometry import GridSpacing, grid_spacing
from fedfew_med.evaluation.report import Deployed, SiteReport
from fedfew_med.evaluation.run import (
    Run,
    UnknownSiteError,
    baseline_runs,
    compare,
    load_run,
    load_runs,
    site_reports,
)
from fedfew_med.evaluation.stats import (
    Estimate,
    RocBand,
    bootstrap,
    bootstrap_indices,
    percentile_interval,
    predictive_values,
    roc_band,
)
from fedfew_med.evaluation.table import Table

__all__ = [
    "OWN_MODEL",
    "Deployed",
    "Estimate",
    "GridSpacing",
    "History",
    "MethodMetrics",
    "ModelUse",
    "PrivacySpent",
    "RocBand",
    "Run",
    "SitePrivacy",
    "SiteReport",
    "Table",
    "UnknownSiteError",
    "baseline_runs",
    "bootstrap",
    "bootstrap_indices",
    "compare",
    "fairness",
    "grid_spacing",
    "history",
    "load_run",
    "load_runs",
    "metric_by_method",
    "model_use",
    "percentile_interval",
    "predictive_values",
    "privacy_by_run",
    "privacy_spent",
    "privacy_table",
    "result_warnings",
    "roc_band",
    "site_privacy",
    "site_reports",
    "warnings_table",
]
