"""Everything DP about one site for one run, behind one object the round loop can hold.

``SitePrivacy.plan(...)`` probes the algorithm's round, calibrates the noise for the whole
run and opens the site's ledger; each round the loop asks :meth:`SitePrivacy.can_train`,
wraps the site's ``SiteWork`` with :meth:`SitePrivacy.work`, and logs :meth:`SitePrivacy.report`;
the checkpoint stores :meth:`SitePrivacy.state_dict` (JSON).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from fedfew_med.algorithms.base import Algorithm, Params, RoundInfo
from fedfew_med.dp.calibrate import Calibration, RoundUsage, calibrate_site, probe_round
from fedfew_med.dp.engine import DPSiteWork, resolve_grad_sample_mode
from fedfew_med.dp.ledger import LedgerStateError, Mechanism, PrivacyLedger, RdpCurves
from fedfew_med.dp.options import PrivacyOptions
from fedfew_med.dp.report import site_report
from fedfew_med.training import SiteWork


class SitePrivacy:
    """A site's privacy options, calibration and ledger for a whole run.

    Parameters
    ----------
    site
        Site name.
    options
        Its ``[privacy]`` options (``enabled`` must be true).
    calibration
        Noise levels for the planned run.
    grad_sample_mode
        The resolved mode (``"hooks"`` / ``"ghost"``), for the report.
    usage
        The probed round plan, for the report.
    curves
        RDP memo shared by the run's ledgers (optional; speeds up, changes nothing).
    """

    def __init__(
        self,
        site: str,
        options: PrivacyOptions,
        calibration: Calibration,
        *,
        grad_sample_mode: str = "",
        usage: RoundUsage | None = None,
        curves: RdpCurves | None = None,
    ) -> None:
        if not options.enabled:
            raise ValueError(f"site {site!r}: privacy is disabled in its options; do not build a SitePrivacy for it")
        self.site = site
        self.options = options
        self.calibration = calibration
        self.grad_sample_mode = grad_sample_mode
        self.usage = usage
        self.ledger = PrivacyLedger(delta=options.delta, accountant=options.accountant, target_epsilon=options.epsilon, name=site, curves=curves)
        self.stopped_round: int | None = None

    @classmethod
    def plan(
        cls,
        site: str,
        options: PrivacyOptions,
        *,
        algorithm: Algorithm,
        info: RoundInfo,
        models: Mapping[int, Params],
        num_samples: int,
        batch_size: int,
        local_epochs: int,
        rounds: int,
        network: nn.Module,
        state: Mapping[str, Params] | None = None,
        curves: RdpCurves | None = None,
    ) -> SitePrivacy:
        """Probe one round of ``algorithm`` at this site, calibrate for ``rounds`` such rounds, open the ledger.

        ``rounds`` is the number of rounds the site will take part in (all of them at
        participation 1; the participation draw is public, so it may be counted exactly).
        """
        usage = probe_round(algorithm, site, info, models, num_samples=num_samples, local_epochs=local_epochs, state=state)
        calibration = calibrate_site(options, num_samples=num_samples, batch_size=batch_size, rounds=rounds, usage=usage, curves=curves)
        mode = resolve_grad_sample_mode(options.grad_sample_mode, network)
        return cls(site, options, calibration, grad_sample_mode=mode, usage=usage, curves=curves)

    def round_mechanisms(self, round_idx: int) -> list[Mechanism]:
        """What one planned round applies to this site's data."""
        return self.calibration.round_mechanisms(round_idx)

    def can_train(self, round_idx: int) -> bool:
        """Whether a planned round fits the remaining budget; the first refusal marks the site stopped."""
        ok = self.ledger.can_afford(self.round_mechanisms(round_idx))
        if not ok and self.stopped_round is None:
            self.stopped_round = round_idx
        return ok

    @property
    def stopped(self) -> bool:
        """The site has stopped training for lack of budget."""
        return self.stopped_round is not None

    def work(self, base: SiteWork) -> DPSiteWork:
        """The DP version of this round's ``SiteWork`` (charges this site's ledger)."""
        return DPSiteWork.wrap(base, options=self.options, calibration=self.calibration, ledger=self.ledger)

    def work_factory(self, **site_work: Any) -> DPSiteWork:
        """A ``WorkFactory``: takes ``SiteWork``'s keyword arguments, returns the DP work of this site."""
        return DPSiteWork(**site_work, options=self.options, calibration=self.calibration, ledger=self.ledger)

    def report(self, round_idx: int | None = None) -> dict[str, Any]:
        """JSON-able per-round report (see :func:`fedfew_med.dp.report.site_report`)."""
        out = site_report(
            self.ledger,
            options=self.options,
            calibration=self.calibration,
            grad_sample_mode=self.grad_sample_mode,
            stopped=self.stopped,
            round_idx=round_idx,
        )
        if self.stopped_round is not None:
            out["stopped_round"] = self.stopped_round
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state for the checkpoint: the ledger, the stop round, the calibration it was spent under."""
        return {"ledger": self.ledger.state_dict(), "stopped_round": self.stopped_round, "calibration": self.calibration.to_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore spent budget; refuses a state made under a different calibration."""
        saved = dict(state.get("calibration") or {})
        if saved != self.calibration.to_dict():
            raise LedgerStateError(
                f"site {self.site!r}: the checkpoint's privacy calibration differs from this run's "
                f"(noise multiplier {saved.get('noise_multiplier')} vs {self.calibration.noise_multiplier}); resume with the run's own config"
            )
        self.ledger.load_state_dict(state["ledger"])
        stopped = state.get("stopped_round")
        self.stopped_round = None if stopped is None else int(stopped)
