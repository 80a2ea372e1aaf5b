"""FedFew: K shared models, each site served by the one that fits it best.

Round (shared/docs/fedfew-algorithm.md §2): every participant trains each of its
K received copies for E local epochs and reports K losses; the server computes α
and w from the λ-scaled losses and moves model k by Σ_i α_i w_ik Δ_ik. A site
deploys ``argmin_k L_i(θ_k)``.

Presets (``preset``). Every option left out of the config takes its value from the preset:

=================  ==================  ==================  ===========================================
option             ``reference``       ``default``         what it does
=================  ==================  ==================  ===========================================
``step``           ``reference``       ``normalized``      model k moves by Σ_i α_i w_ik Δ_ik, or by
                                                           Σ_i (α_i w_ik / c_k) Δ_ik (a weighted mean)
``loss_scale``     ``linear``          ``log``             A = λ L, or log λ + log L (μ is relative)
``mu``             0.01                0.1                 temperature of the soft-min over models
``mu_site``        (= ``mu``)          1.0                 temperature of the soft-max over sites
``site_weights``   ``samples``         ``samples``         λ_i = n_i / N, or 1 / M (``uniform``)
``init``           ``identical``       ``independent``     K copies of one init, or K inits
``reseed_after``   0 (never)           3                   re-seed a model no site owned for r rounds
=================  ==================  ==================  ===========================================

``reference`` reproduces the authors' code bit for bit (shared/docs/fedfew-algorithm.md §2).
The ``default`` column was chosen on validation across the federations: a switch is on when its
mean validation gain is >= 0 (README.md, "FedFew's default and its ablation";
``benchmarks/ablation.py``, K = 3, 3 seeds; test mean / worst site / validation mean)::

    row                            Fed-Heart-Disease       synthetic segmentation (Dice)
    reference                      0.771 / 0.747 / 0.740   0.516 / 0.150 / 0.503
    default                        0.799 / 0.769 / 0.822   0.791 / 0.609 / 0.810
    default - normalised step      0.788 / 0.753 / 0.818   0.584 / 0.292 / 0.588
    default - log temperatures     0.776 / 0.750 / 0.804   0.722 / 0.578 / 0.733
    default + uniform weights      0.818 / 0.773 / 0.821   0.788 / 0.602 / 0.806
    default - independent init     0.794 / 0.759 / 0.770   0.632 / 0.396 / 0.666
    default - re-seeding           0.800 / 0.764 / 0.822   0.783 / 0.579 / 0.793

Uniform site weights lost on validation on both and on Br35H (4 sites, α = 0.1: 0.915 against
0.938), so the default keeps the reference's ``samples``. No switch alone repairs the reference.

Other options (reference behaviour unless set):

- ``loss_source``: ``train`` (running loss of the last local epoch, reference) or
  ``received`` (loss of the received model, one extra forward pass per model;
  matches the gradient formula exactly).
- ``selection_split``: deploy by loss on ``train`` (reference) or the held-out ``val`` slice.
- ``mu_end``: geometric annealing of μ from ``mu`` to ``mu_end`` over the run.
- ``perturb_scale`` with ``init = "perturbed"``: copies plus Gaussian noise of that relative size.
- ``c_floor``: the normalised step of a model with c_k < c_floor is scaled by c_k / c_floor,
  so a model that almost no weight reaches is not moved a full step by that weight.
- ``sparse``: ``top_r`` or ``threshold``: a site computes its own w_i from the
  received models' losses and trains/returns only its r best models or those with
  w_ik ≥ ``sparse_threshold`` (always at least its best one). Models it does not
  return count as unchanged (Δ = 0) in the server step; their reported loss is
  the received-model loss.

:class:`FedFewFineTune` (``fedfew_ft``) trains the same way and fine-tunes the chosen model
at the site at deployment (as FedAvg + FT does with the global model).
"""

from __future__ import annotations

import math
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
    copy_losses,
    train_copies,
)
from fedfew_med.algorithms.fedfew_collapse import Ownership, WorstServed, models_in_use, reseed
from fedfew_med.algorithms.fedfew_math import (
    annealed_mu,
    fedfew_weights,
    scaled_losses,
    site_assignment,
    site_exponent,
)
from fedfew_med.config import require

PRESETS: dict[str, dict[str, Any]] = {
    "reference": {"step": "reference", "loss_scale": "linear", "mu": 0.01, "mu_site": None, "site_weights": "samples",
                  "init": "identical", "reseed_after": 0},
    "default": {"step": "normalized", "loss_scale": "log", "mu": 0.1, "mu_site": 1.0, "site_weights": "samples",
                "init": "independent", "reseed_after": 3},
}


@dataclass(frozen=True)
class FedFewOptions:
    """Options of FedFew (config section ``[algorithm.params]``); ``None`` means "as the preset"."""

    preset: Literal["default", "reference"] = "default"
    k: int = 3
    mu: float | None = None
    mu_site: float | None = None
    mu_end: float | None = None
    step: Literal["reference", "normalized"] | None = None
    loss_scale: Literal["linear", "log"] | None = None
    c_floor: float = 1e-3
    init: Literal["identical", "perturbed", "independent"] | None = None
    perturb_scale: float = 0.01
    loss_source: Literal["train", "received"] = "train"
    selection_split: Literal["train", "val"] = "train"
    site_weights: Literal["samples", "uniform"] | None = None
    reseed_after: int | None = None
    sparse: Literal["none", "top_r", "threshold"] = "none"
    sparse_r: int = 1
    sparse_threshold: float = 0.1
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        require(self.preset in PRESETS, "preset", f"be one of {', '.join(PRESETS)}", self.preset)
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:  # frozen: fill in the preset's value once, at construction
                object.__setattr__(self, name, value)
        require(self.k >= 1, "k", "be an integer >= 1", self.k)
        require(self.temperature > 0, "mu", "be > 0", self.mu)
        require(self.mu_site is None or self.mu_site > 0, "mu_site", "be > 0", self.mu_site)
        require(self.c_floor > 0, "c_floor", "be > 0", self.c_floor)
        require(self.reseed_after is not None and self.reseed_after >= 0, "reseed_after", "be an integer >= 0", self.reseed_after)
        require(self.mu_end is None or self.mu_end > 0, "mu_end", "be > 0", self.mu_end)
        require(self.perturb_scale >= 0, "perturb_scale", "be >= 0", self.perturb_scale)
        require(1 <= self.sparse_r <= self.k, "sparse_r", f"be between 1 and k ({self.k})", self.sparse_r)
        require(0 < self.sparse_threshold <= 1, "sparse_threshold", "be in (0, 1]", self.sparse_threshold)
        require(self.server_lr > 0, "server_lr", "be > 0", self.server_lr)

    @property
    def temperature(self) -> float:
        """μ, resolved (the preset's when not given)."""
        return float(self.mu if self.mu is not None else 0.0)

    @property
    def scale(self) -> Literal["linear", "log"]:
        return "log" if self.loss_scale == "log" else "linear"


@dataclass(frozen=True)
class FedFewFineTuneOptions(FedFewOptions):
    """FedFew's options plus the local fine-tuning epochs applied at deployment."""

    finetune_epochs: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.finetune_epochs >= 1, "finetune_epochs", "be an integer >= 1", self.finetune_epochs)


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
        self.ownership = Ownership()

    @property
    def reseeds(self) -> bool:
        """Whether idle models are re-seeded (a step that is not linear in the updates)."""
        return bool(self.options.reseed_after)

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
        return {"mu": annealed_mu(self.options.temperature, self.options.mu_end, round_idx, num_rounds)}

    # ------------------------------------------------------------------ site side
    def _selected(self, received_losses: Sequence[float], lam: float, mu: float) -> list[int]:
        o = self.options
        if o.sparse == "none":
            return list(range(o.k))
        w = site_assignment(torch.tensor(received_losses, dtype=torch.float64), lam, mu, o.scale)
        order = sorted(range(o.k), key=lambda k: (-float(w[k]), k))
        if o.sparse == "top_r":
            return sorted(order[: o.sparse_r])
        keep = [k for k in order if float(w[k]) >= o.sparse_threshold]
        return sorted(keep or order[:1])

    def local_round(self, site: str, info: RoundInfo, models: Mapping[int, Params], work: LocalWork) -> SiteReply:
        o = self.options
        need_received = o.loss_source == "received" or o.sparse != "none"
        received = (
            copy_losses(work, [models[k] for k in range(o.k)], slots=[f"server/{k}" for k in range(o.k)])
            if need_received else [0.0] * o.k
        )
        selected = self._selected(received, self.site_lambda(site, info), info.extras["mu"])
        losses = list(received)
        updated: dict[int, Params] = {}
        results = train_copies(work, [models[k] for k in selected], slots=[f"server/{k}" for k in selected])
        for k, result in zip(selected, results, strict=True):
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

    def commit(self, step: ServerStep) -> None:
        """Keep the idle counts of the step the server adopted (see :mod:`fedfew_collapse`)."""
        if "idle_rounds" in step.log:
            self.ownership.idle = list(step.log["idle_rounds"])

    def server_state(self) -> dict[str, Any]:
        return self.ownership.state_dict()

    def load_server_state(self, state: Mapping[str, Any]) -> None:
        self.ownership.load_state_dict(state)

    def deploy(self, site: str, models: Sequence[Params], work: LocalWork) -> Deployment:
        best, losses = argmin_loss(work, models, split=self.options.selection_split)
        return Deployment(params=models[best], model_index=best, slot=f"server/{best}", scores=losses)


class FedFewAggregation(Aggregation):
    """FedFew's server step, formed as replies arrive.

    α_i w_ik = exp(z_ik − (1 + ρ) log S_i) / Z with z_ik = −A_ik / μ, ρ = μ/μ_α (1 in the
    reference) and Z = Σ_j S_j^{−ρ}: the numerator depends only on site i's own K losses
    (λ_i is fixed by the broadcast), so each model keeps one log-weighted running sum of
    deltas and the normaliser (Z, and c_k for the normalised step) is applied at the end.
    Memory: K sums plus, when re-seeding is on, one copy of the worst-served site's update.
    """

    def __init__(self, algorithm: FedFew, info: RoundInfo, models: list[Params]) -> None:
        self.algorithm = algorithm
        self.options = algorithm.options
        self.info = info
        self.models = models
        self.mu = float(info.extras["mu"])
        self.rho = site_exponent(self.mu, self.options.mu_site)
        self.sums = [LogWeightedDeltaSum(base) for base in models]
        self.sites: list[str] = []
        self.losses: list[tuple[float, ...]] = []
        self.worst = WorstServed()

    def add(self, site: str, reply: SiteReply) -> None:
        lam = self.algorithm.site_lambda(site, self.info)
        a = scaled_losses(torch.tensor([reply.losses], dtype=torch.float64), torch.tensor([lam], dtype=torch.float64),
                          self.options.scale)[0]  # (K,)
        z = -a / self.mu
        log_s = torch.logsumexp(z, dim=0)
        for k, params in reply.models.items():  # a model not returned counts as Δ = 0
            self.sums[k].add(params, float(z[k] - (1.0 + self.rho) * log_s))
        self.worst.offer(site, a.tolist(), reply.models, keep=self.algorithm.reseeds)
        self.sites.append(site)
        self.losses.append(tuple(reply.losses))

    def result(self) -> ServerStep:
        o = self.options
        if not self.sites:
            return ServerStep(models=self.models, log={"skipped": "no replies"})
        losses = torch.tensor(self.losses, dtype=torch.float64)  # (M, K)
        lambdas = torch.tensor([self.algorithm.site_lambda(s, self.info) for s in self.sites], dtype=torch.float64)
        weights = fedfew_weights(losses, lambdas, self.mu, mu_site=o.mu_site, loss_scale=o.scale)
        z = -scaled_losses(losses, lambdas, o.scale) / self.mu
        log_z = float(torch.logsumexp(-self.rho * torch.logsumexp(z, dim=1), dim=0))  # log Σ_i S_i^{-ρ}
        c = weights.c
        if o.step == "normalized":  # model k takes the α w-weighted mean of its deltas: Σ_i (α_i w_ik / c_k) Δ_ik
            log_scales = [-log_z - math.log(max(float(c[k]), o.c_floor)) for k in range(len(self.sums))]
        else:
            log_scales = [-log_z] * len(self.sums)
        new_models = [acc.apply(log_scale=ls, scale=o.server_lr) for acc, ls in zip(self.sums, log_scales, strict=True)]
        owners = [int(torch.argmax(weights.w[i])) for i in range(len(self.sites))]
        idle = self.algorithm.ownership.updated(owners, len(self.models))
        new_models, idle, reseeded = reseed(new_models, idle, o.reseed_after or 0, self.worst, self.info.round)
        log: dict[str, Any] = {
            "sites": self.sites,
            "mu": self.mu,
            "lambda": lambdas.tolist(),
            "losses": losses.tolist(),
            "alpha": weights.alpha.tolist(),
            "w": weights.w.tolist(),
            "c": c.tolist(),
            "alpha_entropy": weights.alpha_entropy,
            "alpha_max": float(weights.alpha.max()),
            "w_entropy": weights.w_entropy.tolist(),
            "objective": weights.objective,
            "soft_assignment": owners,
            "models_in_use": models_in_use(owners),
            "idle_rounds": idle,
            "reseeded": reseeded,
        }
        return ServerStep(models=new_models, log=log)


class FedFewFineTune(FedFew):
    """FedFew training; at deployment the chosen model is fine-tuned on the site's training split."""

    name: ClassVar[str] = "fedfew_ft"
    Options: ClassVar[type] = FedFewFineTuneOptions

    def __init__(self, options: FedFewFineTuneOptions | None = None, *, seed: int = 0) -> None:
        super().__init__(options or FedFewFineTuneOptions(), seed=seed)

    def deploy(self, site: str, models: Sequence[Params], work: LocalWork) -> Deployment:
        chosen = super().deploy(site, models, work)
        epochs = self.options.finetune_epochs  # type: ignore[attr-defined]
        tuned = work.train(chosen.params, slot="finetune", from_slot=chosen.slot, epochs=epochs)
        return Deployment(params=tuned.params, model_index=chosen.model_index, slot="finetune", scores=chosen.scores)
