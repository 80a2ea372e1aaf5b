"""A DP site's privacy on Flower: its ledger on its own disk and in the node's context, checked before every round.

Nothing here re-implements differential privacy: the site's options resolve as in the
simulation (:func:`fedfew_med.dp.federation.site_privacy_options`: the federation's
``[privacy]``, its ``[privacy.sites.<name>]``, then the site file's own ``[privacy]``), σ is
calibrated by :func:`~fedfew_med.dp.federation.plan_site` for the participation plan the
coordinator sends (the rounds this site takes part in over the whole run, as ``plan_sites``
counts them in the simulation), and the round trains through
:meth:`~fedfew_med.dp.site.SitePrivacy.work_factory` (Opacus DP-SGD, the private loss channel),
charging the site's :class:`~fedfew_med.dp.ledger.PrivacyLedger`.

The ledger is the site's and only grows. Its state (``SitePrivacy.state_dict()``: the
labelled history with its digest, the stop round, the calibration) is kept in::

    <state-dir>/<run-key>/<site>/privacy.json     written atomically after every round (even a failed one)

and a copy in the node's ``context.state`` (record ``fedfew.site-privacy``). The file also keeps
the calibration by its inputs (options, records, batch size, rounds, round plan), so σ is searched
once per run, not at every message (the coordinator checks every reported calibration against its
own, so an edited one is refused there). Every train message
carries the digest and length of the ledger the coordinator last received from this site; the
site refuses to train (:class:`SiteLedgerError`, naming the site and the file) when

- the coordinator has seen a ledger from it, or its context holds one, but ``privacy.json`` is missing;
- ``privacy.json`` does not load (its digest does not match its history: edited or truncated),
  or was made under another calibration (its options or the plan changed);
- its history does not begin with the ledger the coordinator last saw, or with the context's copy
  (replaced by an older or a freshly made file: a reset of the spent budget).

A round whose planned mechanisms would take ε past the budget is declined before any data is
touched (the coordinator records the site in ``privacy_stopped``, as the simulation does).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from fedfew_med.checkpoint import atomic_write_text
from fedfew_med.config import FederationConfig
from fedfew_med.data import SiteData
from fedfew_med.dp.calibrate import Calibration
from fedfew_med.dp.engine import resolve_grad_sample_mode
from fedfew_med.dp.federation import dp_ready_preparer, plan_site, site_privacy_options
from fedfew_med.dp.ledger import LedgerStateError, PrivacyLedger
from fedfew_med.dp.site import SitePrivacy
from fedfew_med.flower import codec
from fedfew_med.flower.site_store import SiteStore
from fedfew_med.runtime import ModelFacts, SiteRuntime, make_algorithm

log = logging.getLogger(__name__)

FILE = "privacy.json"


class SiteLedgerError(RuntimeError):
    """The site's privacy ledger is missing, edited or behind what was seen of it: the site refuses to train."""


def privacy_card(config: FederationConfig, data: SiteData, runtime: SiteRuntime) -> dict[str, Any] | None:
    """What the query reply says of the site's DP: its resolved options and clipping mode, or None without DP.

    ``runtime`` must have the DP-ready network (``site_runtime(..., dp_ready=True)``).
    """
    options = site_privacy_options(config, data)
    if options is None:
        return None
    return {"options": options.to_dict(), "grad_sample_mode": resolve_grad_sample_mode(options.grad_sample_mode, runtime.network)}


class SiteLedger:
    """One DP site's :class:`SitePrivacy` for one run, opened from its disk and checked; see the module docstring."""

    def __init__(self, privacy: SitePrivacy, *, path: Path, run_key: str, calibrations: CalibrationMemo | None = None) -> None:
        self.privacy = privacy
        self.path = path
        self.run_key = run_key
        self.calibrations = calibrations if calibrations is not None else CalibrationMemo()

    @classmethod
    def open(
        cls,
        *,
        config: FederationConfig,
        data: SiteData,
        runtime: SiteRuntime,
        plan: codec.PrivacyPlan | None,
        store: SiteStore,
        context: Context,
    ) -> SiteLedger | None:
        """The site's ledger for this round, or None when the site trains without DP.

        Raises
        ------
        SiteLedgerError
            The site's DP and the coordinator's plan disagree, or the ledger fails a check.
        """
        site = data.name
        options = site_privacy_options(config, data)
        if options is None:
            if plan is not None:
                raise SiteLedgerError(
                    f"site {site!r}: the coordinator sent a privacy plan, but this site's options ask for no DP "
                    "(its [privacy] changed since the run began?); refusing to train"
                )
            return None
        if plan is None:
            raise SiteLedgerError(
                f"site {site!r} trains with DP (ε = {options.epsilon:g}, δ = {options.delta:g}), but the coordinator "
                "sent no privacy plan (its [privacy] changed since the run began?); refusing to train without DP"
            )
        path = store.root / FILE
        saved = _read(path, site)
        memo = CalibrationMemo((saved or {}).get("calibrations"))
        _, models = make_algorithm(config, ModelFacts.of(data), dp_ready_preparer(config))  # the initial models, to probe
        privacy = plan_site(
            config, site, options, num_samples=data.size("train"), rounds=len(plan.rounds), first_info=plan.first,
            algorithm=runtime.algorithm, models=models,
            grad_sample_mode=resolve_grad_sample_mode(options.grad_sample_mode, runtime.network), calibrations=memo,
        )
        ledger = cls(privacy, path=path, run_key=store.run_key, calibrations=memo)
        ledger._load(saved, plan, _context_state(context, store.run_key))
        return ledger

    # ------------------------------------------------------------------ checks
    def _load(self, saved: Mapping[str, Any] | None, plan: codec.PrivacyPlan, in_context: Mapping[str, Any] | None) -> None:
        site, path = self.privacy.site, self.path
        seen = f"{plan.ledger_entries} entries, ε = {plan.ledger_epsilon:.4f}, digest {plan.ledger_digest[:12]}…"
        if saved is None:
            if plan.ledger_entries > 0:
                raise SiteLedgerError(
                    f"site {site!r}: its privacy ledger {path} is missing, but the coordinator has a ledger of this site "
                    f"({seen}); refusing to train from ε = 0. Restore the file, or start a new run"
                )
            if in_context is not None and _entries(in_context) > 0:
                raise SiteLedgerError(
                    f"site {site!r}: its privacy ledger {path} is missing, but this SuperNode's context holds one of "
                    f"{_entries(in_context)} entries; refusing to train from ε = 0"
                )
            return
        try:
            if saved.get("site") != site or saved.get("run_key") != self.run_key:
                raise LedgerStateError(f"it belongs to site {saved.get('site')!r}, run {saved.get('run_key')!r}")
            self.privacy.load_state_dict(saved["privacy"])
        except (LedgerStateError, KeyError, TypeError, ValueError) as exc:
            raise SiteLedgerError(f"site {site!r}: its privacy ledger {path} cannot be used ({exc}); refusing to train") from None
        history = self.privacy.ledger.history
        if prefix_digest(self.privacy.ledger, plan.ledger_entries) != plan.ledger_digest:
            raise SiteLedgerError(
                f"site {site!r}: its privacy ledger {path} ({len(history)} entries, ε = {self.privacy.ledger.epsilon():.4f}) "
                f"does not extend the ledger the coordinator last received from it ({seen}): it was replaced, edited "
                "or reset; refusing to train"
            )
        if in_context is not None:
            try:
                held = PrivacyLedger.from_state_dict(in_context["privacy"]["ledger"]).history
            except (LedgerStateError, KeyError, TypeError, ValueError):
                held = None
            if held is None or tuple(history[: len(held)]) != held:
                raise SiteLedgerError(
                    f"site {site!r}: its privacy ledger {path} does not extend the copy in this SuperNode's context "
                    "(the file was replaced or reset while the node ran); refusing to train"
                )

    # --------------------------------------------------------------- the round
    def can_train(self, round_idx: int) -> bool:
        """Whether round ``round_idx`` fits the budget (:meth:`SitePrivacy.can_train`; a refusal stops the site)."""
        if self.privacy.stopped:
            return False
        ok = self.privacy.can_train(round_idx)
        if not ok:
            p = self.privacy
            log.warning("round %d: site %s declines to train: its next round would take ε from %.4f to %.4f, past its "
                        "budget ε = %g (δ = %g)", round_idx, p.site, p.ledger.epsilon(),
                        p.ledger.epsilon_after(p.round_mechanisms(round_idx)), p.options.epsilon, p.options.delta)
        return ok

    def save(self, context: Context) -> None:
        """Write the state atomically on the site's disk, then into the node's context."""
        state = {"site": self.privacy.site, "run_key": self.run_key, "privacy": self.privacy.state_dict(),
                 "calibrations": self.calibrations.entries}
        text = json.dumps(state, indent=1, sort_keys=True) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, text)
        context.state[codec.PRIVACY_STATE] = ConfigRecord({"run-key": self.run_key, "state": text})

    def reply(self, round_idx: int, *, declined: bool = False) -> codec.PrivacyReply:
        """What the train reply carries: the state (for the coordinator's copy) and the simulation's report."""
        return codec.PrivacyReply(state=self.privacy.state_dict(), report=self.privacy.report(round_idx), declined=declined)


class CalibrationMemo(MutableMapping[tuple[Any, ...], Calibration]):
    """``plan_site``'s calibration memo as JSON: ``{json of (options, n, batch size, rounds, usage): calibration}``."""

    def __init__(self, entries: Mapping[str, Any] | None = None) -> None:
        self.entries: dict[str, dict[str, Any]] = {}
        for key, value in (entries or {}).items():
            if isinstance(key, str) and isinstance(value, dict):
                self.entries[key] = dict(value)

    @staticmethod
    def _key(key: tuple[Any, ...]) -> str:
        return json.dumps([dataclasses.asdict(x) if dataclasses.is_dataclass(x) and not isinstance(x, type) else x for x in key],
                          sort_keys=True)

    def __getitem__(self, key: tuple[Any, ...]) -> Calibration:
        try:
            return Calibration(**self.entries[self._key(key)])
        except TypeError:  # a stored entry of another shape: calibrate again
            raise KeyError(key) from None

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, tuple):
            return False
        try:
            self[key]
        except KeyError:
            return False
        return True

    def __setitem__(self, key: tuple[Any, ...], value: Calibration) -> None:
        self.entries[self._key(key)] = value.to_dict()

    def __delitem__(self, key: tuple[Any, ...]) -> None:
        del self.entries[self._key(key)]

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(())  # the keys are kept as JSON only

    def __len__(self) -> int:
        return len(self.entries)


def _read(path: Path, site: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SiteLedgerError(f"site {site!r}: its privacy ledger {path} is unreadable ({exc}); refusing to train") from None
    if not isinstance(saved, dict):
        raise SiteLedgerError(f"site {site!r}: its privacy ledger {path} is not a JSON object; refusing to train")
    return saved


def prefix_digest(ledger: PrivacyLedger, entries: int) -> str | None:
    """The digest of the first ``entries`` mechanisms of ``ledger`` (None when it has fewer)."""
    history = ledger.history
    if entries > len(history):
        return None
    head = PrivacyLedger(delta=ledger.delta, accountant=ledger.accountant, target_epsilon=ledger.target_epsilon, name=ledger.name)
    head.record(history[:entries])
    return head.digest()


def _context_state(context: Context, run_key: str) -> dict[str, Any] | None:
    record = context.state.config_records.get(codec.PRIVACY_STATE)
    if record is None or record.get("run-key") != run_key:
        return None
    try:
        state = json.loads(str(record["state"]))
    except (KeyError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _entries(state: Mapping[str, Any]) -> int:
    try:
        return len(state["privacy"]["ledger"]["history"])
    except (KeyError, TypeError):
        return 0
