"""Deployment at a DP site: the model is chosen from losses the site has already released.

Outside DP a site deploys the server model with the lowest loss on its own records
(``Algorithm.deploy`` asks its ``LocalWork`` for the K losses) and tells the server which
one it chose, with the K losses. Under DP those numbers are a release of the training
records: computed fresh, they would leave the site without noise and without a charge in
its ledger. So a DP site's evaluation never computes them. It ranks the K models by the
losses it *released* in its last training round (through the loss channel, noised and
charged: :mod:`fedfew_med.dp.loss_channel`), which the server already holds and sends back
with the evaluation request. Choosing the smallest of them is post-processing: it costs no
budget, and everything the evaluation reply carries about the training records (the K
scores, the model index) is a function of charged releases.

Consequences, stated where users read them (``privacy/README.md``):

- the choice lags one round behind (the losses are of the models the site trained from, not
  of the server step that followed) and is as noisy as the loss channel;
- a method that ranks models (FedFew, IFCA) cannot be evaluated at a DP site before that site
  has released losses once;
- a method that fine-tunes at deployment (``fedfew_ft``, ``fedavg_ft``,
  ``[run].finetune_eval_epochs``) would train on the records outside the ledger, so a DP run
  refuses it before it starts (:func:`check_private_deployment`) and the site refuses it
  again when asked (:class:`ReleasedLossWork`).

Test-split metrics are computed on held-out records DP-SGD never touches; they are outside
the guarantee (``privacy/README.md``, "what DP protects").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedfew_med.algorithms import Algorithm, Params
from fedfew_med.algorithms.base import LocalWork, Prox, TrainResult, clone
from fedfew_med.config import ConfigError, FederationConfig


class PrivateDeploymentError(RuntimeError):
    """A DP site was asked for a deployment step that would touch its training records uncharged."""


class ReleasedLossWork:
    """A ``LocalWork`` for ``Algorithm.deploy`` at a DP site: losses are the released ones, nothing trains.

    Parameters
    ----------
    work
        The site's evaluation work (its state and sample count are passed through).
    released
        The K losses the site released in its last training round, or None if it has released none.
    site
        The site's name, for error messages.
    """

    def __init__(self, work: LocalWork, released: Sequence[float] | None, *, site: str) -> None:
        self._work = work
        self._released = None if released is None else tuple(float(v) for v in released)
        self._site = site

    @property
    def num_samples(self) -> int:
        return self._work.num_samples

    @property
    def state(self) -> dict[str, Params]:
        return self._work.state

    def losses(self, params: Sequence[Params], *, slots: Sequence[str], split: str = "train") -> list[float]:
        """The released losses, one per model (the models themselves are not looked at)."""
        if self._released is None:
            raise PrivateDeploymentError(
                f"site {self._site!r} trains with DP and has not released losses of the server models yet: it ranks "
                "the models only by losses it has released (charged to its ledger), so it is evaluated after its "
                "first training round"
            )
        if len(self._released) != len(params):
            raise PrivateDeploymentError(
                f"site {self._site!r}: {len(self._released)} released losses for {len(params)} server models; "
                "a DP site ranks the models only by losses it has released"
            )
        return list(self._released)

    def loss(self, params: Params, *, slot: str, split: str = "train") -> float:
        raise PrivateDeploymentError(
            f"site {self._site!r} trains with DP: deployment may not compute a fresh loss on its {split} records "
            "(it would leave the site uncharged); it uses the losses it released in training"
        )

    def train(self, params: Params, *, slot: str, epochs: int | None = None, prox: Prox | None = None,
              from_slot: str | None = None) -> TrainResult:
        raise PrivateDeploymentError(
            f"site {self._site!r} trains with DP: fine-tuning at deployment would train on its records outside its "
            "privacy ledger; use a method without deployment fine-tuning (fedfew, not fedfew_ft) and "
            "[run].finetune_eval_epochs = 0"
        )


def chooser(work: LocalWork, *, site: str, private: bool, released: Sequence[float] | None) -> LocalWork:
    """The work ``Algorithm.deploy`` gets: ``work`` itself, or at a DP site (``private``) its released losses only."""
    return ReleasedLossWork(work, released, site=site) if private else work


class _NoData:
    """The ``LocalWork`` behind a probe: no records, no state (:class:`ReleasedLossWork` never calls it)."""

    @property
    def num_samples(self) -> int:
        return 1

    @property
    def state(self) -> dict[str, Params]:
        return {}

    def loss(self, params: Params, *, slot: str, split: str = "train") -> float:
        raise AssertionError("a deployment probe touches no data")

    def train(self, params: Params, *, slot: str, epochs: int | None = None, prox: Prox | None = None,
              from_slot: str | None = None) -> TrainResult:
        raise AssertionError("a deployment probe touches no data")


def check_private_deployment(config: FederationConfig, algorithm: Algorithm, models: Sequence[Params],
                             private_sites: Sequence[str]) -> None:
    """Refuse, before any training, a DP run whose deployment would train on a DP site's records.

    Probes ``algorithm.deploy`` with :class:`ReleasedLossWork` on made-up losses (no data is
    touched), and checks ``[run].finetune_eval_epochs``.

    Raises
    ------
    ConfigError
        Naming the config file, the setting and the DP sites.
    """
    if not private_sites:
        return
    names = ", ".join(sorted(private_sites))
    if config.run.finetune_eval_epochs:
        raise ConfigError(
            f"{config.source}: [run].finetune_eval_epochs must be 0 when sites train with DP ({names}); got "
            f"{config.run.finetune_eval_epochs}: the fine-tuning would train on their records outside their privacy ledgers"
        )
    probe = ReleasedLossWork(_NoData(), [0.0] * len(models), site=private_sites[0])
    try:
        algorithm.deploy(private_sites[0], [clone(m) for m in models], probe)
    except PrivateDeploymentError:
        raise ConfigError(
            f"{config.source}: [algorithm].name = {config.algorithm.name!r} fine-tunes at deployment, which DP sites "
            f"({names}) cannot do within their privacy ledgers; use a method that deploys without training "
            "(e.g. fedfew instead of fedfew_ft, fedavg instead of fedavg_ft)"
        ) from None


def released_state(released: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """JSON-able copy of the per-site released losses (for the checkpoint state)."""
    return {site: [float(v) for v in values] for site, values in sorted(released.items())}


def load_released(state: Mapping[str, Any] | None) -> dict[str, list[float]]:
    """The per-site released losses saved by :func:`released_state` (empty when absent)."""
    return {str(site): [float(v) for v in values] for site, values in (state or {}).items()}
