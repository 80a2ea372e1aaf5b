"""FedFew's smooth Tchebycheff set scalarization: α, w, c and g in log space.

Pure functions on an (M sites, K models) loss matrix; see
``shared/docs/fedfew-algorithm.md`` §1::

    A_ik = λ_i L_ik
    S_i  = Σ_k exp(-A_ik/μ)
    g    = μ log Σ_i S_i^{-1}
    w_ik = softmax_k(-A_ik/μ)           (soft assignment, rows sum to 1)
    α_i  = softmax_i(-log S_i)          (site importance, sums to 1)
    ∂g/∂L_ik = λ_i α_i w_ik

Two generalisations, both off in the reference preset:

- ``mu_site`` (μ_α): a separate temperature for the outer max over sites. The inner
  soft-min over models keeps μ (μ_w); then ``softmin_i = -μ_w log S_i``,
  ``g = μ_α log Σ_i exp(softmin_i/μ_α)``, ``α_i = softmax_i(-(μ_w/μ_α) log S_i)`` and
  still ``∂g/∂A_ik = α_i w_ik``. One μ cannot make the assignment w hard (model gaps
  at one site are small) and the site weights α soft (gaps between sites are large) at once.
- ``loss_scale = "log"``: ``A_ik = log λ_i + log L_ik``. The log is monotone, so the
  non-smooth objective ``max_i min_k A_ik`` has the same minimisers as on the linear
  scale, but μ becomes a *relative* loss gap (μ_w = 0.1: a model with a 10 % lower
  loss gets e ≈ 2.7 times the weight), the same on every data set and in every round,
  and ``α_i ∝ (λ_i min_k L_ik)^(1/μ_α)`` approximately (μ_α = 1: λ_i times the loss, q-FFL's weights with q = 1).

Everything goes through ``torch.logsumexp``: with μ = 0.01 and losses of order
1, ``exp(-A/μ)`` under- or overflows in float64 long before the weights do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

LossScale = Literal["linear", "log"]
LOSS_FLOOR = 1e-8  # log scale: a loss of exactly 0 would be -inf


@dataclass(frozen=True)
class FedFewWeights:
    """Weights of one round. Shapes: alpha (M,), w (M, K), c (K,)."""

    log_alpha: torch.Tensor  # (M,)
    log_w: torch.Tensor  # (M, K)
    objective: float  # g, the smoothed max-min of A

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp()

    @property
    def w(self) -> torch.Tensor:
        return self.log_w.exp()

    @property
    def step_weights(self) -> torch.Tensor:
        """α_i w_ik, the weight of site i's delta in model k's step. Shape (M, K)."""
        return (self.log_alpha[:, None] + self.log_w).exp()

    @property
    def c(self) -> torch.Tensor:
        """Total step weight of each model, c_k = Σ_i α_i w_ik (sums to 1). Shape (K,)."""
        return torch.logsumexp(self.log_alpha[:, None] + self.log_w, dim=0).exp()

    @property
    def alpha_entropy(self) -> float:
        """Entropy of α in nats (0: one site holds all importance; log M: uniform)."""
        return float(-(self.alpha * self.log_alpha).sum())

    @property
    def w_entropy(self) -> torch.Tensor:
        """Entropy of each site's soft assignment in nats (log K: undecided). Shape (M,)."""
        return -(self.w * self.log_w).sum(dim=1)


def _check(losses: torch.Tensor, lambdas: torch.Tensor, mu: float) -> None:
    if losses.ndim != 2:
        raise ValueError(f"losses must be a 2-D (sites, models) matrix, got shape {tuple(losses.shape)}")
    if lambdas.shape != losses.shape[:1]:
        raise ValueError(f"lambdas must have shape ({losses.shape[0]},), got {tuple(lambdas.shape)}")
    if not mu > 0 or not math.isfinite(mu):
        raise ValueError(f"mu must be a finite number > 0, got {mu!r}")
    if not torch.isfinite(losses).all():
        raise ValueError("losses must all be finite")


def scaled_losses(losses: torch.Tensor, lambdas: torch.Tensor, loss_scale: LossScale = "linear") -> torch.Tensor:
    """``A_ik``: ``λ_i L_ik`` (linear) or ``log λ_i + log L_ik`` (log). Shapes (M, K), (M,) -> (M, K)."""
    losses = torch.as_tensor(losses, dtype=torch.float64)
    lambdas = torch.as_tensor(lambdas, dtype=torch.float64)
    if loss_scale == "log":
        return lambdas.log()[:, None] + losses.clamp_min(LOSS_FLOOR).log()
    return lambdas[:, None] * losses


def site_exponent(mu: float, mu_site: float | None) -> float:
    """``μ_w / μ_α``: the power of ``S_i^{-1}`` in α_i (1 when the outer temperature is μ itself)."""
    return 1.0 if mu_site is None else mu / mu_site


def fedfew_weights(
    losses: torch.Tensor,
    lambdas: torch.Tensor,
    mu: float,
    *,
    mu_site: float | None = None,
    loss_scale: LossScale = "linear",
) -> FedFewWeights:
    """Compute α, w and g from an (M, K) loss matrix, in float64 log space.

    Parameters
    ----------
    losses
        ``L_ik``, shape (M, K).
    lambdas
        Site weights ``λ_i``, shape (M,), usually n_i / Σ n_j or 1/M.
    mu
        Smoothing temperature μ > 0 (on the scale of ``A``); with ``mu_site`` it smooths only
        the min over models.
    mu_site
        Temperature of the max over sites (None: ``mu``, the reference scalarization).
    loss_scale
        ``"linear"`` (reference) or ``"log"``; see the module docstring.
    """
    losses = torch.as_tensor(losses, dtype=torch.float64)
    lambdas = torch.as_tensor(lambdas, dtype=torch.float64)
    _check(losses, lambdas, mu)
    if mu_site is not None and (not mu_site > 0 or not math.isfinite(mu_site)):
        raise ValueError(f"mu_site must be a finite number > 0, got {mu_site!r}")
    z = -scaled_losses(losses, lambdas, loss_scale) / mu  # (M, K)  = -A_ik/μ
    log_s = torch.logsumexp(z, dim=1)  # (M,)    = log S_i
    log_w = z - log_s[:, None]  # (M, K)
    outer = -site_exponent(mu, mu_site) * log_s  # (M,) softmin_i / μ_α
    log_alpha = outer - torch.logsumexp(outer, dim=0)  # (M,)
    objective = float((mu if mu_site is None else mu_site) * torch.logsumexp(outer, dim=0))
    return FedFewWeights(log_alpha=log_alpha, log_w=log_w, objective=objective)


def smooth_objective(
    losses: torch.Tensor, lambdas: torch.Tensor, mu: float, *, mu_site: float | None = None, loss_scale: LossScale = "linear"
) -> torch.Tensor:
    """g(L) as a differentiable scalar (for autograd checks): μ_α log Σ_i exp(-μ log S_i / μ_α)."""
    z = -scaled_losses(losses, lambdas, loss_scale) / mu
    outer = -site_exponent(mu, mu_site) * torch.logsumexp(z, dim=1)
    return (mu if mu_site is None else mu_site) * torch.logsumexp(outer, dim=0)


def objective_gradient(
    losses: torch.Tensor, lambdas: torch.Tensor, mu: float, *, mu_site: float | None = None, loss_scale: LossScale = "linear"
) -> torch.Tensor:
    """Analytic ∂g/∂L_ik: ``λ_i α_i w_ik`` (linear) or ``α_i w_ik / L_ik`` (log). Shape (M, K)."""
    weights = fedfew_weights(losses, lambdas, mu, mu_site=mu_site, loss_scale=loss_scale)
    if loss_scale == "log":
        return weights.step_weights / torch.as_tensor(losses, dtype=torch.float64).clamp_min(LOSS_FLOOR)
    return torch.as_tensor(lambdas, dtype=torch.float64)[:, None] * weights.step_weights


def site_assignment(losses: torch.Tensor, lam: float, mu: float, loss_scale: LossScale = "linear") -> torch.Tensor:
    """One site's soft assignment w_i = softmax_k(-A_ik / μ), computable at the site. Shape (K,)."""
    a = scaled_losses(torch.as_tensor(losses, dtype=torch.float64)[None, :], torch.tensor([lam], dtype=torch.float64), loss_scale)
    return torch.softmax(-a[0] / mu, dim=0)


def annealed_mu(mu_start: float, mu_end: float | None, round_idx: int, num_rounds: int) -> float:
    """Geometric schedule from ``mu_start`` (round 0) to ``mu_end`` (last round); constant if None."""
    if mu_end is None or num_rounds <= 1:
        return mu_start
    t = round_idx / (num_rounds - 1)
    return float(mu_start * (mu_end / mu_start) ** t)
