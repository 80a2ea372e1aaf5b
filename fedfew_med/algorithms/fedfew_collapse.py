"""Keeping FedFew's K models apart: ownership, re-seeding, and collapse diagnostics.

Observed on every federation with the reference preset (shared/docs/fedfew-algorithm.md §6):
one model takes c_k ≈ 1, the others stop moving and no site deploys them. Two
counter-measures live here, both pure functions or small state the server keeps:

- **Ownership.** Site i *owns* model ``argmin_k L_ik`` (its soft assignment's mode). A model
  that no replying site has owned for ``reseed_after`` consecutive rounds is idle.
- **Re-seeding.** An idle model is replaced by the worst-served site's own update of its best
  model, ``θ_j^(i*)`` with ``i* = argmax_i min_k A_ik`` and ``j = argmin_k A_i*k`` (the k-means
  rule for an empty cluster: restart it at the worst-fitted point). The copy already exists on
  the server (it is that site's reply), so the memory stays one extra model, flat in M. One
  model is re-seeded per round, so two idle models do not restart as the same copy.

  Privacy note: the re-seeded model is one site's update, broadcast to every site in the next
  round. Under site-level DP (``[privacy]``) that update is already private (post-processing);
  with server-side DP (``[server_privacy]``) re-seeding is refused, because the server's noise is
  calibrated for a step that is linear in the clipped updates.

:func:`model_spread` and :func:`models_in_use` give the numbers the round records and the
end-of-run summary report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedfew_med.algorithms.base import Params


@dataclass
class WorstServed:
    """The worst-served site seen so far in a round, and its update of its best model."""

    site: str | None = None
    score: float = -math.inf  # min_k A_ik of that site
    model: int = -1  # its best model j
    params: Params | None = None  # θ_j^(i*), a copy

    def offer(self, site: str, scaled: Sequence[float], models: Mapping[int, Params], keep: bool) -> None:
        """Consider a site with scaled losses ``A_i·`` (K,); keep its best model's update if it is the worst so far."""
        j = min(range(len(scaled)), key=lambda k: (scaled[k], k))
        if scaled[j] > self.score:
            self.site, self.score, self.model = site, float(scaled[j]), j
            self.params = {n: t.detach().clone() for n, t in models[j].items()} if keep and j in models else None


@dataclass
class Ownership:
    """Rounds since each model was last owned by a replying site (server state, saved in checkpoints)."""

    idle: list[int] = field(default_factory=list)

    def updated(self, owners: Sequence[int], k: int) -> list[int]:
        """The idle counts after a round in which ``owners`` (one model index per site) were owned."""
        idle = self.idle if len(self.idle) == k else [0] * k
        owned = set(owners)
        return [0 if m in owned else idle[m] + 1 for m in range(k)]

    def state_dict(self) -> dict[str, Any]:
        return {"idle": list(self.idle)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        idle = state.get("idle", [])
        if not isinstance(idle, list) or not all(isinstance(x, int) and x >= 0 for x in idle):
            raise ValueError(f"FedFew server state: 'idle' must be a list of counts >= 0, got {idle!r}")
        self.idle = list(idle)


def reseed(
    models: list[Params], idle: list[int], after: int, worst: WorstServed, round_idx: int
) -> tuple[list[Params], list[int], list[dict[str, Any]]]:
    """Replace the longest-idle model (idle ≥ ``after``) by the worst-served site's update.

    Returns the models, the idle counts (0 for a re-seeded model) and what was done, for the
    round record. Nothing happens when ``after`` is 0, no model is idle long enough, the round
    had no reply, or the idle model is the worst-served site's own best model.
    """
    if after <= 0 or worst.params is None:
        return models, idle, []
    candidates = [k for k in range(len(models)) if idle[k] >= after and k != worst.model]
    if not candidates:
        return models, idle, []
    k = max(candidates, key=lambda m: (idle[m], -m))
    new = list(models)
    new[k] = {n: worst.params[n].to(models[k][n].dtype).clone() for n in models[k]}
    record = {"model": k, "idle_rounds": idle[k], "from_site": worst.site, "from_model": worst.model, "round": round_idx}
    idle = [0 if m == k else c for m, c in enumerate(idle)]
    return new, idle, [record]


def models_in_use(owners: Sequence[int]) -> int:
    """Number of distinct models among the sites' choices."""
    return len(set(owners))


def model_spread(models: Sequence[Params]) -> float:
    """Largest pairwise distance between the K models over their mean norm (0: the K models are one).

    ``max_{a<b} ||θ_a − θ_b|| / mean_k ||θ_k||`` over all parameters; 0.0 for K = 1.
    """
    if len(models) < 2:
        return 0.0
    flat = [torch.cat([m[n].reshape(-1).to(torch.float64) for n in sorted(m)]) for m in models]
    scale = sum(float(f.norm()) for f in flat) / len(flat)
    gap = max(float((flat[a] - flat[b]).norm()) for a in range(len(flat)) for b in range(a + 1, len(flat)))
    return gap / scale if scale > 0 else 0.0


COLLAPSE_SPREAD = 0.01  # relative spread below which the K models are reported as one


def collapse_note(in_use: int, k: int, spread: float, alpha_max: float | None = None) -> str:
    """One line on model use, and why, for the end-of-run table, e.g. ``"sites use 2 of 3 models: ..."``.

    ``alpha_max`` is the mean over rounds of the largest site importance α_i (FedFew only): near 1, one
    site steered every step, which is how the reference preset collapses.
    """
    if k < 2:
        return f"one model (K = {k})"
    steered = (f"; α put {alpha_max:.2f} of the weight on one site per round on average, so its model took most steps"
               if alpha_max is not None and alpha_max > 0.8 else "")
    if spread < COLLAPSE_SPREAD:
        return f"sites use {in_use} of {k} models, and the {k} models collapsed into one (relative spread {spread:.3f}){steered}"
    if in_use < k:
        return (f"sites use {in_use} of {k} models: the other {k - in_use} fit no site better than these "
                f"(relative spread {spread:.2f}){steered}")
    return f"sites use all {k} models: each is the best fit of at least one site (relative spread {spread:.2f})"
