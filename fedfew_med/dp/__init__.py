"""Differential privacy for fedfew-med: Opacus DP-SGD, one ledger per site for the whole run.

The only package that imports ``opacus``. Pieces (each a module):

- :mod:`~fedfew_med.dp.options` — ``PrivacyOptions``, a site's validated ``[privacy]`` table;
- :mod:`~fedfew_med.dp.ledger` — ``PrivacyLedger``: every mechanism applied to a site's data,
  ε by an Opacus accountant over the whole history, JSON state with a digest, budget checks;
- :mod:`~fedfew_med.dp.calibrate` — noise for the whole planned run (``calibrate``), the round
  plan read off the algorithm (``probe_round``);
- :mod:`~fedfew_med.dp.engine` — ``dp_train`` (DP-SGD with Poisson sampling, hooks or ghost
  clipping, physical batches, empty batches, proximal terms) and ``DPSiteWork``;
- :mod:`~fedfew_med.dp.loss_channel` — private loss reports;
- :mod:`~fedfew_med.dp.networks` — ``make_dp_ready`` and the table of DP-trainable networks;
- :mod:`~fedfew_med.dp.server` — ``ServerDP``, site-level DP at the server by composition;
- :mod:`~fedfew_med.dp.report` — the per-round JSON report;
- :mod:`~fedfew_med.dp.site` — ``SitePrivacy``, the one object per site the round loop holds;
- :mod:`~fedfew_med.dp.federation` — which sites train privately (``[privacy]`` of the federation,
  ``[privacy.sites.<name>]``, a site file's ``[privacy]``), their plans, ``[server_privacy]``, the
  ledgers' checkpoint state;
- :mod:`~fedfew_med.dp.timing` — ``benchmark_epoch_times``: DP epoch time over non-DP epoch time.
"""

from fedfew_med.dp import quiet_import  # noqa: F401  (first: Opacus must not configure the root logger)
from fedfew_med.dp.calibrate import (
    Calibration,
    CalibrationError,
    RoundUsage,
    calibrate,
    calibrate_site,
    poisson_plan,
    probe_round,
)
from fedfew_med.dp.engine import DPSiteWork, DPTrainStats, dp_train, resolve_grad_sample_mode
from fedfew_med.dp.federation import (
    ServerPrivacyOptions,
    network_preparer,
    plan_sites,
    private_sites,
    server_privacy_options,
    site_privacy_options,
    with_server_dp,
)
from fedfew_med.dp.ledger import (
    LedgerStateError,
    Mechanism,
    PrivacyBudgetExhausted,
    PrivacyLedger,
    RdpCurves,
    epsilon_of,
)
from fedfew_med.dp.loss_channel import PerSampleLoss, loss_mechanism, per_sample_losses, private_losses
from fedfew_med.dp.networks import NotDPReadyError, check_dp_ready, dp_problems, make_dp_ready
from fedfew_med.dp.options import PrivacyOptions
from fedfew_med.dp.report import site_report
from fedfew_med.dp.server import ServerDP, clip_update
from fedfew_med.dp.site import SitePrivacy
from fedfew_med.dp.timing import benchmark_epoch_times

__all__ = [
    "Calibration",
    "CalibrationError",
    "DPSiteWork",
    "DPTrainStats",
    "LedgerStateError",
    "Mechanism",
    "NotDPReadyError",
    "PerSampleLoss",
    "PrivacyBudgetExhausted",
    "PrivacyLedger",
    "PrivacyOptions",
    "RdpCurves",
    "RoundUsage",
    "ServerDP",
    "ServerPrivacyOptions",
    "SitePrivacy",
    "benchmark_epoch_times",
    "calibrate",
    "calibrate_site",
    "check_dp_ready",
    "clip_update",
    "dp_problems",
    "dp_train",
    "epsilon_of",
    "loss_mechanism",
    "make_dp_ready",
    "network_preparer",
    "per_sample_losses",
    "plan_sites",
    "poisson_plan",
    "private_losses",
    "private_sites",
    "probe_round",
    "resolve_grad_sample_mode",
    "server_privacy_options",
    "site_privacy_options",
    "site_report",
    "with_server_dp",
]
