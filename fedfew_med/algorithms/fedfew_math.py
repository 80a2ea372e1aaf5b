"""FedFew's smooth Tchebycheff set scalarization: α, w, c and g in log space.

Pure functions on an (M sites, K models) loss matrix; see
``shared/docs/fedfew-algorithm.md`` §1::

    A_ik = λ_i L_ik
    S_i  = Σ_k exp(-A_ik/μ)
    g    = μ log Σ_i S_i^{-1}
    w_ik = softmax_k(-A_ik/μ)           (soft assignment, rows sum to 1)
    α_i  = softmax_i(-log S_i)          (site importance, sums to 1)
    ∂g/∂L_ik = λ_i α_i w_ik

Everything goes through ``torch.logsumexp``: with μ = 0.01 and losses of order
1, ``exp(-A/μ)`` under- or overflows in float64 long before the weights do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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


def fedfew_weights(losses: torch.Tensor, lambdas: torch.Tensor, mu: float) -> FedFewWeights:
    """Compute α, w and g from an (M, K) loss matrix, in float64 log space.

    Parameters
    ----------
    losses
        ``L_ik``, shape (M, K).
    lambdas
        Site weights ``λ_i``, shape (M,), usually n_i / Σ n_j or 1/M.
    mu
        Smoothing temperature μ > 0 (on the λ-scaled loss scale).
    """
    losses = torch.as_tensor(losses, dtype=torch.float64)
    lambdas = torch.as_tensor(lambdas, dtype=torch.float64)
    _check(losses, lambdas, mu)
    z = -(lambdas[:, None] * losses) / mu  # (M, K)  = -A_ik/μ
    log_s = torch.logsumexp(z, dim=1)  # (M,)    = log S_i
    log_w = z - log_s[:, None]  # (M, K)
    log_alpha = -log_s - torch.logsumexp(-log_s, dim=0)  # (M,)
    objective = float(mu * torch.logsumexp(-log_s, dim=0))
    return FedFewWeights(log_alpha=log_alpha, log_w=log_w, objective=objective)


def smooth_objective(losses: torch.Tensor, lambdas: torch.Tensor, mu: float) -> torch.Tensor:
    """g(L) as a differentiable scalar (for autograd checks): μ log Σ_i (Σ_k e^{-λ_i L_ik/μ})^{-1}."""
    z = -(lambdas[:, None] * losses) / mu
    return mu * torch.logsumexp(-torch.logsumexp(z, dim=1), dim=0)


def objective_gradient(losses: torch.Tensor, lambdas: torch.Tensor, mu: float) -> torch.Tensor:
    """Analytic ∂g/∂L_ik = λ_i α_i w_ik. Shape (M, K)."""
    weights = fedfew_weights(losses, lambdas, mu)
    return torch.as_tensor(lambdas, dtype=torch.float64)[:, None] * weights.step_weights


def site_assignment(losses: torch.Tensor, lam: float, mu: float) -> torch.Tensor:
    """One site's soft assignment w_i = softmax_k(-λ_i L_ik / μ), computable at the site. Shape (K,)."""
    z = -lam * torch.as_tensor(losses, dtype=torch.float64) / mu
    return torch.softmax(z, dim=0)


def annealed_mu(mu_start: float, mu_end: float | None, round_idx: int, num_rounds: int) -> float:
    """Geometric schedule from ``mu_start`` (round 0) to ``mu_end`` (last round); constant if None."""
    if mu_end is None or num_rounds <= 1:
        return mu_start
    t = round_idx / (num_rounds - 1)
    return float(mu_start * (mu_end / mu_start) ** t)
