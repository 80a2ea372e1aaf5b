"""FedFew: K shared models, each site served by the one that fits it best.

Round (shared/docs/fedfew-algorithm.md §2): every participant trains each of its
K received copies for E local epochs and reports K losses; the server computes α
and w from the λ-scaled losses and moves model k by Σ_i α_i w_ik Δ_ik. A site
deploys ``argmin_k L_i(θ_k)``.

Options beyond the reference (all default to the reference behaviour):

- ``init``: ``identical`` copies of one init (reference), ``perturbed`` copies
  plus Gaussian noise of relative size ``perturb_scale``, or ``independent`` inits.
- ``loss_source``: ``train`` (running loss of the last local epoch, reference) or
  ``received`` (loss of the received model, one extra forward pass per model;
  matches the gradient formula exactly).
- ``selection_split``: deploy by loss on ``train`` (reference) or the held-out ``val`` slice.
- ``mu_end``: geometric annealing of μ from ``mu`` to ``mu_end`` over the run.
- ``site_weights``: λ_i = n_i/N (``samples``, reference) or 1/M (``uniform``).
- ``sparse``: ``top_r`` or ``threshold``: a site computes its own w_i from the
  received models' losses and trains/returns only its r best models or those with
  w_ik ≥ ``sparse_threshold`` (always at least its best one). Models it does not
  return count as unchanged (Δ = 0) in the server step; their reported loss is
  the received-model loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from fedfew_med.algorithms.aggregate import LogWeightedDeltaSum
from fedfew_med.algorithms.base import (
    Aggregation,
    Algorithm,
    Deployment,
    LocalWork,
    Params,
    RoundInfo,
    ServerStep,
    SiteReply,
    argmin_loss,
)
from fedfew_med.algorithms.fedfew_math import annealed_mu, fedfew_weights, site_assignment
from fedfew_med.config import require


@dataclass(frozen=True)
class FedFewOptions:
    """Options of FedFew (config section ``[algorithm.params]``)."""

    k: int = 3
    mu: float = 0.01
    mu_end: float | None = None
    init: Literal["identical", "perturbed", "independent"] = "identical"
    perturb_scale: float = 0.01
    loss_source: Literal["train", "received"] = "train"
    selection_split: Literal["train", "val"] = "train"
    site_weights: Literal["samples", "uniform"] = "samples"
    sparse: Literal["none", "top_r", "threshold"] = "none"
    sparse_r: int = 1
    sparse_threshold: float = 0.1
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        require(self.k >= 1, "k", "be an integer >= 1", self.k)
        require(self.mu > 0, "mu", "be > 0", self.mu)
        require(self.mu_end is None or self.mu_end > 0, "mu_end", "be > 0", self.mu_end)
        require(self.perturb_scale >= 0, "perturb_scale", "be >= 0", self.perturb_scale)
        require(1 <= self.sparse_r <= self.k, "sparse_r", f"be between 1 and k ({self.k})", self.sparse_r)
        require(0 < self.sparse_threshold <= 1, "sparse_threshold", "be in (0, 1]", self.sparse_threshold)
        require(self.server_lr > 0, "server_lr", "be > 0", self.server_lr)


def perturbed_copies(base: Params, k: int, scale: float, generator: torch.Generator) -> list[Params]:
    """K copies of ``base``; copies 1.. get Gaussian noise of std ``scale · std(tensor)`` per tensor."""
    out = [{n: v.clone() for n, v in base.items()}]
    for _ in range(1, k):
        copy = {}
        for name, v in base.items():
            spread = float(v.float().std()) if v.numel() > 1 else float(v.abs().mean())
            noise = torch.randn(v.shape, generator=generator, dtype=torch.float32).to(v.dtype)
            copy[name] = v + noise * (scale * (spread if spread > 0 else 1.0))
        out.append(copy)
    return out


class FedFew(Algorithm):
    """Few-for-Many personalized FL (smooth Tchebycheff set scalarization)."""

    name: ClassVar[str] = "fedfew"
    Options: ClassVar[type] = FedFewOptions

    def __init__(self, options: FedFewOptions | None = None, *, seed: int = 0) -> None:
        self.options = options or FedFewOptions()
        self.seed = seed

    @property
    def num_models(self) -> int:
        return self.options.k

    def init_models(self, make_init: Callable[[int], Params]) -> list[Params]:
        o = self.options
        if o.init == "independent":
            return [make_init(k) for k in range(o.k)]
        base = make_init(0)
        if o.init == "perturbed":
            gen = torch.Generator().manual_seed(self.seed + 7919)
            return perturbed_copies(base, o.k, o.perturb_scale, gen)
        return [{n: v.clone() for n, v in base.items()} for _ in range(o.k)]

    def round_extras(self, round_idx: int, num_rounds: int) -> dict[str, float]:
        return {"mu": annealed_mu(self.options.mu, self.options.mu_end, round_idx, num_rounds)}

    # ------------------------------------------------------------------ site side
    def _selected(self, received_losses: Sequence[float], lam: float, mu: float) -> list[int]:
        o = self.options
        if o.sparse == "none":
            return list(range(o.k))
        w = site_assignment(torch.tensor(received_losses, dtype=torch.float64), lam, mu)
        order = sorted(range(o.k), key=lambda k: (-float(w[k]), k))
        if o.sparse == "top_r":
            return sorted(order[: o.sparse_r])
        keep = [k for k in order if float(w[k]) >= o.sparse_threshold]
        return sorted(keep or order[:1])

    def local_round(self, site: str, info: RoundInfo, models: Mapping[int, Params], work: LocalWork) -> SiteReply:
        o = self.options
        need_received = o.loss_source == "received" or o.sparse != "none"
        received = (
            [work.loss(models[k], slot=f"server/{k}") for k in range(o.k)] if need_received else [0.0] * o.k
        )
        selected = self._selected(received, self.site_lambda(site, info), info.extras["mu"])
        losses = list(received)
        updated: dict[int, Params] = {}
        for k in selected:
            result = work.train(models[k], slot=f"server/{k}")
            updated[k] = result.params
            if o.loss_source == "train":
                losses[k] = result.loss
        return SiteReply(
            num_samples=work.num_samples,
            losses=tuple(float(x) for x in losses),
            models=updated,
            info={"trained": selected},
        )

    # ---------------------------------------------------------------- server side
    def site_lambda(self, site: str, info: RoundInfo) -> float:
        """λ_i as fixed by the round's broadcast: n_i/N over the participants, or 1/M.

        The site (sparse selection) and the server (weights) use this same value, and it
        is not renormalised over the sites that reply: a failed site does not change the
        temperature the others were trained under, and weights can be formed as replies arrive.
        """
        if self.options.site_weights == "uniform":
            return 1.0 / len(info.participants)
        return float(info.site_weight[site])

    def lambdas(self, info: RoundInfo, replies: Mapping[str, SiteReply]) -> torch.Tensor:
        """λ_i of the replying sites, in ``replies`` order. Shape (M,)."""
        return torch.tensor([self.site_lambda(s, info) for s in replies], dtype=torch.float64)

    def begin_aggregation(self, info: RoundInfo, models: list[Params]) -> Aggregation:
        return FedFewAggregation(self, info, models)

    def deploy(self, site: str, models: Sequence[Params], work: LocalWork) -> Deployment:
        best, losses = argmin_loss(work, models, split=self.options.selection_split)
        return Deployment(params=models[best], model_index=best, slot=f"server/{best}", scores=losses)


class FedFewAggregation(Aggregation):
    """FedFew's server step, formed as replies arrive.

    α_i w_ik = exp(z_ik − 2 log S_i) / Z with z_ik = −λ_i L_ik / μ and Z = Σ_j S_j^{-1}:
    the numerator depends only on site i's own K losses (λ_i is fixed by the broadcast),
    so each model keeps one log-weighted running sum of deltas and the normaliser Z is
    applied at the end. Memory: K sums, whatever the number of sites.
    """

    def __init__(self, algorithm: FedFew, info: RoundInfo, models: list[Params]) -> None:
        self.algorithm = algorithm
        self.info = info
        self.models = models
        self.mu = float(info.extras["mu"])
        self.sums = [LogWeightedDeltaSum(base) for base in models]
        self.sites: list[str] = []
        self.losses: list[tuple[float, ...]] = []

    def add(self, site: str, reply: SiteReply) -> None:
        lam = self.algorithm.site_lambda(site, self.info)
        z = -lam * torch.tensor(reply.losses, dtype=torch.float64) / self.mu  # (K,)
        log_s = torch.logsumexp(z, dim=0)
        for k, params in reply.models.items():  # a model not returned counts as Δ = 0
            self.sums[k].add(params, float(z[k] - 2 * log_s))
        self.sites.append(site)
        self.losses.append(tuple(reply.losses))

    def result(self) -> ServerStep:
        if not self.sites:
            return ServerStep(models=self.models, log={"skipped": "no replies"})
        losses = torch.tensor(self.losses, dtype=torch.float64)  # (M, K)
        lambdas = torch.tensor([self.algorithm.site_lambda(s, self.info) for s in self.sites], dtype=torch.float64)
        weights = fedfew_weights(losses, lambdas, self.mu)
        log_s = torch.logsumexp(-lambdas[:, None] * losses / self.mu, dim=1)  # (M,) log S_i
        log_z = float(torch.logsumexp(-log_s, dim=0))  # log Σ_i S_i^{-1}
        lr = self.algorithm.options.server_lr
        new_models = [acc.apply(log_scale=-log_z, scale=lr) for acc in self.sums]
        log: dict[str, Any] = {
            "sites": self.sites,
            "mu": self.mu,
            "lambda": lambdas.tolist(),
            "losses": losses.tolist(),
            "alpha": weights.alpha.tolist(),
            "w": weights.w.tolist(),
            "c": weights.c.tolist(),
            "alpha_entropy": weights.alpha_entropy,
            "w_entropy": weights.w_entropy.tolist(),
            "objective": weights.objective,
            "soft_assignment": [int(torch.argmax(weights.w[i])) for i in range(len(self.sites))],
        }
        return ServerStep(models=new_models, log=log)
