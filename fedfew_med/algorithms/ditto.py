"""Ditto (Li et al. 2021): a FedAvg global model plus a regularised personal model.

Each round a site (1) trains the received global model for E epochs and returns
it, as in FedAvg, and (2) trains its personal model v for E epochs on
``loss(v) + lam/2 · ||v − θ_global||²`` toward the *received* global model.
The personal model lives at the site and is what the site deploys; it starts as
a copy of the first global model it receives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from fedfew_med.algorithms.base import (
    Aggregation,
    Algorithm,
    Deployment,
    LocalWork,
    Params,
    Prox,
    RoundInfo,
    SiteReply,
    clone,
)
from fedfew_med.algorithms.fedavg import SampleWeightedMean
from fedfew_med.config import require


@dataclass(frozen=True)
class DittoOptions:
    """Ditto's regularisation strength λ (0: purely local personal models)."""

    lam: float = 0.1

    def __post_init__(self) -> None:
        require(self.lam >= 0, "lam", "be >= 0", self.lam)


class Ditto(Algorithm):
    """Global FedAvg model plus per-site personal models."""

    name: ClassVar[str] = "ditto"
    Options: ClassVar[type] = DittoOptions

    def __init__(self, options: DittoOptions | None = None, *, seed: int = 0) -> None:
        self.options = options or DittoOptions()

    @property
    def num_models(self) -> int:
        return 1

    def local_round(self, site: str, info: RoundInfo, models: Mapping[int, Params], work: LocalWork) -> SiteReply:
        received = models[0]
        global_result = work.train(received, slot="server/0")
        personal = work.state.get("personal")
        if personal is None:
            personal = clone(received)
        prox = Prox(center=received, strength=self.options.lam) if self.options.lam > 0 else None
        personal_result = work.train(personal, slot="personal", prox=prox)
        work.state["personal"] = personal_result.params
        return SiteReply(
            num_samples=work.num_samples,
            losses=(global_result.loss,),
            models={0: global_result.params},
            info={"personal_loss": personal_result.loss},
        )

    def begin_aggregation(self, info: RoundInfo, models: list[Params]) -> Aggregation:
        return SampleWeightedMean(models)

    def deploy(self, site: str, models: Sequence[Params], work: LocalWork) -> Deployment:
        personal = work.state.get("personal")
        if personal is None:  # a site that never trained deploys the global model
            return Deployment(params=models[0], model_index=0, slot="server/0")
        return Deployment(params=personal, model_index=None, slot="personal")
