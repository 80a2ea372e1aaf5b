"""A privacy officer's policy: loaded from TOML into frozen dataclasses, checked before and after a run.

The file (``privacy/policy.toml`` is the example)::

    [policy]
    name = "consortium policy 2025-01"
    dp_mandatory = true                   # every site trains with DP-SGD
    max_epsilon = 8.0                     # the whole run at one site (all rounds, K models, loss reports)
    max_delta = 1e-5
    delta_at_most_inverse_records = true  # δ <= 1 / (the site's training records)
    private_loss_channel = true           # the K losses a site reports are noised and charged
    require_tls = true                    # deployments (Flower): TLS between sites and server
    require_authenticated_sites = true    # deployments: only registered SuperNodes may connect

    [sites."hospital-a"]                  # optional, stricter limits for one site
    max_epsilon = 3.0

Three checks, each returning one :class:`Verdict` per (site, rule):

- :func:`check_config` — a federation's *resolved* per-site ``[privacy]`` options (federation
  defaults, ``[privacy.sites.<name>]``, the site file's own table) before any training;
  :func:`enforce` raises :class:`PolicyViolation` (a ``ConfigError``, exit code 2 at the CLI)
  naming every site and rule broken;
- :func:`check_spent` — what a run actually spent (its ``privacy`` records), for the report;
- :func:`check_deployment` — TLS and site authentication of a deployment; an in-process
  simulation has no network, so both rules are "not applicable" there;
  :func:`check_recorded_transport` checks them against what a Flower run's coordinator recorded.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedfew_med.config import ConfigError, FederationConfig, build_dataclass, read_toml, require
from fedfew_med.data.base import SiteData
from fedfew_med.dp.federation import site_privacy_options

RULES = (
    "dp_mandatory",
    "max_epsilon",
    "max_delta",
    "delta_at_most_inverse_records",
    "private_loss_channel",
    "require_tls",
    "require_authenticated_sites",
)
"""Rule names, in the order the report lists them (equal to the policy's keys)."""

DEPLOYMENT = "(deployment)"
"""The ``site`` of verdicts that concern the whole deployment (TLS, authentication)."""


class PolicyError(ConfigError):
    """The policy file itself is invalid (names file, key, expectation and value)."""


class PolicyViolation(ConfigError):
    """A run's configuration breaks the policy; :attr:`verdicts` lists every broken rule."""

    def __init__(self, message: str, verdicts: Sequence[Verdict]) -> None:
        super().__init__(message)
        self.verdicts = tuple(verdicts)


def _positive_or_none(value: float | None) -> bool:
    return value is None or value > 0


@dataclass(frozen=True)
class SiteLimits:
    """Stricter limits for one site (``[sites.<name>]``); None keeps the policy's own."""

    max_epsilon: float | None = None
    max_delta: float | None = None

    def __post_init__(self) -> None:
        require(_positive_or_none(self.max_epsilon), "max_epsilon", "be > 0", self.max_epsilon)
        require(self.max_delta is None or 0 < self.max_delta < 1, "max_delta", "be in (0, 1)", self.max_delta)


@dataclass(frozen=True)
class PrivacyPolicy:
    """The officer's rules (``[policy]``) and per-site limits (``[sites.<name>]``).

    Attributes
    ----------
    name
        A label shown in reports.
    dp_mandatory
        Every site must train with DP-SGD.
    max_epsilon
        Largest ε a site may spend over the whole run (its target ε before the run, its spent ε after).
    max_delta
        Largest δ.
    delta_at_most_inverse_records
        δ must also be at most 1 / (the site's number of training records).
    private_loss_channel
        The K losses a site reports to the server must be clipped, noised and charged to its ledger.
    require_tls, require_authenticated_sites
        Deployments across machines must use TLS and admit only registered (authenticated) sites.
    sites
        Per-site :class:`SiteLimits`.
    source
        The file the policy came from.
    """

    name: str = "privacy policy"
    dp_mandatory: bool = True
    max_epsilon: float = 8.0
    max_delta: float = 1e-5
    delta_at_most_inverse_records: bool = True
    private_loss_channel: bool = True
    require_tls: bool = True
    require_authenticated_sites: bool = True
    sites: Mapping[str, SiteLimits] = field(default_factory=lambda: types.MappingProxyType({}))
    source: str = "<memory>"

    def __post_init__(self) -> None:
        require(self.max_epsilon > 0, "max_epsilon", "be > 0", self.max_epsilon)
        require(0 < self.max_delta < 1, "max_delta", "be in (0, 1)", self.max_delta)

    def epsilon_limit(self, site: str) -> float:
        """The largest ε ``site`` may spend (its own limit when stricter rules name it)."""
        own = self.sites.get(site)
        return own.max_epsilon if own is not None and own.max_epsilon is not None else self.max_epsilon

    def delta_limit(self, site: str, num_records: int | None = None) -> float:
        """The largest δ for ``site``: its own or the policy's, and 1 / records when that rule is on."""
        own = self.sites.get(site)
        limit = own.max_delta if own is not None and own.max_delta is not None else self.max_delta
        if self.delta_at_most_inverse_records and num_records:
            limit = min(limit, 1.0 / num_records)
        return limit

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for reports)."""
        out: dict[str, Any] = {rule: getattr(self, rule) for rule in ("name", *RULES)}
        out["sites"] = {name: {"max_epsilon": s.max_epsilon, "max_delta": s.max_delta} for name, s in sorted(self.sites.items())}
        out["source"] = self.source
        return out


def policy_from_dict(data: Mapping[str, Any], *, source: str = "<memory>") -> PrivacyPolicy:
    """Validate a parsed policy file (``[policy]`` and ``[sites.<name>]`` tables)."""
    unknown = sorted(set(data) - {"policy", "sites"})
    if unknown:
        raise PolicyError(f"{source}: unknown table [{unknown[0]}]; a policy has [policy] and [sites.<site name>]")
    table = data.get("policy")
    if not isinstance(table, Mapping):
        raise PolicyError(f"{source}: [policy] is required but missing (a table of rules, see privacy/policy.toml)")
    if "sites" in table or "source" in table:
        raise PolicyError(f"{source}: [policy]: unknown key {'sites' if 'sites' in table else 'source'!r}; per-site limits go in [sites.<name>]")
    raw_sites = data.get("sites", {})
    if not isinstance(raw_sites, Mapping):
        raise PolicyError(f"{source}: [sites] must hold one table per site name, got {raw_sites!r}")
    try:
        sites = {str(n): build_dataclass(SiteLimits, v, where=f"{source}: [sites.{n}]") for n, v in raw_sites.items()}
        policy = build_dataclass(PrivacyPolicy, table, where=f"{source}: [policy]")
    except PolicyError:
        raise
    except ConfigError as exc:
        raise PolicyError(str(exc)) from None
    return PrivacyPolicy(**{**{k: getattr(policy, k) for k in ("name", *RULES)}, "sites": types.MappingProxyType(sites), "source": source})


def load_policy(path: str | Path) -> PrivacyPolicy:
    """Load and validate a policy file; :class:`PolicyError` names file, key, expectation and value."""
    try:
        raw = read_toml(path)
    except ConfigError as exc:
        raise PolicyError(str(exc)) from None
    return policy_from_dict(raw, source=str(path))


@dataclass(frozen=True)
class Verdict:
    """One rule at one site.

    Attributes
    ----------
    site
        Site name, or :data:`DEPLOYMENT`.
    rule
        One of :data:`RULES`.
    ok
        True (met), False (broken), None (not applicable / not required by the policy).
    required
        What the policy asks, in words (e.g. ``"ε <= 8"``).
    actual
        What the run has, in words (e.g. ``"ε = 7.9998"``).
    """

    site: str
    rule: str
    ok: bool | None
    required: str
    actual: str

    @property
    def status(self) -> str:
        """``"pass"``, ``"FAIL"`` or ``"n/a"``."""
        return {True: "pass", False: "FAIL", None: "n/a"}[self.ok]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"site": self.site, "rule": self.rule, "ok": self.ok, "status": self.status, "required": self.required, "actual": self.actual}

    def message(self) -> str:
        """``site 'a' breaks rule max_epsilon: required ε <= 3, has ε = 8``."""
        who = "the deployment" if self.site == DEPLOYMENT else f"site {self.site!r}"
        return f"{who} breaks rule {self.rule}: required {self.required}, has {self.actual}"


def _site_verdicts(policy: PrivacyPolicy, site: str, *, dp: bool, epsilon: float | None, delta: float | None,
                   num_records: int, loss_private: bool, what: str) -> list[Verdict]:
    """The per-site rules for a site that uses DP with (ε, δ) (``what`` = "target" or "spent"), or not at all."""
    eps_limit = policy.epsilon_limit(site)
    own = policy.sites.get(site)
    delta_limit = own.max_delta if own is not None and own.max_delta is not None else policy.max_delta
    inv = 1.0 / num_records if num_records else math.inf
    no_dp = "no DP (ε unbounded)"
    out = [
        Verdict(site, "dp_mandatory", dp if policy.dp_mandatory else None, "DP-SGD on" if policy.dp_mandatory else "not required",
                "DP-SGD on" if dp else "DP off"),
        Verdict(site, "max_epsilon", dp and epsilon is not None and epsilon <= eps_limit, f"ε <= {eps_limit:g}",
                f"{what} ε = {epsilon:.6g}" if dp and epsilon is not None else no_dp),
        Verdict(site, "max_delta", dp and delta is not None and delta <= delta_limit, f"δ <= {delta_limit:g}",
                f"δ = {delta:g}" if dp and delta is not None else no_dp),
    ]
    if policy.delta_at_most_inverse_records:
        out.append(Verdict(site, "delta_at_most_inverse_records", dp and delta is not None and delta <= inv,
                           f"δ <= 1/{num_records} = {inv:.6g}", f"δ = {delta:g}" if dp and delta is not None else no_dp))
    else:
        out.append(Verdict(site, "delta_at_most_inverse_records", None, "not required", f"δ = {delta:g}" if dp and delta is not None else no_dp))
    out.append(Verdict(site, "private_loss_channel", loss_private if policy.private_loss_channel else None,
                       "losses clipped, noised and charged" if policy.private_loss_channel else "not required",
                       "private" if loss_private else "losses sent in the clear"))
    return out


def check_config(policy: PrivacyPolicy, config: FederationConfig, sites: Sequence[SiteData]) -> list[Verdict]:
    """Every per-site rule against the federation's resolved privacy options (nothing is trained).

    A site's target ε (the whole-run budget it is calibrated for, or stops at) is what is checked
    against ``max_epsilon``. With DP on, the loss channel is always private in fedfew-med (clipped
    per-record losses plus Gaussian noise, charged to the same ledger).
    """
    out: list[Verdict] = []
    for site in sorted(sites, key=lambda s: s.name):
        options = site_privacy_options(config, site)
        dp = options is not None
        out += _site_verdicts(policy, site.name, dp=dp, epsilon=options.epsilon if options else None,
                              delta=options.delta if options else None, num_records=site.size("train"),
                              loss_private=dp, what="target")
    return out


def check_spent(policy: PrivacyPolicy, *, sites: Mapping[str, int], privacy: Mapping[str, Mapping[str, Any]],
                reported_losses: Mapping[str, int]) -> list[Verdict]:
    """Every per-site rule against what a run recorded.

    Parameters
    ----------
    sites
        Training records per site name (every site of the run).
    privacy
        The run's ``privacy`` entries by site (``summary.json``); a site without one trained without DP.
    reported_losses
        How many losses each site reported to the server over the run.
    """
    out: list[Verdict] = []
    for name in sorted(sites):
        entry = privacy.get(name)
        dp = entry is not None
        released = int(entry.get("loss_releases", 0)) if entry else 0
        # private: every loss the site reported is in its ledger (a run whose algorithm reports none is private trivially)
        loss_private = reported_losses.get(name, 0) == 0 or (dp and released >= reported_losses.get(name, 0))
        out += _site_verdicts(policy, name, dp=dp, epsilon=float(entry["epsilon"]) if entry else None,
                              delta=float(entry["delta"]) if entry else None, num_records=sites[name],
                              loss_private=loss_private, what="spent")
    return out


# (policy rule, key of the recorded transport, what it asks for): the transport rules both checks walk
TRANSPORT_RULES = (("require_tls", "tls", "TLS"), ("require_authenticated_sites", "node_auth", "authenticated sites"))


def check_deployment(policy: PrivacyPolicy, *, tls: bool | None, authenticated: bool | None) -> list[Verdict]:
    """TLS and site authentication; ``None`` for either means no network (an in-process simulation)."""
    out = []
    for (rule, _, words), value in zip(TRANSPORT_RULES, (tls, authenticated), strict=True):
        required = bool(getattr(policy, rule))
        if value is None:
            out.append(Verdict(DEPLOYMENT, rule, None, words if required else "not required", "in-process simulation: no network"))
        else:
            out.append(Verdict(DEPLOYMENT, rule, bool(value) if required else None, words if required else "not required",
                               words if value else f"no {words}"))
    return out


def check_recorded_transport(policy: PrivacyPolicy, transport: Mapping[str, Any]) -> list[Verdict]:
    """TLS and site authentication against what a run recorded (the privacy report's ``transport`` section).

    Parameters
    ----------
    transport
        ``{"runner": "simulation"}`` for an in-process run (both rules "n/a": no network), or a Flower
        run's ``summary.json`` ``transport`` (``tls``, ``node_auth``: True, False or None, over all its
        ``launches``). A fact the coordinator did not record (a launch not made with
        ``fedfew-med flower run``) fails a rule that requires it: compliance cannot be shown.
    """
    if transport.get("runner") != "flower":
        return check_deployment(policy, tls=None, authenticated=None)
    launches = list(transport.get("launches") or [])
    out = []
    for rule, key, words in TRANSPORT_RULES:
        required = bool(getattr(policy, rule))
        value = transport.get(key)
        if value is None:
            actual = "not recorded by the coordinator (a launch not made with `fedfew-med flower run`)"
            ok: bool | None = False if required else None
        else:
            without = [int(e.get("first_round", 0)) for e in launches if e.get(key) is False]
            where = f"; in the launch from round {', '.join(map(str, without))}" if without and len(launches) > 1 else ""
            actual = f"{words if value else f'no {words}'} (recorded by the coordinator{where})"
            ok = bool(value) if required else None
        out.append(Verdict(DEPLOYMENT, rule, ok, words if required else "not required", actual))
    return out


def enforce(policy: PrivacyPolicy, config: FederationConfig, sites: Sequence[SiteData]) -> list[Verdict]:
    """:func:`check_config`, raising :class:`PolicyViolation` (naming every broken site and rule) when any fails."""
    verdicts = check_config(policy, config, sites)
    broken = [v for v in verdicts if v.ok is False]
    if broken:
        lines = "\n  ".join(v.message() for v in broken)
        raise PolicyViolation(f"{config.source} breaks the privacy policy {policy.source} ({policy.name}); nothing was trained:\n  {lines}", broken)
    return verdicts
