"""Weighted sums of parameter deltas, accumulated as updates arrive.

The server never needs all M updates at once: :class:`DeltaSum` keeps one
running sum per server model, so its memory grows with K, not with M.
"""

from __future__ import annotations

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


def weighted_average(base: Params, updates: list[tuple[Params, float]]) -> Params:
    """Weighted mean of ``updates`` (each ``(params, weight)``), expressed as ``base`` plus mean delta."""
    acc = DeltaSum(base)
    for params, weight in updates:
        acc.add(params, weight)
    return acc.average()
