"""The public evaluation API used by the clinician notebooks (``notebooks/``).

Load a run directory, see which model a site deploys and why, score it on the site's
held-out test split with bootstrap confidence intervals, compare it with baseline
runs, and read federation-level views (model use over rounds, worst site, fairness,
privacy spent). Plots live in :mod:`fedfew_med.evaluation.plots` (matplotlib is
imported only there, and only when a plot is drawn).

>>> from fedfew_med import evaluation as ev
>>> run = ev.load_run("runs/demo")                          # doctest: +SKIP
>>> report = run.site_report("site02-noisy")                # doctest: +SKIP
>>> report.deployed.reason, report.metrics["accuracy"]      # doctest: +SKIP
>>> ev.compare({"FedFew": run, **ev.load_runs({"FedAvg": "runs/fedavg"})}, "site02-noisy")  # doctest: +SKIP
"""

from fedfew_med.evaluation.federation import (
    OWN_MODEL,
    History,
    MethodMetrics,
    ModelUse,
    PrivacySpent,
    fairness,
    history,
    metric_by_method,
    model_use,
    privacy_by_run,
    privacy_spent,
)
from fedfew_med.evaluation.report import Deployed, SiteReport
from fedfew_med.evaluation.run import Run, compare, load_run, load_runs, site_reports
from fedfew_med.evaluation.stats import Estimate, bootstrap, bootstrap_indices, percentile_interval
from fedfew_med.evaluation.table import Table

__all__ = [
    "OWN_MODEL",
    "Deployed",
    "Estimate",
    "History",
    "MethodMetrics",
    "ModelUse",
    "PrivacySpent",
    "Run",
    "SiteReport",
    "Table",
    "bootstrap",
    "bootstrap_indices",
    "compare",
    "fairness",
    "history",
    "load_run",
    "load_runs",
    "metric_by_method",
    "model_use",
    "percentile_interval",
    "privacy_by_run",
    "privacy_spent",
    "site_reports",
]
