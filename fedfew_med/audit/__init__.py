"""Privacy audit reports of finished runs (layer 3: it loads runs through :mod:`fedfew_med.evaluation`).

- :mod:`~fedfew_med.audit.mia` — the loss-threshold membership-inference attack: AUC, TPR at low
  FPR with bootstrap intervals, the empirical ε lower bound (pure numpy/scipy);
- :mod:`~fedfew_med.audit.report` — :func:`build_report`: every number of the report, from the run's
  records, ledgers and digests, and the attack on every site's deployed model;
- :mod:`~fedfew_med.audit.html` — the self-contained HTML page (base64 PNG plots).

``fedfew-med privacy-report RUN [--baseline RUN] [--policy privacy/policy.toml] -o OUT``.
"""

from fedfew_med.audit.html import render, write
from fedfew_med.audit.mia import (
    AttackResult,
    EpsilonBound,
    attack,
    clopper_pearson,
    epsilon_lower_bound,
    roc_auc,
    tpr_at_fpr,
)
from fedfew_med.audit.report import build_report, per_record_losses

__all__ = [
    "AttackResult",
    "EpsilonBound",
    "attack",
    "build_report",
    "clopper_pearson",
    "epsilon_lower_bound",
    "per_record_losses",
    "render",
    "roc_auc",
    "tpr_at_fpr",
    "write",
]
