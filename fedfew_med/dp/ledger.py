"""The privacy ledger: one accountant per site (or for the server) for the whole run.

Every mechanism applied to a site's data is recorded as a :class:`Mechanism`
``(noise_multiplier, sample_rate, steps)`` with a label (kind, round, slot): the
DP-SGD steps of every model copy trained in every round, and every release of the
loss channel (a Gaussian mechanism with ``sample_rate = 1``). ε is computed by
one Opacus accountant (``RDPAccountant`` or ``PRVAccountant``) over the whole
history, so it always covers the run so far, never a single round.

Persistence without pickle: :meth:`PrivacyLedger.state_dict` is plain JSON (the
labelled history plus a SHA-256 digest of it); :meth:`PrivacyLedger.load_state_dict`
*replays* the history into a fresh accountant and refuses a state whose digest,
accountant or δ does not match. Stored in every checkpoint, a restart continues
from the spent budget instead of resetting it. (The digest detects accidental
edits and truncation; it is not a signature against someone who recomputes it.)

Composition is order-free, so the accountant's history is kept grouped by
``(noise_multiplier, sample_rate)`` in a canonical order: the same mechanisms give
the same ε whatever order they were recorded in (calibration relies on it).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

AccountantName = Literal["rdp", "prv"]

RDP_ORDERS: tuple[float, ...] = (
    *RDPAccountant.DEFAULT_ALPHAS,
    *(64, 80, 96, 128, 192, 256, 384, 512, 1024),
)
"""Rényi orders for the RDP accountant: Opacus' defaults (1.1–63) plus higher ones.

With orders only up to 63 the RDP → (ε, δ) conversion cannot certify ε below about
``log(1/δ)/62`` (≈ 0.19 at δ = 1e-5) however much noise is added, so small budgets (a
loss channel's share, ε ≤ 1 runs) would be over-noised or impossible. The extra orders
only make the bound tighter (a superset of the default grid); up to 1024 they certify ε
down to about 0.01 at δ = 1e-5."""
STATE_VERSION = 1


class PrivacyBudgetExhausted(RuntimeError):
    """Applying a mechanism would take a ledger past its target ε; nothing was recorded or run."""


class LedgerStateError(ValueError):
    """A ledger state cannot be loaded (corrupt, edited, or made with another accountant or δ)."""


@dataclass(frozen=True)
class Mechanism:
    """``steps`` compositions of a Poisson-subsampled Gaussian mechanism.

    Attributes
    ----------
    noise_multiplier
        σ: noise std divided by the L2 sensitivity.
    sample_rate
        q: probability that a record takes part in one step (1.0 for a full-data release).
    steps
        How many times it was applied.
    kind
        ``"dp-sgd"``, ``"loss"`` (loss channel) or ``"server"`` (server-side DP).
    round
        The round it belongs to (-1 when not tied to a round).
    label
        Free text such as the model slot (``"server/0"``).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    kind: str = "dp-sgd"
    round: int = -1
    label: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be a finite number > 0, got {self.noise_multiplier!r}")
        if not (0.0 < self.sample_rate <= 1.0):
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "noise_multiplier": float(self.noise_multiplier),
            "sample_rate": float(self.sample_rate),
            "steps": int(self.steps),
            "kind": self.kind,
            "round": int(self.round),
            "label": self.label,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Mechanism:
        """Inverse of :meth:`to_dict`."""
        return cls(
            noise_multiplier=float(data["noise_multiplier"]),
            sample_rate=float(data["sample_rate"]),
            steps=int(data["steps"]),
            kind=str(data.get("kind", "dp-sgd")),
            round=int(data.get("round", -1)),
            label=str(data.get("label", "")),
        )


def make_accountant(name: str) -> IAccountant:
    """A fresh Opacus accountant by name (``"rdp"`` or ``"prv"``)."""
    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise ValueError(f"accountant must be 'rdp' or 'prv', got {name!r}")


def grouped_history(mechanisms: Iterable[Mechanism]) -> list[tuple[float, float, int]]:
    """Opacus-style history ``[(σ, q, steps), ...]``, one entry per distinct (σ, q), in canonical order."""
    counts: dict[tuple[float, float], int] = {}
    for m in mechanisms:
        key = (float(m.noise_multiplier), float(m.sample_rate))
        counts[key] = counts.get(key, 0) + int(m.steps)
    return [(s, q, n) for (s, q), n in sorted(counts.items())]


class RdpCurves:
    """Per-step RDP of each (σ, q) over :data:`RDP_ORDERS`, memoised in the instance.

    ``epsilon`` is bit-identical to ``RDPAccountant.get_epsilon(delta, alphas=RDP_ORDERS)``
    (Opacus sums ``compute_rdp(q, σ, steps, orders)``, which is the per-step vector times
    ``steps``), but a ledger asked every round, or a bisection over one σ, recomputes only
    what changed. Each ledger / calibration owns its own instance (no global cache).
    """

    def __init__(self) -> None:
        self._unit: dict[tuple[float, float], np.ndarray] = {}

    def unit(self, sigma: float, q: float) -> np.ndarray:
        """RDP of one step at every order."""
        key = (float(sigma), float(q))
        if key not in self._unit:
            self._unit[key] = np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(RDP_ORDERS)))
        return self._unit[key]

    def epsilon(self, history: Sequence[tuple[float, float, int]], *, delta: float) -> float:
        """ε at ``delta`` of an Opacus-style history (Opacus' RDP → (ε, δ) conversion)."""
        if not history:
            return 0.0
        rdp = sum([self.unit(sigma, q) * steps for sigma, q, steps in history])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the")  # loose at the grid's edge: safe
            eps, _ = rdp_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
        eps = float(eps)
        return eps if math.isfinite(eps) else math.inf


def epsilon_of(
    history: Sequence[tuple[float, float, int]], *, delta: float, accountant: str, curves: RdpCurves | None = None
) -> float:
    """ε at ``delta`` of an Opacus-style history, computed by an Opacus accountant (0 for no history).

    RDP uses the orders :data:`RDP_ORDERS` (through ``curves`` when given, same result);
    PRV its default error bounds (the upper bound is returned).
    """
    if not history:
        return 0.0
    if accountant == "rdp" and curves is not None:
        return curves.epsilon(history, delta=delta)
    acc = make_accountant(accountant)
    acc.history = [tuple(h) for h in history]
    with warnings.catch_warnings(), np.errstate(divide="ignore"):  # PRV evaluates log(1 - q) = -inf at q = 1
        # RDP warns when the best order is at the end of its grid; the bound is then loose
        # (over-estimated), which is safe. Scoped to this call: no global filter.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        if accountant == "rdp":
            eps = float(acc.get_epsilon(delta=delta, alphas=list(RDP_ORDERS)))
        else:
            eps = float(acc.get_epsilon(delta=delta))
    return eps if math.isfinite(eps) else math.inf


def _digest(entries: Sequence[Mapping[str, Any]], *, accountant: str, delta: float) -> str:
    blob = json.dumps({"accountant": accountant, "delta": delta, "history": list(entries)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class PrivacyLedger:
    """All mechanisms applied to one party's data during a run, and the ε they add up to.

    Parameters
    ----------
    delta
        The δ at which ε is reported and enforced.
    accountant
        ``"rdp"`` or ``"prv"`` (Opacus accountants).
    target_epsilon
        The budget; :meth:`spend` refuses what would exceed it. ``None``: no budget (record only).
    name
        Whose ledger (site name, ``"server"``), for messages.
    curves
        Memo of per-step RDP curves; share one per run so that sites with the same (σ, q)
        compute it once (a cache, not state: results are identical without it).
    """

    def __init__(
        self,
        *,
        delta: float,
        accountant: str = "rdp",
        target_epsilon: float | None = None,
        name: str = "",
        curves: RdpCurves | None = None,
    ) -> None:
        if not (0.0 < delta < 1.0):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if target_epsilon is not None and not target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
        make_accountant(accountant)  # validates the name
        self.delta = float(delta)
        self.accountant = accountant
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.name = name
        self._history: list[Mechanism] = []
        self._eps_cache: tuple[int, float, float] | None = None  # (len(history), delta, ε)
        self._curves = curves if curves is not None else RdpCurves()
        self._after_cache: tuple[tuple[tuple[float, float, int], ...], float] | None = None

    # ----------------------------------------------------------------- reading
    @property
    def history(self) -> tuple[Mechanism, ...]:
        """Every recorded mechanism, in order."""
        return tuple(self._history)

    def opacus_history(self) -> list[tuple[float, float, int]]:
        """The history as an Opacus accountant holds it (grouped by (σ, q))."""
        return grouped_history(self._history)

    def make_accountant(self) -> IAccountant:
        """A fresh Opacus accountant replaying this ledger's history."""
        acc = make_accountant(self.accountant)
        acc.history = self.opacus_history()
        return acc

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default: the ledger's δ)."""
        d = self.delta if delta is None else float(delta)
        if self._eps_cache is not None and self._eps_cache[:2] == (len(self._history), d):
            return self._eps_cache[2]
        eps = epsilon_of(self.opacus_history(), delta=d, accountant=self.accountant, curves=self._curves)
        self._eps_cache = (len(self._history), d, eps)
        return eps

    def epsilon_after(self, mechanisms: Iterable[Mechanism]) -> float:
        """ε the ledger would show after also recording ``mechanisms`` (nothing is recorded)."""
        history = tuple(grouped_history([*self._history, *mechanisms]))
        if self._after_cache is not None and self._after_cache[0] == history:  # can_afford then spend: computed once
            return self._after_cache[1]
        eps = epsilon_of(history, delta=self.delta, accountant=self.accountant, curves=self._curves)
        self._after_cache = (history, eps)
        return eps

    def can_afford(self, mechanisms: Iterable[Mechanism]) -> bool:
        """Whether recording ``mechanisms`` keeps ε within the target (always true without a target)."""
        mechs = list(mechanisms)
        if self.target_epsilon is None or not mechs:
            return True
        return self.epsilon_after(mechs) <= self.target_epsilon

    @property
    def remaining_epsilon(self) -> float | None:
        """Target minus spent ε (``None`` without a target)."""
        return None if self.target_epsilon is None else max(0.0, self.target_epsilon - self.epsilon())

    def total_steps(self, kind: str | None = None) -> int:
        """Compositions recorded (of one kind, or all)."""
        return sum(m.steps for m in self._history if kind is None or m.kind == kind)

    def digest(self) -> str:
        """SHA-256 of the canonical JSON history (with accountant and δ)."""
        return _digest([m.to_dict() for m in self._history], accountant=self.accountant, delta=self.delta)

    # ----------------------------------------------------------------- writing
    def record(self, mechanisms: Iterable[Mechanism]) -> None:
        """Record mechanisms that were (or are about to be) applied, without a budget check."""
        mechs = list(mechanisms)
        for m in mechs:
            if not isinstance(m, Mechanism):
                raise TypeError(f"expected Mechanism, got {type(m).__name__}")
        self._history.extend(mechs)

    def spend(self, mechanisms: Iterable[Mechanism]) -> float:
        """Check the budget, then record; returns ε after. Call *before* touching the data.

        Raises
        ------
        PrivacyBudgetExhausted
            If the mechanisms would take ε past the target (nothing is recorded).
        """
        mechs = list(mechanisms)
        after = self.epsilon_after(mechs) if mechs else self.epsilon()
        if self.target_epsilon is not None and after > self.target_epsilon:
            raise PrivacyBudgetExhausted(
                f"{self.name or 'ledger'}: privacy budget exhausted: ε would reach {after:.4f} "
                f"(spent {self.epsilon():.4f}) but the target is ε = {self.target_epsilon:g} at δ = {self.delta:g}"
            )
        self._history.extend(mechs)
        self._eps_cache = (len(self._history), self.delta, after)
        return after

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: labelled history, its digest, and the Opacus accountant's own history."""
        entries = [m.to_dict() for m in self._history]
        acc = self.make_accountant().state_dict()
        return {
            "version": STATE_VERSION,
            "name": self.name,
            "accountant": self.accountant,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "history": entries,
            "digest": _digest(entries, accountant=self.accountant, delta=self.delta),
            "opacus": {"mechanism": acc["mechanism"], "history": [list(h) for h in acc["history"]]},
            "epsilon": self.epsilon(),  # informative only; recomputed on load
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the history with a saved one, after checking it; ε is recomputed by replay.

        Raises
        ------
        LedgerStateError
            Wrong version, accountant, δ or target, malformed entries, or a digest mismatch.
        """
        where = f"privacy ledger {self.name!r}" if self.name else "privacy ledger"
        state = copy.deepcopy(dict(state))  # never alias the caller's state
        if state.get("version") != STATE_VERSION:
            raise LedgerStateError(f"{where}: state version must be {STATE_VERSION}, got {state.get('version')!r}")
        if state.get("accountant") != self.accountant:
            raise LedgerStateError(f"{where}: state was made with accountant {state.get('accountant')!r}, this ledger uses {self.accountant!r}")
        if state.get("delta") != self.delta:
            raise LedgerStateError(f"{where}: state was made for δ = {state.get('delta')!r}, this ledger uses δ = {self.delta!r}")
        if state.get("target_epsilon") != self.target_epsilon:
            raise LedgerStateError(
                f"{where}: state was made for target ε = {state.get('target_epsilon')!r}, this ledger has {self.target_epsilon!r}"
            )
        entries = state.get("history")
        if not isinstance(entries, list):
            raise LedgerStateError(f"{where}: state 'history' must be a list, got {type(entries).__name__}")
        if _digest(entries, accountant=self.accountant, delta=self.delta) != state.get("digest"):
            raise LedgerStateError(f"{where}: history digest does not match; the state was edited or truncated")
        try:
            history = [Mechanism.from_dict(e) for e in entries]
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerStateError(f"{where}: malformed history entry ({exc})") from None
        opacus = state.get("opacus")
        if opacus is not None and [tuple(h) for h in opacus.get("history", [])] != grouped_history(history):
            raise LedgerStateError(f"{where}: the Opacus history does not match a replay of the labelled history")
        self._history = history
        self._eps_cache = None

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PrivacyLedger:
        """A ledger rebuilt from :meth:`state_dict` alone."""
        ledger = cls(
            delta=float(state["delta"]),
            accountant=str(state["accountant"]),
            target_epsilon=None if state.get("target_epsilon") is None else float(state["target_epsilon"]),
            name=str(state.get("name", "")),
        )
        ledger.load_state_dict(state)
        return ledger

    def copy(self) -> PrivacyLedger:
        """An independent copy (same history)."""
        other = PrivacyLedger(
            delta=self.delta, accountant=self.accountant, target_epsilon=self.target_epsilon, name=self.name, curves=self._curves
        )
        other._history = list(self._history)
        return other

    def __len__(self) -> int:
        return len(self._history)

    def __repr__(self) -> str:
        return f"PrivacyLedger(name={self.name!r}, accountant={self.accountant!r}, entries={len(self._history)}, δ={self.delta:g})"
