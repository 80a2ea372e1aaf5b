"""Local only: every site trains its own model; nothing is shared.

The reference point for personalization: one model per site, no server models,
no communication. Each site's model starts from the run's common initial model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from fedfew_med.algorithms.base import (
    Aggregation,
    Algorithm,
    Deployment,
    LocalWork,
    Params,
    RoundInfo,
    SiteReply,
    clone,
)
from fedfew_med.algorithms.fedavg import SampleWeightedMean


@dataclass(frozen=True)
class LocalOptions:
    """Local training has no options of its own."""


class Local(Algorithm):
    """One model per site, trained only on that site's data."""

    name: ClassVar[str] = "local"
    Options: ClassVar[type] = LocalOptions

    def __init__(self, options: LocalOptions | None = None, *, seed: int = 0) -> None:
        self.options = options or LocalOptions()
        self._init: Params | None = None

    @property
    def num_models(self) -> int:
        return 0

    def init_models(self, make_init: Callable[[int], Params]) -> list[Params]:
        self._init = make_init(0)  # the common start of every site's local model
        return []

    def _start(self) -> Params:
        if self._init is None:
            raise RuntimeError("Local.init_models must be called before the first round")
        return clone(self._init)

    def local_round(self, site: str, info: RoundInfo, models: Mapping[int, Params], work: LocalWork) -> SiteReply:
        current = work.state.get("local")
        result = work.train(current if current is not None else self._start(), slot="local")
        work.state["local"] = result.params
        return SiteReply(num_samples=work.num_samples, losses=(), models={}, info={"local_loss": result.loss})

    def begin_aggregation(self, info: RoundInfo, models: list[Params]) -> Aggregation:
        return SampleWeightedMean(models)  # no server models: records who took part

    def deploy(self, site: str, models: Sequence[Params], work: LocalWork) -> Deployment:
        current = work.state.get("local")
        return Deployment(params=current if current is not None else self._start(), model_index=None, slot="local")
