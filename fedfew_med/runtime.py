"""The two sides of a round, shared by every way of running a federation.

:class:`ServerRuntime` holds the K server models and the algorithm's server half
(broadcast, aggregation); :class:`SiteRuntime` holds one site's data, state and
the algorithm's site half (local step, deployment, evaluation). The in-process
simulation drives many ``SiteRuntime`` objects in one process; the Flower app
puts one ``SiteRuntime`` in each SuperNode and the ``ServerRuntime`` in the
ServerApp. Neither runner re-implements anything here.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedfew_med.algorithms import (
    Aggregation,
    Algorithm,
    Params,
    RoundInfo,
    ServerStep,
    SiteReply,
    build_algorithm,
)
from fedfew_med.config import ConfigError, FederationConfig
from fedfew_med.data import SiteData
from fedfew_med.data.native import native_metrics
from fedfew_med.data.patches import GridPatches
from fedfew_med.deployment import PrivateDeploymentError, chooser
from fedfew_med.metrics import (
    classification_metrics,
    headline_metric,
    prediction_checks,
    segmentation_metrics,
)
from fedfew_med.models import buffers_of, build_model, parameters_of
from fedfew_med.training import SiteState, SiteWork, derive_seed


@dataclass(frozen=True)
class ModelFacts:
    """What a network must accept and produce; identical at every site of a federation."""

    task: str
    in_channels: int
    num_classes: int
    spatial_dims: int
    image_size: int

    @classmethod
    def of(cls, site: SiteData) -> ModelFacts:
        """Facts of a site's data (image size read from its first training record)."""
        size = int(site.splits["train"][0]["image"].shape[-1]) if site.size("train") else 0
        return cls(site.task, site.in_channels, site.num_classes, site.spatial_dims, size)

    @classmethod
    def common(cls, sites: Sequence[SiteData]) -> ModelFacts:
        """Facts shared by all ``sites``; ValueError naming the first site that differs."""
        facts = [cls.of(s) for s in sites]
        for site, f in zip(sites, facts, strict=True):
            if f != facts[0]:
                raise ValueError(f"site {site.name!r} has {f}, but {sites[0].name!r} has {facts[0]}: all sites must agree")
        return facts[0]


NetworkPreparer = Callable[[nn.Module], nn.Module]


def network_factory(config: FederationConfig, facts: ModelFacts, prepare: NetworkPreparer | None = None) -> Callable[[int], nn.Module]:
    """``factory(i)`` builds the configured network with the i-th seeded initialisation.

    ``prepare`` transforms every network built (e.g. ``fedfew_med.dp.make_dp_ready`` for a DP
    federation), so that the server models, every site's scratch network and a reloaded run agree.
    """

    def build(i: int) -> nn.Module:
        net = build_model(
            config.model.name,
            config.model.params,
            task=facts.task,
            in_channels=facts.in_channels,
            num_classes=facts.num_classes,
            spatial_dims=facts.spatial_dims,
            image_size=facts.image_size,
            seed=derive_seed(config.run.seed, "init", i),
        )
        return net if prepare is None else prepare(net)

    return build


def make_algorithm(config: FederationConfig, facts: ModelFacts,
                   prepare: NetworkPreparer | None = None) -> tuple[Algorithm, list[Params]]:
    """The configured algorithm and its initial server models (deterministic in the run seed).

    Also where ``[run].metric`` meets the sites' task, since every run (simulation, Flower
    coordinator, evaluation) builds its algorithm here.
    """
    try:
        headline_metric(facts.task, config.run.metric)
    except ValueError as exc:
        raise ConfigError(f"{config.source}: [run].{exc}") from None
    algorithm = build_algorithm(config.algorithm.name, config.algorithm.params, seed=config.run.seed,
                                where=f"{config.source}: [algorithm]")
    factory = network_factory(config, facts, prepare)
    models = algorithm.init_models(lambda i: parameters_of(factory(i)))
    return algorithm, models


def params_nbytes(params: Params) -> int:
    """Bytes of a model's parameters on the wire (raw tensor bytes)."""
    return sum(t.numel() * t.element_size() for t in params.values())


def reply_nbytes(reply: SiteReply) -> int:
    """Bytes a site sends back: returned models, K losses (float64) and its sample count."""
    return sum(params_nbytes(p) for p in reply.models.values()) + 8 * (len(reply.losses) + 1)


def update_norm(params: Params, ref: Params) -> float:
    """L2 norm of ``params − ref`` over all parameters, in float64 (no overflow for large finite values)."""
    total = 0.0
    for name, t in params.items():
        total += float(torch.sum((t.detach().to(torch.float64) - ref[name].detach().to(torch.float64)) ** 2))
    return math.sqrt(total)


def validate_reply(reply: SiteReply, sent: Mapping[int, Params], num_models: int, *, max_update_norm: float = 0.0) -> None:
    """Raise ValueError unless ``reply`` holds finite losses and well-formed updates of models it was sent.

    Checked, in this order: the number of losses (``num_models``) and that they are finite numbers;
    ``num_samples`` is an integer >= 1; every returned model was sent, has exactly the sent
    parameter names, and each tensor has the sent shape and dtype and only finite values; and,
    when ``max_update_norm`` > 0, the L2 norm of each returned model minus the model sent is at
    most ``max_update_norm`` (``[faults].max_update_norm``).

    Parameters
    ----------
    reply
        What the site returned.
    sent
        The models the site was sent, by server-model index (the server's own, unmodified copies).
    num_models
        K: the number of losses expected (0 for methods without server models).
    max_update_norm
        Bound on each update's L2 norm; 0 switches the check off.
    """
    losses = list(reply.losses)
    if num_models and len(losses) != num_models:
        raise ValueError(f"expected {num_models} losses, got {len(losses)}")
    if not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in losses):
        raise ValueError(f"losses must be numbers, got {[type(x).__name__ for x in losses]}")
    if not all(math.isfinite(x) for x in losses):
        raise ValueError(f"non-finite loss reported: {losses}")
    if not isinstance(reply.num_samples, numbers.Integral) or isinstance(reply.num_samples, bool) or reply.num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {reply.num_samples!r}")
    for k, params in reply.models.items():
        if k not in sent:
            raise ValueError(f"returned model {k}, which was not sent")
        ref = sent[k]
        if set(params) != set(ref):
            missing, extra = sorted(set(ref) - set(params)), sorted(set(params) - set(ref))
            raise ValueError(f"model {k}: parameter names differ from the model sent: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, t in params.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"model {k}: {name!r} is a {type(t).__name__}, expected a torch.Tensor")
            if t.dtype != ref[name].dtype:
                raise ValueError(f"model {k}: {name!r} has dtype {t.dtype}, expected {ref[name].dtype}")
            if t.shape != ref[name].shape:
                raise ValueError(f"model {k}: {name!r} has shape {tuple(t.shape)}, expected {tuple(ref[name].shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"model {k}: {name!r} has NaN or Inf values")
        if max_update_norm > 0:
            norm = update_norm(params, ref)
            if not norm <= max_update_norm:
                raise ValueError(f"model {k}: update norm {norm:.4g} exceeds [faults].max_update_norm = {max_update_norm:g}")


class ServerRuntime:
    """The server half: K models, participant sampling, broadcast, aggregation."""

    def __init__(self, config: FederationConfig, algorithm: Algorithm, models: list[Params]) -> None:
        self.config = config
        self.algorithm = algorithm
        self.models = models

    def participants(self, round_idx: int, names: Sequence[str]) -> list[str]:
        """Sites sampled for ``round_idx`` among ``names`` (all when participation is 1)."""
        names = sorted(names)
        m = max(1, round(self.config.run.participation * len(names)))
        if m >= len(names):
            return names
        rng = np.random.default_rng(derive_seed(self.config.run.seed, "participation", round_idx))
        return sorted(names[i] for i in rng.choice(len(names), size=m, replace=False))

    def round_info(self, round_idx: int, counts: Mapping[str, int]) -> RoundInfo:
        """The broadcast of ``round_idx``: λ_i (sample share among participants) and the algorithm's extras."""
        total = sum(counts.values())
        return RoundInfo(
            round=round_idx,
            num_rounds=self.config.run.rounds,
            participants=tuple(counts),
            site_weight={s: n / total for s, n in counts.items()},
            extras=self.algorithm.round_extras(round_idx, self.config.run.rounds),
        )

    def models_for(self, site: str, info: RoundInfo) -> dict[int, Params]:
        """Copies of the models ``site`` receives this round."""
        return {k: {n: t.clone() for n, t in self.models[k].items()} for k in self.algorithm.models_to_send(site, info)}

    def begin_aggregation(self, info: RoundInfo) -> Aggregation:
        """Start the round's server step; add validated replies to it as they arrive."""
        return self.algorithm.begin_aggregation(info, self.models)

    def finish(self, aggregation: Aggregation) -> ServerStep:
        """Complete the server step and keep the new models."""
        step = aggregation.result()
        self.models = step.models
        self.algorithm.commit(step)
        return step

    def aggregate(self, info: RoundInfo, replies: Mapping[str, SiteReply]) -> ServerStep:
        """All replies at once (same path as streaming, in ``replies`` order)."""
        aggregation = self.begin_aggregation(info)
        for site, reply in replies.items():
            aggregation.add(site, reply)
        return self.finish(aggregation)


WorkFactory = Callable[..., SiteWork]


class SiteRuntime:
    """The site half: one site's data, persistent state and local compute.

    Parameters
    ----------
    config
        The federation config (training hyper-parameters, seed).
    data
        This site's data.
    algorithm
        The algorithm (its site half is used).
    network
        Scratch network (weights are overwritten on every use); may be shared by sites run one after another.
    initial_buffers
        Buffers of the freshly initialised network.
    state
        Persistent site state (restored from a checkpoint on resume).
    work_factory
        Builds the site's ``LocalWork`` for its round (``SiteWork``, or a DP variant added by composition).
    eval_work_factory
        Builds the ``LocalWork`` of evaluation (deployment choice and test metrics stay at the site;
        default ``SiteWork``, so that evaluating never spends a DP site's privacy budget).
    """

    def __init__(
        self,
        config: FederationConfig,
        data: SiteData,
        algorithm: Algorithm,
        network: nn.Module,
        initial_buffers: Params,
        state: SiteState | None = None,
        work_factory: WorkFactory = SiteWork,
        eval_work_factory: WorkFactory = SiteWork,
    ) -> None:
        self.config = config
        self.data = data
        self.algorithm = algorithm
        self.network = network
        self.initial_buffers = initial_buffers
        self.state = state or SiteState()
        self.work_factory = work_factory
        self.eval_work_factory = eval_work_factory

    @property
    def name(self) -> str:
        return self.data.name

    def work(self, round_idx: int, state: SiteState | None = None, *, factory: WorkFactory | None = None,
             network: nn.Module | None = None) -> SiteWork:
        """This site's compute in ``round_idx``.

        On its real state unless ``state`` is given, with ``work_factory`` unless ``factory`` is
        given, on the shared scratch network unless ``network`` is given.
        """
        return (factory or self.work_factory)(
            data=self.data,
            network=self.network if network is None else network,
            initial_buffers=self.initial_buffers,
            state=self.state if state is None else state,
            training=self.config.training,
            seed=self.config.run.seed,
            round_idx=round_idx,
        )

    def compute(self, info: RoundInfo, models: Mapping[int, Params], *,
                network: nn.Module | None = None) -> tuple[SiteReply, SiteState]:
        """Run this site's round on a copy of its state; return the reply and the would-be new state.

        Nothing of the site changes: the caller commits the state (:meth:`commit`) once the reply
        has been accepted. ``network`` replaces the shared scratch network (a private copy lets
        the round run in another thread without touching what other sites use).
        """
        scratch = self.state.copy()
        reply = self.algorithm.local_round(self.name, info, models, self.work(info.round, scratch, network=network))
        return reply, scratch

    def commit(self, state: SiteState) -> None:
        """Adopt the state of an accepted round (from :meth:`compute`)."""
        self.state = state

    def step(self, info: RoundInfo, models: Mapping[int, Params]) -> SiteReply:
        """Run this site's round; its state changes only if the step succeeds and validates."""
        reply, scratch = self.compute(info, models)
        validate_reply(reply, models, self.algorithm.num_models, max_update_norm=self.config.faults.max_update_norm)
        self.commit(scratch)
        return reply

    def evaluate(self, models: Sequence[Params], round_idx: int, *, private: bool = False,
                 released: Sequence[float] | None = None) -> dict[str, Any]:
        """The deployed model's test metrics (and after fine-tuning, if configured); state is untouched.

        At the final round a segmentation site read from NIfTI files is also scored as acquired,
        on each test volume's own grid (``dice_native``, ``hd95_native_mm``: :mod:`fedfew_med.data.native`).

        A site that trains with DP (``private``) chooses its model from ``released``, the K losses
        it released (charged) in its last training round, and never computes a fresh loss on
        its training records nor fine-tunes on them (:mod:`fedfew_med.deployment`).
        """
        work = self.work(round_idx, self.state.copy(), factory=self.eval_work_factory)
        if private and self.config.run.finetune_eval_epochs:
            raise PrivateDeploymentError(f"site {self.name!r} trains with DP: [run].finetune_eval_epochs must be 0")
        dep = self.algorithm.deploy(self.name, models, chooser(work, site=self.name, private=private, released=released))
        entry: dict[str, Any] = {"model": dep.model_index, "scores": list(dep.scores), "device": str(work.device)}
        entry["metrics"] = score(work, dep.params, dep.slot)
        if round_idx == self.config.run.rounds - 1 and self.data.task == "segmentation":
            entry["metrics"].update(native_metrics(work.deployed_network(dep.params, slot=dep.slot), self.data))
        ft_epochs = self.config.run.finetune_eval_epochs
        if ft_epochs:
            tuned = work.train(dep.params, slot="eval_finetune", from_slot=dep.slot, epochs=ft_epochs)
            entry["metrics_finetuned"] = score(work, tuned.params, "eval_finetune")
        return entry


def score(work: SiteWork, params: Params, slot: str) -> dict[str, float]:
    """Test-split metrics of ``params`` for the site's task.

    A site that tests on grid patches (it trained on patches) is scored on whole volumes: the
    patches' class probabilities are put back together (:meth:`~fedfew_med.data.patches.GridPatches.stitch`) before the
    argmax, so that Dice is a volume's, not the mean over tiles that mostly hold no object.
    """
    probs, targets = work.predict(params, slot=slot, split="test")
    if work.data.task in ("classification", "tabular"):
        p, t = probs.numpy(), targets.numpy()
        return {**classification_metrics(p, t), **prediction_checks(p, t)}
    test = work.data.splits["test"]
    if isinstance(test, GridPatches):
        preds, refs, _ = test.volume_masks(probs, targets)
        return segmentation_metrics(preds, refs, probs.shape[1])
    return segmentation_metrics(probs.argmax(dim=1, keepdim=True), targets, probs.shape[1])


def local_runtimes(config: FederationConfig, sites: Sequence[SiteData], algorithm: Algorithm,
                   work_factory: WorkFactory = SiteWork, prepare: NetworkPreparer | None = None) -> dict[str, SiteRuntime]:
    """Site runtimes for sites run one after another in one process (sharing one scratch network)."""
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ValueError(f"site names must be unique, got {names}")
    facts = ModelFacts.common(sites)
    network = network_factory(config, facts, prepare)(0)
    buffers = buffers_of(network)
    return {s.name: SiteRuntime(config, s, algorithm, network, buffers, work_factory=work_factory) for s in sites}
