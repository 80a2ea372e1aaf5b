"""Weighted sums of parameter deltas, accumulated as updates arrive.

The server never needs all M updates at once: :class:`DeltaSum` keeps one
running sum per server model, so its memory grows with K, not with M.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedfew_med.algorithms.base import Params


class DeltaSum:
    """Running ``Σ_i weight_i · (θ_i − base)`` for one model, in float64.

    Parameters
    ----------
    base
        The model the deltas are taken against (the server's current model).
    """

    def __init__(self, base: Params) -> None:
        self.base = base
        self.total: dict[str, torch.Tensor] = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in base.items()}
        self.weight = 0.0
        self.count = 0

    def add(self, params: Mapping[str, torch.Tensor], weight: float) -> None:
        """Add ``weight · (params − base)``; ``params`` must have exactly the base's keys and shapes."""
        if set(params) != set(self.base):
            missing = sorted(set(self.base) - set(params))
            extra = sorted(set(params) - set(self.base))
            raise ValueError(f"update keys differ from the model: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, base in self.base.items():
            value = params[name]
            if value.shape != base.shape:
                raise ValueError(f"update {name!r} has shape {tuple(value.shape)}, the model has {tuple(base.shape)}")
            self.total[name].add_(value.to(torch.float64) - base.to(torch.float64), alpha=weight)
        self.weight += weight
        self.count += 1

    def apply(self, *, scale: float = 1.0) -> Params:
        """``base + scale · Σ w_i Δ_i`` in the base's dtype (server learning rate ``scale``)."""
        return {k: (b.to(torch.float64) + scale * self.total[k]).to(b.dtype) for k, b in self.base.items()}

    def average(self) -> Params:
        """``base + Σ w_i Δ_i / Σ w_i`` (a weighted mean of the models); the base if nothing was added."""
        if self.weight <= 0:
            return {k: v.clone() for k, v in self.base.items()}
        return self.apply(scale=1.0 / self.weight)


class LogWeightedDeltaSum:
    """Running ``Σ_i exp(log_w_i) · (θ_i − base)`` kept as ``exp(m) · Σ_i exp(log_w_i − m) Δ_i``.

    The running maximum ``m`` of the log weights is rescaled as larger weights arrive
    (the online-softmax trick), so weights like ``exp(-A/μ)`` with μ = 0.001 neither
    overflow nor vanish before they are normalised.
    """

    def __init__(self, base: Params) -> None:
        self.inner = DeltaSum(base)
        self.log_max = -math.inf

    @property
    def count(self) -> int:
        return self.inner.count

    def add(self, params: Mapping[str, torch.Tensor], log_weight: float) -> None:
        """Add ``exp(log_weight) · (params − base)``."""
        if log_weight > self.log_max:
            if self.inner.count:
                shrink = math.exp(self.log_max - log_weight)
                for t in self.inner.total.values():
                    t.mul_(shrink)
            self.log_max = log_weight
        self.inner.add(params, math.exp(log_weight - self.log_max))

    def apply(self, *, log_scale: float = 0.0, scale: float = 1.0) -> Params:
        """``base + scale · exp(log_scale) · Σ_i exp(log_w_i) Δ_i``; the base if nothing was added."""
        if not self.inner.count:
            return {k: v.clone() for k, v in self.inner.base.items()}
        return self.inner.apply(scale=scale * math.exp(self.log_max + log_scale))


def weighted_average(base: Params, updates: list[tuple[Params, float]]) -> Params:
    """Weighted mean of ``updates`` (each ``(params, weight)``), expressed as ``base`` plus mean delta."""
    acc = DeltaSum(base)
    for params, weight in updates:
        acc.add(params, weight)
    return acc.average()
