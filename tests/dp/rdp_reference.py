"""An independent (ε, δ) reference for Poisson-subsampled Gaussian mechanisms, in numpy/scipy.

Written from the papers, not from Opacus' code:

- RDP of the sampled Gaussian mechanism at integer order α (Mironov, Talwar, Zhang 2019,
  "Rényi Differential Privacy of the Sampled Gaussian Mechanism", Sec. 3.3):
      A_α = Σ_{i=0}^{α} C(α, i) (1 − q)^{α−i} q^i exp((i² − i) / (2σ²)),   RDP(α) = log A_α / (α − 1);
  for q = 1 this is α / (2σ²) exactly.
- Composition adds RDP at each order.
- RDP → (ε, δ) (Balle et al. 2020, "Hypothesis testing interpretations and Rényi DP", Thm 21):
      ε = min_α  RDP(α) + log((α − 1)/α) − (log δ + log α)/(α − 1).
"""

from __future__ import annotations

import numpy as np
from scipy.special import gammaln, logsumexp

ORDERS = np.concatenate([np.arange(2, 257), [320, 384, 512, 768, 1024, 1536, 2048, 4096]])


def sgm_rdp(q: float, sigma: float, alpha: int) -> float:
    """RDP at integer order ``alpha`` of one step of the sampled Gaussian mechanism."""
    if q == 1.0:
        return alpha / (2 * sigma**2)
    i = np.arange(alpha + 1, dtype=np.float64)
    log_binom = gammaln(alpha + 1) - gammaln(i + 1) - gammaln(alpha - i + 1)
    terms = log_binom + (alpha - i) * np.log1p(-q) + i * np.log(q) + (i * i - i) / (2 * sigma**2)
    return float(logsumexp(terms)) / (alpha - 1)


def epsilon(history: list[tuple[float, float, int]], delta: float, orders: np.ndarray = ORDERS) -> float:
    """ε at ``delta`` of a composition ``[(sigma, q, steps), ...]``."""
    rdp = np.array([sum(steps * sgm_rdp(q, sigma, int(a)) for sigma, q, steps in history) for a in orders])
    eps = rdp + np.log((orders - 1) / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    return float(np.min(eps))


def sgm_rdp_numeric(q: float, sigma: float, alpha: float) -> float:
    """RDP at any order α > 1 by numerical integration of A_α = E_{z~N(0,σ²)}[((1−q) + q·exp((2z−1)/(2σ²)))^α].

    A second, formula-free route to the same quantity (for moderate α; the integrand overflows for large α/σ).
    """
    from scipy import integrate, stats

    def integrand(z: float) -> float:
        ratio = (1 - q) + q * np.exp((2 * z - 1) / (2 * sigma**2))
        return float(stats.norm.pdf(z, scale=sigma) * ratio**alpha)

    peak = alpha  # the tilted integrand peaks near z ≈ α for q → 1; integrate generously around it
    value, _ = integrate.quad(integrand, -12 * sigma, peak + 12 * sigma, limit=200, epsabs=0, epsrel=1e-12)
    return float(np.log(value)) / (alpha - 1)


FRACTIONAL = np.array([a / 10 for a in range(11, 110) if a % 10])  # 1.1 .. 10.9 without the integers


def epsilon_fine(history: list[tuple[float, float, int]], delta: float) -> float:
    """:func:`epsilon` over the integer orders plus fractional ones in (1, 11) by numerical integration.

    Small budgets with few steps have their best order between 1 and 3, where the integer grid
    alone is up to a few percent loose.
    """
    coarse = epsilon(history, delta)

    def rdp(q: float, sigma: float, alpha: float) -> float:
        return alpha / (2 * sigma**2) if q == 1.0 else sgm_rdp_numeric(q, sigma, alpha)

    values = [sum(steps * rdp(q, sigma, float(a)) for sigma, q, steps in history) for a in FRACTIONAL]
    fine = np.array(values) + np.log((FRACTIONAL - 1) / FRACTIONAL) - (np.log(delta) + np.log(FRACTIONAL)) / (FRACTIONAL - 1)
    return float(min(coarse, float(np.min(fine))))
