"""The coordinator's side of differential privacy on Flower: the simulation's DP pieces, over messages.

What the in-process simulation composes (:mod:`fedfew_med.dp.federation`), the coordinator
composes the same way:

- *DP-ready networks.* When a site of the run trains with DP (its query reply says so, with
  its target ε, δ and options), the server models and every site's network are made DP-ready
  (``dp_ready_preparer``); the sites are told so in every message's run header.
- *Server DP.* ``[server_privacy]`` wraps the algorithm in :class:`~fedfew_med.dp.server.ServerDP`
  (``with_server_dp``); its ledger is saved in every checkpoint.
- *Site DP.* At the first round the participation schedule of the whole run is fixed over the
  roster (the roster is then closed: a site joining later would change it) and every DP site is
  planned with :func:`~fedfew_med.dp.federation.plan_site`: the *same* calibration the site
  computes for itself from the plan sent to it. The coordinator holds that ``SitePrivacy`` as a
  copy of the site's ledger, replaced by the ledger state each train reply carries (which must
  extend the previous one), so that before every round it can tell, exactly as the simulation's
  ``split_trainers`` does, which sites are out of budget (``privacy_stopped``; the others' λ
  is computed without them). Every record carries each DP site's report (ε spent, δ, σ, clip
  norm, sample rate, steps, ...) in the simulation's format.
- *Tamper evidence.* Each site's last reported ledger (digest, length, ε) is in the checkpointed
  run state and goes out with every train message; the site refuses to train from a ledger that
  does not extend it (see :mod:`fedfew_med.flower.site_privacy`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fedfew_med.algorithms import Algorithm, Params, RoundInfo
from fedfew_med.config import FederationConfig
from fedfew_med.dp import federation as dp_federation
from fedfew_med.dp.calibrate import Calibration
from fedfew_med.dp.ledger import LedgerStateError, PrivacyLedger, RdpCurves
from fedfew_med.dp.options import PrivacyOptions
from fedfew_med.dp.server import ServerDP
from fedfew_med.dp.site import SitePrivacy
from fedfew_med.flower import codec
from fedfew_med.runtime import NetworkPreparer, ServerRuntime

log = logging.getLogger(__name__)

NO_UPDATE = {"skipped": "no participant could train (privacy budgets spent)"}  # the simulation's words


class RunPrivacy:
    """DP-readiness, ServerDP and every DP site's plan and last reported ledger, for one coordinator run."""

    def __init__(self, config: FederationConfig) -> None:
        self.config = config
        self.dp_ready: bool | None = None  # fixed with the first models of the run
        self.closed = False  # the participation schedule is fixed: the roster takes no new site
        self.sites: dict[str, SitePrivacy] = {}  # DP site -> its plan and ledger as last reported
        self.rounds: dict[str, tuple[int, ...]] = {}  # DP site -> the rounds it takes part in
        self.first: dict[str, RoundInfo] = {}  # DP site -> the broadcast of its first round (probed)
        self._curves = RdpCurves()
        self._calibrations: dict[tuple[Any, ...], Calibration] = {}

    # ------------------------------------------------------------------ building
    def preparer(self, roster: Mapping[str, codec.SiteCard]) -> NetworkPreparer | None:
        """``make_dp_ready`` when a site of the run trains with DP (decided once, with the first models)."""
        if self.dp_ready is None:
            self.dp_ready = any(card.privacy is not None for card in roster.values())
        return dp_federation.dp_ready_preparer(self.config) if self.dp_ready else None

    def wrap(self, algorithm: Algorithm) -> Algorithm:
        """``algorithm`` in ServerDP under ``[server_privacy]``, else unchanged."""
        return dp_federation.with_server_dp(algorithm, self.config)

    def plan(self, roster: Mapping[str, codec.SiteCard], server: ServerRuntime, models: Sequence[Params]) -> None:
        """Fix the schedule over ``roster`` and plan every DP site on the initial ``models`` (as ``plan_sites``)."""
        dp_sites = sorted(s for s, card in roster.items() if card.privacy is not None)
        if not dp_sites:
            return
        self.closed = True
        overrides = set(dp_federation.federation_defaults(self.config)[1])
        if overrides - set(roster):
            log.warning("%s: [privacy.sites.*] names sites that are not in this run: %s", self.config.source,
                        ", ".join(sorted(overrides - set(roster))))
        names = list(roster)
        schedule = [set(server.participants(r, names)) for r in range(self.config.run.rounds)]
        for site in dp_sites:
            card = roster[site]
            assert card.privacy is not None
            taking_part = tuple(r for r, sampled in enumerate(schedule) if site in sampled)
            if not taking_part:  # never sampled: never trains, spends nothing, needs no plan
                continue
            first = taking_part[0]
            info = server.round_info(first, {s: roster[s].num_train for s in sorted(schedule[first])})
            options = PrivacyOptions.from_table(card.privacy["options"], where=f"site {site!r}: its [privacy] (query reply)")
            self.sites[site] = dp_federation.plan_site(
                self.config, site, options, num_samples=card.num_train, rounds=len(taking_part), first_info=info,
                algorithm=server.algorithm, models=models, grad_sample_mode=str(card.privacy.get("grad_sample_mode", "")),
                curves=self._curves, calibrations=self._calibrations,
            )
            self.rounds[site], self.first[site] = taking_part, info
            log.info("site %s trains with DP: target ε = %g, δ = %g, σ = %.4f over its %d rounds", site, options.epsilon,
                     options.delta, self.sites[site].calibration.noise_multiplier, len(taking_part))

    def refusal(self, card: codec.SiteCard, roster: Mapping[str, codec.SiteCard]) -> str | None:
        """Why ``card`` cannot join this run, or None."""
        if card.privacy is not None and self.dp_ready is False:
            return "it trains with DP, but this run's networks are not DP-ready (no site asked for DP when it began); start a new run"
        if not self.closed:
            return None
        old = roster.get(card.name)
        if old is None:
            return "the participation schedule of this DP run was fixed at its first round without this site"
        if (old.privacy or None) != (card.privacy or None):
            return f"its privacy options changed since the run's plan was fixed (were {old.privacy}, now {card.privacy})"
        return None

    # ------------------------------------------------------------------ rounds
    def split(self, round_idx: int, participants: Sequence[str]) -> tuple[list[str], list[str]]:
        """(sites that train, sites out of budget), as in the simulation."""
        return dp_federation.split_trainers(self.sites, round_idx, participants, log)

    def plan_for(self, site: str) -> codec.PrivacyPlan | None:
        """The privacy plan a train message to ``site`` carries (None for a site without DP)."""
        p = self.sites.get(site)
        if p is None:
            return None
        return codec.PrivacyPlan(rounds=self.rounds[site], first=self.first[site], ledger_digest=p.ledger.digest(),
                                 ledger_entries=len(p.ledger), ledger_epsilon=p.ledger.epsilon())

    def accept(self, site: str, reply: codec.PrivacyReply) -> None:
        """Take the ledger a site reports; LedgerStateError when it does not extend the last one or fit the plan."""
        p = self.sites.get(site)
        if p is None:
            raise LedgerStateError(f"site {site!r} sent a privacy report, but it has no privacy plan in this run")
        ledger = PrivacyLedger.from_state_dict(reply.state["ledger"])  # refuses an edited history (digest)
        known = p.ledger.history
        if ledger.history[: len(known)] != known:
            raise LedgerStateError(
                f"site {site!r}: the privacy ledger it reports ({len(ledger)} entries, ε = {ledger.epsilon():.4f}) does not "
                f"extend the one it reported before ({len(known)} entries, ε = {p.ledger.epsilon():.4f}): it was reset or edited"
            )
        stopped = p.stopped_round
        p.load_state_dict(reply.state)  # the calibration must be this run's plan
        if stopped is not None and p.stopped_round is None:
            p.stopped_round = stopped
        if reply.report.get("digest") != p.ledger.digest():
            raise LedgerStateError(f"site {site!r}: its privacy report does not describe its ledger")

    def round_entries(self, round_idx: int, stopped: Sequence[str], algorithm: Algorithm) -> dict[str, Any]:
        """``privacy``, ``privacy_stopped`` and ``server_privacy`` of a round's record, as in the simulation."""
        out: dict[str, Any] = {}
        if self.sites:
            out["privacy"] = {name: p.report(round_idx) for name, p in sorted(self.sites.items())}
            out["privacy_stopped"] = list(stopped)
        if isinstance(algorithm, ServerDP):
            out["server_privacy"] = dp_federation.server_report(algorithm)
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, algorithm: Algorithm) -> dict[str, Any]:
        """JSON-able: DP-readiness, whether the roster is closed, every ledger (the simulation's ``privacy_state``)."""
        return {"dp_ready": bool(self.dp_ready), "closed": self.closed,
                **dp_federation.privacy_state(self.sites, algorithm)}

    def restore_preparer(self, state: Mapping[str, Any] | None) -> NetworkPreparer | None:
        """The preparer of a resumed run (its DP-readiness comes from the checkpoint)."""
        self.dp_ready = bool((state or {}).get("dp_ready", False))
        return dp_federation.dp_ready_preparer(self.config) if self.dp_ready else None

    def restore(self, state: Mapping[str, Any] | None, roster: Mapping[str, codec.SiteCard], server: ServerRuntime,
                models: Sequence[Params], *, where: str) -> None:
        """Re-plan the DP sites of the checkpoint's roster and load every ledger (LedgerStateError when one is missing)."""
        state = state or {}
        if state.get("closed"):
            self.plan(roster, server, models)
        dp_federation.load_privacy_state(state, self.sites, server.algorithm, where=where)

