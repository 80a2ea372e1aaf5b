"""The small interface every federated method implements.

An algorithm holds *policy only*: which models a site trains and how, what it
reports, how the server combines the reports, and which model a site deploys.
It never touches files, loaders or the round loop; the site's compute is reached
through the :class:`LocalWork` protocol (implemented by ``fedfew_med.training``),
and the orchestration (``simulation``, ``flower``) calls the four hooks below.

A new method is one file: subclass :class:`Algorithm`, declare a frozen
``Options`` dataclass, and register it in ``fedfew_med.algorithms.REGISTRY``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

Params = dict[str, torch.Tensor]
"""A model's trainable parameters by name (buffers such as norm statistics stay at the site)."""


@dataclass(frozen=True)
class Prox:
    """A proximal term ``strength/2 * ||θ - center||²`` added to the local loss (FedProx, Ditto)."""

    center: Params
    strength: float


@dataclass(frozen=True)
class TrainResult:
    """What local training returns."""

    params: Params
    loss: float  # mean training loss over the last local epoch
    steps: int  # optimiser steps taken
    samples: int  # samples seen


class LocalWork(Protocol):
    """What a site can do for an algorithm; one instance per site and round.

    ``slot`` names the model copy being trained (``"server/0"``, ``"personal"``...):
    site-local buffers (norm statistics) and the data-order seed are kept per slot.
    """

    @property
    def num_samples(self) -> int:
        """Training records at this site (n_i)."""
        ...

    @property
    def state(self) -> dict[str, Params]:
        """Persistent per-site models (personal / local models); saved in checkpoints."""
        ...

    def train(
        self,
        params: Params,
        *,
        slot: str,
        epochs: int | None = None,
        prox: Prox | None = None,
        from_slot: str | None = None,
    ) -> TrainResult:
        """Train a copy of ``params`` locally and return the new parameters.

        Buffers are read from ``from_slot`` (default ``slot``) and written to ``slot``;
        ``epochs`` defaults to the run's local epochs.
        """
        ...

    def loss(self, params: Params, *, slot: str, split: str = "train") -> float:
        """Mean loss of ``params`` on a split (eval mode, no gradient)."""
        ...


def train_copies(work: LocalWork, params: Sequence[Params], *, slots: Sequence[str]) -> list[TrainResult]:
    """Train each of ``params`` in its slot: together when ``work`` offers ``train_many`` (a site with
    ``[training].one_pass``), else one after another with :meth:`LocalWork.train`."""
    many = getattr(work, "train_many", None)
    if many is not None:
        return list(many(params, slots=slots))
    return [work.train(p, slot=s) for p, s in zip(params, slots, strict=True)]


def copy_losses(work: LocalWork, params: Sequence[Params], *, slots: Sequence[str], split: str = "train") -> list[float]:
    """:meth:`LocalWork.loss` of each of ``params``: in one pass when ``work`` offers ``losses``."""
    many = getattr(work, "losses", None)
    if many is not None:
        return list(many(params, slots=slots, split=split))
    return [work.loss(p, slot=s, split=split) for p, s in zip(params, slots, strict=True)]


@dataclass(frozen=True)
class RoundInfo:
    """What the server broadcasts with a round (besides the models)."""

    round: int
    num_rounds: int
    participants: tuple[str, ...]
    site_weight: Mapping[str, float]  # λ_i of each participant (sum 1)
    extras: Mapping[str, float] = field(default_factory=dict)  # e.g. {"mu": μ_t}


@dataclass(frozen=True)
class SiteReply:
    """What one site returns to the server after a round."""

    num_samples: int
    losses: tuple[float, ...]  # one per server model (empty for methods without server models)
    models: Mapping[int, Params]  # updated copies by server-model index (may be a subset)
    info: Mapping[str, Any] = field(default_factory=dict)  # small JSON-able facts for the log


@dataclass(frozen=True)
class ServerStep:
    """The server's new models and what to log about the step."""

    models: list[Params]
    log: dict[str, Any]


@dataclass(frozen=True)
class Deployment:
    """The model a site would deploy, and why."""

    params: Params
    model_index: int | None  # server-model index, or None for a personal/local model
    slot: str  # site-local slot whose buffers go with the parameters
    scores: tuple[float, ...] = ()  # the losses the choice was made on, one per server model


class Aggregation(ABC):
    """A server step under construction: replies are added as they arrive, then combined.

    Implementations keep running sums (O(K) models), never the M replies, so a server's
    memory grows with the number of models, not the number of sites.
    """

    @abstractmethod
    def add(self, site: str, reply: SiteReply) -> None:
        """Fold one validated reply into the step."""

    @abstractmethod
    def result(self) -> ServerStep:
        """The new server models and the step's log."""


class Algorithm(ABC):
    """Policy of a federated method; see the module docstring."""

    name: ClassVar[str]

    @property
    @abstractmethod
    def num_models(self) -> int:
        """Number of server models (K); 0 for methods with none (Local)."""

    def init_models(self, make_init: Callable[[int], Params]) -> list[Params]:
        """Initial server models; ``make_init(i)`` returns the i-th independent random init."""
        return [make_init(0) for _ in range(self.num_models)]

    def round_extras(self, round_idx: int, num_rounds: int) -> dict[str, float]:
        """Scalars the server broadcasts with a round (e.g. an annealed temperature)."""
        return {}

    def models_to_send(self, site: str, info: RoundInfo) -> Sequence[int]:
        """Indices of server models a site receives this round (default: all)."""
        return range(self.num_models)

    @abstractmethod
    def local_round(self, site: str, info: RoundInfo, models: Mapping[int, Params], work: LocalWork) -> SiteReply:
        """Site side of a round: train and report."""

    @abstractmethod
    def begin_aggregation(self, info: RoundInfo, models: list[Params]) -> Aggregation:
        """Server side of a round: an :class:`Aggregation` that replies are added to as they arrive."""

    def aggregate(self, info: RoundInfo, models: list[Params], replies: Mapping[str, SiteReply]) -> ServerStep:
        """Combine all ``replies`` at once (the same code path as streaming, in ``replies`` order)."""
        step = self.begin_aggregation(info, models)
        for site, reply in replies.items():
            step.add(site, reply)
        return step.result()

    @abstractmethod
    def deploy(self, site: str, models: Sequence[Params], work: LocalWork) -> Deployment:
        """The model ``site`` uses (chosen on its own data; no training unless the method fine-tunes)."""

    def commit(self, step: ServerStep) -> None:
        """Called once with the step the server adopted (an :class:`Aggregation` may be probed without it)."""
        return None  # stateless methods keep nothing

    def server_state(self) -> dict[str, Any]:
        """JSON-able server-side state kept across rounds (saved with every checkpoint); none by default."""
        return {}

    def load_server_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`server_state` returned (on resume)."""
        return None  # stateless methods have nothing to restore


def clone(params: Params) -> Params:
    """Deep copy (never hand out tensors another site or round will read)."""
    return {k: v.detach().clone() for k, v in params.items()}


def argmin_loss(work: LocalWork, models: Sequence[Params], *, split: str) -> tuple[int, tuple[float, ...]]:
    """Index of the server model with the lowest loss on ``split``, and all K losses."""
    losses = tuple(copy_losses(work, models, slots=[f"server/{k}" for k in range(len(models))], split=split))
    best = min(range(len(losses)), key=lambda k: (losses[k], k))
    return best, losses
