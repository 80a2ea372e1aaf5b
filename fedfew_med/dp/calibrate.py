"""Noise calibration over the WHOLE planned run, and the round plan it rests on.

A site's data is touched by two mechanisms every round (see :mod:`fedfew_med.dp.engine`):

- DP-SGD: every ``LocalWork.train`` call runs ``epochs × S`` Poisson-sampled steps
  with sample rate ``q = 1 / S``, ``S = ceil(n / batch_size)`` (Opacus' DPDataLoader
  convention: ``S`` steps per epoch of expected batch ``n·q ≈ batch_size``);
- the loss channel: every loss that can leave the site (one per ``train`` call, one per
  ``loss`` call) is a Gaussian mechanism on the full split (``q = 1``).

:func:`calibrate` finds the DP-SGD noise multiplier σ such that composing *everything*
the site will do — ``rounds × steps_per_round`` DP-SGD steps and ``rounds ×
loss_releases_per_round`` loss releases — stays within the target ε at δ, using the
configured Opacus accountant. Without a loss channel this is exactly
``opacus.accountants.utils.get_noise_multiplier``; with one it is a bisection over the
composed (grouped) history, the same history the ledger builds, so the planned ε and the
ledger's ε agree to the bit when the run goes as planned.

How many ``train``/``loss`` calls an algorithm makes per round is policy, so
:func:`probe_round` asks the algorithm itself: it runs ``local_round`` against a
counting :class:`LocalWork` that touches no data and trains nothing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from opacus.accountants.utils import get_noise_multiplier

from fedfew_med.algorithms.base import Algorithm, Params, Prox, RoundInfo, TrainResult, clone
from fedfew_med.dp.ledger import RDP_ORDERS, Mechanism, RdpCurves, epsilon_of, grouped_history
from fedfew_med.dp.options import PrivacyOptions

MAX_SIGMA = 1e6


class CalibrationError(ValueError):
    """The target ε cannot be met by the plan (e.g. the loss channel alone exceeds it)."""


def poisson_plan(num_samples: int, batch_size: int) -> tuple[float, int]:
    """``(sample_rate, steps_per_epoch)`` for ``num_samples`` records and an expected batch of ``batch_size``."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    steps = math.ceil(num_samples / batch_size)
    return 1.0 / steps, steps


@dataclass(frozen=True)
class Calibration:
    """The noise levels of one site's run and the plan they were computed for.

    Attributes
    ----------
    noise_multiplier
        DP-SGD σ (noise std = σ · max_grad_norm on the summed clipped gradients).
    loss_noise_multiplier
        Loss-channel σ_L (noise std = σ_L · loss_clip on the summed clipped losses).
    sample_rate, steps_per_epoch
        Poisson sampling of DP-SGD.
    steps_per_round, loss_releases_per_round, rounds
        The plan.
    epsilon
        ε of the whole plan at ``delta``: ≤ the target when σ is calibrated; with a fixed
        ``noise_multiplier`` it may exceed the target, and the site stops when its ledger says so.
    """

    noise_multiplier: float
    loss_noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    loss_releases_per_round: int
    rounds: int
    epsilon: float
    target_epsilon: float
    delta: float
    accountant: str
    steps_per_epoch: int = 0

    def round_mechanisms(self, round_idx: int = -1) -> list[Mechanism]:
        """The mechanisms one planned round applies (what ``ledger.can_afford`` is asked about)."""
        out = [Mechanism(self.noise_multiplier, self.sample_rate, self.steps_per_round, kind="dp-sgd", round=round_idx, label="plan")]
        if self.loss_releases_per_round:
            out.append(
                Mechanism(self.loss_noise_multiplier, 1.0, self.loss_releases_per_round, kind="loss", round=round_idx, label="plan")
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _get_noise_multiplier(**kwargs: Any) -> float:
    """Opacus' ``get_noise_multiplier``, with the accountant's grid-edge warnings and log(0) notes scoped away."""
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(get_noise_multiplier(**kwargs))


def _orders(accountant: str) -> dict[str, Any]:
    """The ledger's RDP orders, passed through ``get_noise_multiplier`` to the accountant (RDP only)."""
    return {"alphas": list(RDP_ORDERS)} if accountant == "rdp" else {}


def _whole_run(sigma: float, sigma_loss: float, *, q: float, steps: int, releases: int) -> list[tuple[float, float, int]]:
    mechs = [Mechanism(sigma, q, steps)]
    if releases:
        mechs.append(Mechanism(sigma_loss, 1.0, releases, kind="loss"))
    return grouped_history(mechs)


def _smallest_sigma(eps_of: Callable[[float], float], target: float, *, tolerance: float, what: str) -> float:
    """Smallest σ (to ``tolerance·target`` in ε) with ``eps_of(σ) <= target``; ``eps_of`` decreases in σ."""

    def eps(sigma: float) -> float:
        try:
            return eps_of(sigma)
        except (ValueError, OverflowError, FloatingPointError):  # numerics give out at tiny σ: treat as no privacy
            return math.inf

    lo, hi = 0.0, 1.0
    eps_lo, eps_hi = math.inf, eps(hi)
    while eps_hi > target:
        lo, eps_lo, hi = hi, eps_hi, 2.0 * hi
        if hi > MAX_SIGMA:
            raise CalibrationError(f"{what}: no noise multiplier up to {MAX_SIGMA:g} reaches ε = {target:g}")
        eps_hi = eps(hi)
    # Invariant: eps(lo) > target >= eps(hi). Each ε costs a full RDP curve, so instead of plain
    # bisection, step by regula falsi on log ε against log σ (nearly linear there), with the
    # Illinois down-weighting of a stale end; fall back to bisection where that is undefined.
    weight_lo = weight_hi = 1.0
    log_aim = math.log(target * (1.0 - 0.5 * tolerance))  # the middle of the accepted band, not its edge
    while target - eps_hi > tolerance * target and hi - lo > 1e-9 * hi:
        mid = 0.5 * (lo + hi)
        if lo > 0 and math.isfinite(eps_lo) and eps_hi > 0:
            f_lo, f_hi = weight_lo * (math.log(eps_lo) - log_aim), weight_hi * (math.log(eps_hi) - log_aim)
            x_lo, x_hi = math.log(lo), math.log(hi)
            guess = math.exp(x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo)) if f_hi != f_lo else mid
            mid = guess if lo < guess < hi else mid
        eps_mid = eps(mid)
        if eps_mid <= target:
            hi, eps_hi = mid, eps_mid
            weight_lo, weight_hi = weight_lo * 0.5, 1.0  # lo is stale: pull the next secant toward it
        else:
            lo, eps_lo = mid, eps_mid
            weight_hi, weight_lo = weight_hi * 0.5, 1.0
    return hi


def calibrate(
    options: PrivacyOptions,
    *,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    loss_releases_per_round: int,
    tolerance: float = 0.005,
    steps_per_epoch: int = 0,
    curves: RdpCurves | None = None,
) -> Calibration:
    """Noise multipliers such that the whole planned run spends at most ``options.epsilon``.

    Parameters
    ----------
    options
        The site's privacy options (ε, δ, accountant, loss channel).
    sample_rate
        DP-SGD Poisson sample rate q (see :func:`poisson_plan`).
    steps_per_round
        DP-SGD steps per round: (train calls per round, e.g. K) × local epochs × steps per epoch.
    rounds
        Planned rounds.
    loss_releases_per_round
        Loss-channel releases per round (e.g. K; see :func:`probe_round`).
    tolerance
        Relative slack: the planned ε lies in ``[target·(1 − tolerance), target]``
        (unless σ is pinned by the bisection's resolution).
    steps_per_epoch
        Recorded in the result (informative).
    curves
        RDP memo to share with other calibrations and ledgers of the run (optional).

    A fixed ``options.noise_multiplier > 0`` is used as σ instead of the search (the loss
    channel's σ_L is still derived as configured); the returned ``epsilon`` is then what the
    whole plan would spend, which may exceed the target.

    Raises
    ------
    CalibrationError
        If the loss channel alone (with a fixed ``loss_noise_multiplier``) already exceeds ε.
    """
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps_per_round < 1 or rounds < 1 or loss_releases_per_round < 0:
        raise ValueError(
            f"need steps_per_round >= 1, rounds >= 1, loss_releases_per_round >= 0; got {steps_per_round}, {rounds}, {loss_releases_per_round}"
        )
    eps, delta, acc = options.epsilon, options.delta, options.accountant
    curves = curves if curves is not None else RdpCurves()  # the loss channel's RDP: once for the whole bisection
    total_steps = rounds * steps_per_round
    releases = rounds * loss_releases_per_round

    sigma_loss = options.loss_noise_multiplier
    if releases and sigma_loss == 0.0:  # auto: the loss channel alone would spend loss_budget_share · ε
        sigma_loss = float(
            _get_noise_multiplier(
                target_epsilon=options.loss_budget_share * eps,
                target_delta=delta,
                sample_rate=1.0,
                steps=releases,
                accountant=acc,
                epsilon_tolerance=tolerance * options.loss_budget_share * eps,
                **_orders(acc),
            )
        )
    if options.noise_multiplier > 0:  # fixed σ: the plan may spend more than ε; the ledger stops the site in time
        sigma = options.noise_multiplier
    elif releases:
        alone = epsilon_of([(sigma_loss, 1.0, releases)], delta=delta, accountant=acc)
        if alone >= eps:
            raise CalibrationError(
                f"the loss channel alone spends ε = {alone:.3f} over {releases} releases, which leaves nothing of "
                f"the target ε = {eps:g}; raise loss_noise_multiplier (now {sigma_loss:g}) or use loss_noise_multiplier = 0"
            )
        sigma = _smallest_sigma(
            lambda s: epsilon_of(_whole_run(s, sigma_loss, q=sample_rate, steps=total_steps, releases=releases), delta=delta, accountant=acc, curves=curves),
            eps,
            tolerance=tolerance,
            what="DP-SGD calibration",
        )
    else:
        sigma = float(
            _get_noise_multiplier(
                target_epsilon=eps,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=total_steps,
                accountant=acc,
                epsilon_tolerance=tolerance * eps,
                **_orders(acc),
            )
        )
    planned = epsilon_of(
        _whole_run(sigma, sigma_loss, q=sample_rate, steps=total_steps, releases=releases), delta=delta, accountant=acc, curves=curves
    )
    if planned > eps and options.noise_multiplier == 0:  # cannot happen with the searches above; a guard
        raise CalibrationError(f"calibrated plan spends ε = {planned} > target {eps}")
    return Calibration(
        noise_multiplier=float(sigma),
        loss_noise_multiplier=float(sigma_loss) if releases else 0.0,
        sample_rate=float(sample_rate),
        steps_per_round=int(steps_per_round),
        loss_releases_per_round=int(loss_releases_per_round),
        rounds=int(rounds),
        epsilon=float(planned),
        target_epsilon=float(eps),
        delta=float(delta),
        accountant=acc,
        steps_per_epoch=int(steps_per_epoch),
    )


# ---------------------------------------------------------------------------- the round plan


@dataclass(frozen=True)
class RoundUsage:
    """What an algorithm's ``local_round`` asks of a site: epochs of each ``train`` call, and ``loss`` calls."""

    train_epochs: tuple[int, ...]
    loss_calls: int

    def steps_per_round(self, steps_per_epoch: int) -> int:
        """DP-SGD steps one round takes."""
        return sum(self.train_epochs) * steps_per_epoch

    @property
    def loss_releases(self) -> int:
        """Loss-channel releases one round makes (one per ``train`` call and per ``loss`` call)."""
        return len(self.train_epochs) + self.loss_calls


class _CountingWork:
    """A ``LocalWork`` that records calls and touches no data (returns the input params, loss 0)."""

    def __init__(self, *, num_samples: int, local_epochs: int, state: Mapping[str, Params] | None) -> None:
        self._n = num_samples
        self._epochs = local_epochs
        self._state: dict[str, Params] = {k: clone(v) for k, v in (state or {}).items()}
        self.train_epochs: list[int] = []
        self.loss_calls = 0

    @property
    def num_samples(self) -> int:
        return self._n

    @property
    def state(self) -> dict[str, Params]:
        return self._state

    def train(
        self, params: Params, *, slot: str, epochs: int | None = None, prox: Prox | None = None, from_slot: str | None = None
    ) -> TrainResult:
        e = self._epochs if epochs is None else epochs
        self.train_epochs.append(e)
        return TrainResult(params=clone(params), loss=0.0, steps=0, samples=0)

    def loss(self, params: Params, *, slot: str, split: str = "train") -> float:
        self.loss_calls += 1
        return 0.0


def probe_round(
    algorithm: Algorithm,
    site: str,
    info: RoundInfo,
    models: Mapping[int, Params],
    *,
    num_samples: int,
    local_epochs: int,
    state: Mapping[str, Params] | None = None,
) -> RoundUsage:
    """Count the ``train`` epochs and ``loss`` calls ``algorithm.local_round`` makes (no data is touched).

    Algorithms whose calls depend on the loss values (FedFew's sparse selection) are probed
    with all losses 0; if a real round asks for more, the ledger's runtime check stops the
    site before the budget is exceeded, so an under-count can only end training early.
    """
    work = _CountingWork(num_samples=num_samples, local_epochs=local_epochs, state=state)
    algorithm.local_round(site, info, {k: clone(v) for k, v in models.items()}, work)
    return RoundUsage(train_epochs=tuple(work.train_epochs), loss_calls=work.loss_calls)


def calibrate_site(
    options: PrivacyOptions,
    *,
    num_samples: int,
    batch_size: int,
    rounds: int,
    usage: RoundUsage,
    tolerance: float = 0.005,
    curves: RdpCurves | None = None,
) -> Calibration:
    """:func:`calibrate` for a site of ``num_samples`` records whose rounds look like ``usage``."""
    q, s = poisson_plan(num_samples, batch_size)
    if not usage.train_epochs:
        raise ValueError("the algorithm trains nothing at this site; there is no DP-SGD to calibrate")
    return calibrate(
        options,
        sample_rate=q,
        steps_per_round=usage.steps_per_round(s),
        rounds=rounds,
        loss_releases_per_round=usage.loss_releases,
        tolerance=tolerance,
        steps_per_epoch=s,
        curves=curves,
    )
