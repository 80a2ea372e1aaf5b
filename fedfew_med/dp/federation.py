"""DP for a whole federation: which sites train privately, their plans, server-side DP, persistence.

Where a site's ``[privacy]`` options come from (each later source overrides the earlier ones
key by key; ``enabled = false`` switches DP off for that site):

1. ``[privacy]`` of the federation file: defaults for every site (the synthetic federation has
   no site files, so this is how it gets DP);
2. ``[privacy.sites.<site name>]`` of the federation file: one site's overrides;
3. ``[privacy]`` of the site's own TOML file (``[data] name = "sites"``), carried in
   ``SiteData.metadata["privacy"]``: the site's own word is final.

A site with no table anywhere trains without DP. Server-side DP is the separate
``[server_privacy]`` table of the federation file (:class:`ServerPrivacyOptions`); it wraps any
algorithm in :class:`~fedfew_med.dp.server.ServerDP`.

The runner (``fedfew_med.simulation``) builds the network through :func:`network_preparer`,
plans every DP site once with :func:`plan_sites` (probe one round of the algorithm, calibrate σ
for the rounds the site will take part in, open its ledger), installs
:meth:`SitePrivacy.work_factory` as the site's training work, asks :meth:`SitePrivacy.can_train`
before every round (:func:`split_trainers`), and stores :func:`privacy_state` in every checkpoint
(restored by :func:`load_privacy_state`), so that a restart never resets spent ε. The Flower
deployment (``fedfew_med.flower``) plans one site at a time with :func:`plan_site`, at the site
and, for its budget checks, at the coordinator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from fedfew_med.algorithms.base import Algorithm, Params, RoundInfo
from fedfew_med.config import ConfigError, FederationConfig, build_dataclass, require
from fedfew_med.data.base import SiteData
from fedfew_med.dp.calibrate import Calibration, CalibrationError, calibrate_site, probe_round
from fedfew_med.dp.engine import resolve_grad_sample_mode
from fedfew_med.dp.ledger import LedgerStateError, RdpCurves
from fedfew_med.dp.networks import NotDPReadyError, make_dp_ready
from fedfew_med.dp.options import PrivacyOptions
from fedfew_med.dp.report import mechanisms_summary
from fedfew_med.dp.server import ServerDP
from fedfew_med.dp.site import SitePrivacy

SITES_KEY = "sites"  # [privacy.sites.<name>]: per-site overrides in the federation file


@dataclass(frozen=True)
class ServerPrivacyOptions:
    """``[server_privacy]``: clip each site's update, noise the aggregate (site-level DP at the server).

    Attributes
    ----------
    clip
        L2 bound C of each site's update of each model.
    noise_multiplier
        σ: the noise std on model k is ``σ · C · c_max,k`` (see :mod:`fedfew_med.dp.server`).
    delta, accountant
        The server ledger's δ and accountant.
    target_epsilon
        Budget of the server ledger; once the next round would exceed it the server stops
        updating the models. 0 = no budget (ε is recorded only).
    """

    clip: float
    noise_multiplier: float
    delta: float = 1e-5
    accountant: Literal["rdp", "prv"] = "rdp"
    target_epsilon: float = 0.0

    def __post_init__(self) -> None:
        require(self.clip > 0, "clip", "be > 0", self.clip)
        require(self.noise_multiplier > 0, "noise_multiplier", "be > 0", self.noise_multiplier)
        require(0.0 < self.delta < 1.0, "delta", "be in (0, 1)", self.delta)
        require(self.target_epsilon >= 0, "target_epsilon", "be >= 0 (0 = no budget)", self.target_epsilon)


def federation_defaults(config: FederationConfig) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The federation's ``[privacy]`` defaults and its ``[privacy.sites.*]`` overrides, as plain dicts."""
    table = {k: v for k, v in config.privacy.items() if k != SITES_KEY}
    per_site = config.privacy.get(SITES_KEY, {})
    if not isinstance(per_site, Mapping) or not all(isinstance(v, Mapping) for v in per_site.values()):
        raise ConfigError(f"{config.source}: [privacy.{SITES_KEY}] must hold one table per site name, got {per_site!r}")
    if table:  # the defaults must be valid on their own, so that an error names this file
        PrivacyOptions.from_table(table, where=f"{config.source}: [privacy]")
    return table, {str(name): dict(values) for name, values in per_site.items()}


def site_privacy_options(config: FederationConfig, site: SiteData) -> PrivacyOptions | None:
    """The site's validated privacy options, or None when it trains without DP (see the module docstring)."""
    defaults, per_site = federation_defaults(config)
    own = site.metadata.get("privacy") or {}
    if not isinstance(own, Mapping):
        raise ConfigError(f"site {site.name!r}: its [privacy] must be a table, got {own!r}")
    table = {**defaults, **per_site.get(site.name, {}), **own}
    if not table:
        return None
    if own:
        where = f"{site.metadata.get('site_file', site.name)}: [privacy]"
    elif site.name in per_site:
        where = f"{config.source}: [privacy.{SITES_KEY}.{site.name}]"
    else:
        where = f"{config.source}: [privacy]"
    options = PrivacyOptions.from_table(table, where=where)
    return options if options.enabled else None


def private_sites(config: FederationConfig, sites: Sequence[SiteData]) -> dict[str, PrivacyOptions]:
    """Options of every site that trains with DP, by name; ConfigError for overrides of unknown sites."""
    _, per_site = federation_defaults(config)
    names = {s.name for s in sites}
    unknown = sorted(set(per_site) - names)
    if unknown:
        raise ConfigError(
            f"{config.source}: [privacy.{SITES_KEY}.{unknown[0]}] names no site of the federation; the sites are {', '.join(sorted(names))}"
        )
    out = {}
    for site in sites:
        options = site_privacy_options(config, site)
        if options is not None:
            out[site.name] = options
    if out and config.training.one_pass:
        raise ConfigError(f"{config.source}: [training].one_pass cannot be used when a site trains with DP "
                          f"(site {next(iter(out))!r}): DP-SGD clips and noises each copy's per-sample gradients on its own")
    if out and config.training.channels_last:
        raise ConfigError(f"{config.source}: [training].channels_last cannot be used when a site trains with DP "
                          f"(site {next(iter(out))!r}): Opacus' per-sample gradients are written for the default memory layout; "
                          "set channels_last = false")
    if out and config.training.precision != "32":
        # Clipping bounds a float32 per-sample gradient norm; under autocast Opacus' hooks would see
        # bfloat16/float16 activations and gradients, which its clipping and noise were not written for.
        raise ConfigError(f'{config.source}: [training].precision must be "32" when a site trains with DP '
                          f"(site {next(iter(out))!r}), got {config.training.precision!r}")
    return out


def network_preparer(config: FederationConfig, sites: Sequence[SiteData]) -> Callable[[nn.Module], nn.Module] | None:
    """:func:`make_dp_ready` when any site trains with DP (every site and the server share one architecture), else None.

    A network that cannot be made DP-ready raises a ConfigError naming ``[model].name``.
    """
    if not private_sites(config, sites):
        return None
    return dp_ready_preparer(config)


def dp_ready_preparer(config: FederationConfig) -> Callable[[nn.Module], nn.Module]:
    """:func:`make_dp_ready` for the networks of ``config`` (a ConfigError naming ``[model].name`` when impossible).

    Every network of a federation with a DP site is made DP-ready, at the server and at every
    site (DP or not), so that all of them train and exchange one architecture.
    """

    def prepare(module: nn.Module) -> nn.Module:
        try:
            return make_dp_ready(module)
        except NotDPReadyError as exc:
            raise ConfigError(f"{config.source}: [model].name {config.model.name!r} cannot train with DP: {exc}") from None

    return prepare


def server_privacy_options(config: FederationConfig) -> ServerPrivacyOptions | None:
    """The validated ``[server_privacy]`` table, or None when it is absent."""
    if not config.server_privacy:
        return None
    return build_dataclass(ServerPrivacyOptions, config.server_privacy, where=f"{config.source}: [server_privacy]")


def with_server_dp(algorithm: Algorithm, config: FederationConfig) -> Algorithm:
    """``algorithm`` wrapped in :class:`ServerDP` when the config asks for server-side DP (else unchanged)."""
    options = server_privacy_options(config)
    if options is None:
        return algorithm
    if getattr(algorithm, "reseeds", False):
        raise ConfigError(
            f"{config.source}: [algorithm.params].reseed_after must be 0 with [server_privacy] (a re-seeded model is one "
            f"site's update, outside the clipped and noised step), got {algorithm.options.reseed_after}"  # type: ignore[attr-defined]
        )
    return ServerDP(
        algorithm,
        clip=options.clip,
        noise_multiplier=options.noise_multiplier,
        seed=config.run.seed,
        delta=options.delta,
        accountant=options.accountant,
        target_epsilon=options.target_epsilon or None,
    )


def plan_sites(
    config: FederationConfig,
    sites: Sequence[SiteData],
    *,
    algorithm: Algorithm,
    models: Sequence[Params],
    network: nn.Module,
    participants: Callable[[int], Sequence[str]],
    round_info: Callable[[int, Sequence[str]], RoundInfo],
) -> dict[str, SitePrivacy]:
    """A :class:`SitePrivacy` for every DP site, calibrated for the rounds it will take part in.

    Parameters
    ----------
    config, sites
        The federation.
    algorithm, models
        The algorithm and the initial server models (one round is probed on them; nothing is trained).
    network
        The (DP-ready) network, for the clipping mode.
    participants
        ``participants(r)``: the sites sampled in round r (seeded by the public run seed, so the
        number of rounds a site takes part in is known in advance and counted exactly).
    round_info
        ``round_info(r, names)``: the round's broadcast.
    """
    options = private_sites(config, sites)
    schedule = [set(participants(r)) for r in range(config.run.rounds)]
    curves = RdpCurves()  # one RDP memo for the run's calibrations and ledgers
    calibrations: dict[tuple[Any, ...], Calibration] = {}  # sites with the same plan share one search
    out: dict[str, SitePrivacy] = {}
    for site in sites:
        if site.name not in options:
            continue
        opts = options[site.name]
        taking_part = [r for r, names in enumerate(schedule) if site.name in names]
        if not taking_part:  # never sampled: it never trains, so it spends nothing and needs no plan
            continue
        first = taking_part[0]
        out[site.name] = plan_site(
            config, site.name, opts, num_samples=site.size("train"), rounds=len(taking_part),
            first_info=round_info(first, sorted(schedule[first])), algorithm=algorithm, models=models,
            grad_sample_mode=resolve_grad_sample_mode(opts.grad_sample_mode, network), curves=curves,
            calibrations=calibrations,
        )
    return out


def plan_site(
    config: FederationConfig,
    site: str,
    options: PrivacyOptions,
    *,
    num_samples: int,
    rounds: int,
    first_info: RoundInfo,
    algorithm: Algorithm,
    models: Sequence[Params] | Mapping[int, Params],
    grad_sample_mode: str,
    curves: RdpCurves | None = None,
    calibrations: MutableMapping[tuple[Any, ...], Calibration] | None = None,
) -> SitePrivacy:
    """One DP site's :class:`SitePrivacy`: probe its first round, calibrate σ for its ``rounds``, open its ledger.

    :func:`plan_sites` calls it for every DP site of an in-process federation; a Flower site and
    its coordinator call it with the participation plan the coordinator sends (the same inputs
    give the same calibration, to the bit).

    Parameters
    ----------
    config
        The federation config (batch size, local epochs; its source names errors).
    site, options, num_samples
        The site, its resolved privacy options and its training-set size.
    rounds
        How many rounds the site will take part in.
    first_info
        The broadcast of the first of those rounds (the round that is probed; only ``site``'s
        own entries are read).
    algorithm, models
        The algorithm and the initial server models (by index).
    grad_sample_mode
        The resolved clipping mode (:func:`resolve_grad_sample_mode`), for the report.
    curves, calibrations
        Memos shared by the sites of one run (optional; they change nothing but the time taken).
        ``calibrations`` maps ``(options, num_samples, batch_size, rounds, usage)`` to the calibration.
    """
    sent = {k: models[k] for k in algorithm.models_to_send(site, first_info)}
    usage = probe_round(algorithm, site, first_info, sent, num_samples=num_samples, local_epochs=config.training.local_epochs)
    memo: MutableMapping[tuple[Any, ...], Calibration] = calibrations if calibrations is not None else {}
    key = (options, num_samples, config.training.batch_size, rounds, usage)
    if key not in memo:
        try:
            memo[key] = calibrate_site(
                options, num_samples=num_samples, batch_size=config.training.batch_size, rounds=rounds,
                usage=usage, curves=curves,
            )
        except (CalibrationError, ValueError) as exc:
            raise ConfigError(f"{config.source}: site {site!r}: its privacy options cannot be met: {exc}") from None
    return SitePrivacy(site, options, memo[key], grad_sample_mode=grad_sample_mode, usage=usage, curves=curves)


def split_trainers(
    privacy: Mapping[str, SitePrivacy], round_idx: int, participants: Sequence[str], log: logging.Logger
) -> tuple[list[str], list[str]]:
    """``participants`` split into the sites that train in ``round_idx`` and those out of privacy budget.

    A site without a plan in ``privacy`` always trains; a DP site trains while its next planned
    round fits its budget. The first refusal marks it stopped for good (logged once, on ``log``).
    """
    trainers, stopped = [], []
    for site in participants:
        p = privacy.get(site)
        if p is not None and p.stopped:  # stopped for good: its ledger and plan no longer change
            stopped.append(site)
            continue
        if p is None or p.can_train(round_idx):
            trainers.append(site)
            continue
        stopped.append(site)
        after = p.ledger.epsilon_after(p.round_mechanisms(round_idx))
        log.warning("round %d: site %s stops training: its next round would take ε from %.4f to %.4f, past its "
                    "budget ε = %g (δ = %g); it keeps receiving and evaluating models",
                    round_idx, site, p.ledger.epsilon(), after, p.options.epsilon, p.options.delta)
    return trainers, stopped


def privacy_state(sites: Mapping[str, SitePrivacy], algorithm: Algorithm) -> dict[str, Any]:
    """JSON-able privacy state of a run (every site's ledger, and the server's under ServerDP), for the checkpoint."""
    out: dict[str, Any] = {"sites": {name: p.state_dict() for name, p in sorted(sites.items())}}
    if isinstance(algorithm, ServerDP):
        out["server"] = algorithm.state_dict()
    return out


def load_privacy_state(state: Mapping[str, Any] | None, sites: Mapping[str, SitePrivacy], algorithm: Algorithm, *, where: str) -> None:
    """Restore what :func:`privacy_state` saved; LedgerStateError when a ledger is missing or does not fit this run."""
    state = state or {}
    saved_sites = state.get("sites") or {}
    for name, p in sites.items():
        if name not in saved_sites:
            raise LedgerStateError(f"{where}: the checkpoint holds no privacy ledger of site {name!r}; it cannot resume a DP run")
        p.load_state_dict(saved_sites[name])
    if isinstance(algorithm, ServerDP):
        if "server" not in state:
            raise LedgerStateError(f"{where}: the checkpoint holds no server privacy ledger")
        try:
            algorithm.load_state_dict(state["server"])
        except ValueError as exc:
            raise LedgerStateError(f"{where}: {exc}") from None


def server_report(server_dp: ServerDP) -> dict[str, Any]:
    """The server ledger's report (JSON-able): ε spent, δ, clip, σ, accountant, releases, mechanisms."""
    ledger = server_dp.ledger
    return {
        "epsilon": ledger.epsilon(),
        "delta": ledger.delta,
        "target_epsilon": ledger.target_epsilon,
        "accountant": ledger.accountant,
        "clip": server_dp.clip,
        "noise_multiplier": server_dp.noise_multiplier,
        "releases": ledger.total_steps("server"),
        "mechanisms": mechanisms_summary(ledger),
        "digest": ledger.digest(),
    }
