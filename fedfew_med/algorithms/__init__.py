"""Federated methods behind one interface (pure torch, no I/O).

``REGISTRY`` maps a config name to its class; :func:`build_algorithm` validates the
``[algorithm.params]`` table against the method's ``Options`` dataclass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
    TrainResult,
)
from fedfew_med.algorithms.ditto import Ditto
from fedfew_med.algorithms.fedavg import FedAvg, FedAvgFineTune, FedProx
from fedfew_med.algorithms.fedfew import FedFew, FedFewFineTune
from fedfew_med.algorithms.ifca import IFCA
from fedfew_med.algorithms.local import Local
from fedfew_med.config import ConfigError, build_dataclass

REGISTRY: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (FedFew, FedFewFineTune, FedAvg, FedProx, FedAvgFineTune, IFCA, Ditto, Local)
}


def build_algorithm(name: str, params: Mapping[str, Any], *, seed: int = 0, where: str = "[algorithm]") -> Algorithm:
    """Instantiate a registered algorithm from its config name and options table."""
    if name not in REGISTRY:
        raise ConfigError(f"{where}.name must be one of {', '.join(sorted(REGISTRY))}, got {name!r}")
    cls = REGISTRY[name]
    options = build_dataclass(cls.Options, params, where=f"{where}.params")  # type: ignore[attr-defined]
    return cls(options, seed=seed)  # type: ignore[call-arg]


__all__ = [
    "REGISTRY",
    "Aggregation",
    "Algorithm",
    "Deployment",
    "Ditto",
    "FedAvg",
    "FedAvgFineTune",
    "FedFew",
    "FedFewFineTune",
    "FedProx",
    "IFCA",
    "Local",
    "LocalWork",
    "Params",
    "Prox",
    "RoundInfo",
    "ServerStep",
    "SiteReply",
    "TrainResult",
    "build_algorithm",
]
