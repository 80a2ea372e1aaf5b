"""IFCA (Ghosh et al. 2020): K cluster models with hard assignment.

Each site evaluates all K received models on its training data, trains only the
one with the lowest loss, and returns it; the server replaces each model by the
sample-weighted mean of the copies returned for it (unchanged if no site chose it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from fedfew_med.algorithms.base import (
    Aggregation,
    Algorithm,
    Deployment,
    LocalWork,
    Params,
    RoundInfo,
    SiteReply,
    argmin_loss,
)
from fedfew_med.algorithms.fedavg import SampleWeightedMean
from fedfew_med.config import require


@dataclass(frozen=True)
class IFCAOptions:
    """Number of clusters and how the K models start (IFCA uses independent inits)."""

    k: int = 3
    init: Literal["identical", "independent"] = "independent"

    def __post_init__(self) -> None:
        require(self.k >= 1, "k", "be an integer >= 1", self.k)


class IFCA(Algorithm):
    """Iterative Federated Clustering Algorithm (model-averaging variant)."""

    name: ClassVar[str] = "ifca"
    Options: ClassVar[type] = IFCAOptions

    def __init__(self, options: IFCAOptions | None = None, *, seed: int = 0) -> None:
        self.options = options or IFCAOptions()

    @property
    def num_models(self) -> int:
        return self.options.k

    def init_models(self, make_init: Callable[[int], Params]) -> list[Params]:
        if self.options.init == "independent":
            return [make_init(k) for k in range(self.options.k)]
        return super().init_models(make_init)

    def local_round(self, site: str, info: RoundInfo, models: Mapping[int, Params], work: LocalWork) -> SiteReply:
        ordered = [models[k] for k in range(self.options.k)]
        best, losses = argmin_loss(work, ordered, split="train")
        result = work.train(models[best], slot=f"server/{best}")
        return SiteReply(num_samples=work.num_samples, losses=losses, models={best: result.params}, info={"cluster": best})

    def begin_aggregation(self, info: RoundInfo, models: list[Params]) -> Aggregation:
        # each model becomes the sample-weighted mean of the copies returned for it
        return SampleWeightedMean(models, members_key="clusters")

    def deploy(self, site: str, models: Sequence[Params], work: LocalWork) -> Deployment:
        best, losses = argmin_loss(work, models, split="train")
        return Deployment(params=models[best], model_index=best, slot=f"server/{best}", scores=losses)
