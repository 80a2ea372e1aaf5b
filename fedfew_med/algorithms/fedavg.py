"""FedAvg, FedProx and FedAvg + local fine-tuning: one global model.

- FedAvg (McMahan et al. 2017): sites train the global model for E epochs; the
  server takes the sample-weighted mean of the returned models.
- FedProx (Li et al. 2020): the same, with ``mu_prox/2 · ||θ − θ_global||²``
  added to every local loss.
- FedAvg + fine-tuning: FedAvg training; at deployment each site fine-tunes the
  global model for ``finetune_epochs`` on its own training split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from fedfew_med.algorithms.aggregate import DeltaSum
from fedfew_med.algorithms.base import (
    Aggregation,
    Algorithm,
    Deployment,
    LocalWork,
    Params,
    Prox,
    RoundInfo,
    ServerStep,
    SiteReply,
)
from fedfew_med.config import require


@dataclass(frozen=True)
class FedAvgOptions:
    """FedAvg has no options beyond the server learning rate."""

    server_lr: float = 1.0

    def __post_init__(self) -> None:
        require(self.server_lr > 0, "server_lr", "be > 0", self.server_lr)


@dataclass(frozen=True)
class FedProxOptions:
    """FedProx's proximal strength (μ_prox = 0 is FedAvg)."""

    mu_prox: float = 0.01
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        require(self.mu_prox >= 0, "mu_prox", "be >= 0", self.mu_prox)
        require(self.server_lr > 0, "server_lr", "be > 0", self.server_lr)


@dataclass(frozen=True)
class FineTuneOptions:
    """Local fine-tuning epochs applied at deployment."""

    finetune_epochs: int = 1
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        require(self.finetune_epochs >= 1, "finetune_epochs", "be an integer >= 1", self.finetune_epochs)
        require(self.server_lr > 0, "server_lr", "be > 0", self.server_lr)


class SampleWeightedMean(Aggregation):
    """θ_k ← θ_k + lr · Σ_i (n_i/N_k) Δ_ik for every model k, N_k summed over the sites that returned k.

    Running sums weighted by n_i; the division by N_k happens at the end, so replies can
    arrive one at a time. A model nobody returned is unchanged.
    """

    def __init__(self, models: list[Params], *, server_lr: float = 1.0, members_key: str = "members") -> None:
        self.sums = [DeltaSum(m) for m in models]
        self.members: dict[int, list[str]] = {k: [] for k in range(len(models))}
        self.server_lr = server_lr
        self.members_key = members_key
        self.sites: list[str] = []

    def add(self, site: str, reply: SiteReply) -> None:
        for k, params in reply.models.items():
            self.sums[k].add(params, float(reply.num_samples))
            self.members[k].append(site)
        self.sites.append(site)

    def result(self) -> ServerStep:
        models = [acc.apply(scale=self.server_lr / acc.weight) if acc.count else acc.average() for acc in self.sums]
        return ServerStep(models=models, log={"sites": self.sites, self.members_key: self.members})


class FedAvg(Algorithm):
    """Federated averaging of one global model."""

    name: ClassVar[str] = "fedavg"
    Options: ClassVar[type] = FedAvgOptions

    def __init__(self, options: FedAvgOptions | None = None, *, seed: int = 0) -> None:
        self.options = options or FedAvgOptions()

    @property
    def num_models(self) -> int:
        return 1

    def prox(self, models: Mapping[int, Params]) -> Prox | None:
        """No proximal term."""
        return None

    def local_round(self, site: str, info: RoundInfo, models: Mapping[int, Params], work: LocalWork) -> SiteReply:
        result = work.train(models[0], slot="server/0", prox=self.prox(models))
        return SiteReply(num_samples=work.num_samples, losses=(result.loss,), models={0: result.params})

    def begin_aggregation(self, info: RoundInfo, models: list[Params]) -> Aggregation:
        return SampleWeightedMean(models, server_lr=self.options.server_lr)

    def deploy(self, site: str, models: Sequence[Params], work: LocalWork) -> Deployment:
        return Deployment(params=models[0], model_index=0, slot="server/0")


class FedProx(FedAvg):
    """FedAvg with a proximal term toward the received global model."""

    name: ClassVar[str] = "fedprox"
    Options: ClassVar[type] = FedProxOptions

    def __init__(self, options: FedProxOptions | None = None, *, seed: int = 0) -> None:
        self.options = options or FedProxOptions()  # type: ignore[assignment]

    def prox(self, models: Mapping[int, Params]) -> Prox | None:
        mu = self.options.mu_prox  # type: ignore[attr-defined]
        return Prox(center=models[0], strength=mu) if mu > 0 else None


class FedAvgFineTune(FedAvg):
    """FedAvg training, deployed after local fine-tuning of the global model."""

    name: ClassVar[str] = "fedavg_ft"
    Options: ClassVar[type] = FineTuneOptions

    def __init__(self, options: FineTuneOptions | None = None, *, seed: int = 0) -> None:
        self.options = options or FineTuneOptions()  # type: ignore[assignment]

    def deploy(self, site: str, models: Sequence[Params], work: LocalWork) -> Deployment:
        epochs = self.options.finetune_epochs  # type: ignore[attr-defined]
        tuned = work.train(models[0], slot="finetune", from_slot="server/0", epochs=epochs)
        return Deployment(params=tuned.params, model_index=0, slot="finetune")
