"""A SuperNode's side, without Flower: its node config, its data, its runtime.

A SuperNode is configured once, by its operator, with ``--node-config``::

    # a site described by its own site config (fedfew_med.data.sites.load_site)
    --node-config 'site-config="/srv/fedfew/site.toml" state-dir="/srv/fedfew/state"'
    # or one synthetic site of a federation config (demos and tests)
    --node-config 'federation-config="/srv/fedfew/demo.toml" site-index=2 state-dir="/srv/fedfew/state"'

Paths must be absolute: the ClientApp runs in a process started by the SuperNode,
whose working directory is not the operator's. The *training* configuration
comes from the coordinator with every message (one source of truth, protected by
its digest); the *data* is always the site's own.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfew_med.config import ConfigError, FederationConfig, did_you_mean, load_federation
from fedfew_med.data import SiteData, build_sites
from fedfew_med.dp.federation import dp_ready_preparer
from fedfew_med.runtime import ModelFacts, SiteRuntime, local_runtimes, make_algorithm
from fedfew_med.training import SiteState

KEYS = ("site-config", "federation-config", "site-index", "state-dir")


class NodeConfigError(ConfigError):
    """The SuperNode's ``--node-config`` is incomplete or contradictory."""


@dataclass(frozen=True)
class NodeSettings:
    """A SuperNode's ``--node-config``, validated."""

    state_dir: Path
    site_config: Path | None = None
    federation_config: Path | None = None
    site_index: int | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        """Validate the node config; errors name the key, what must hold and what was given."""
        where = "--node-config"
        unknown = sorted(set(node_config) - set(KEYS))
        if unknown:
            raise NodeConfigError(f"{where}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], KEYS)}; "
                                  f"allowed keys are {', '.join(KEYS)}")
        state_dir = _absolute(node_config, "state-dir", required=True)
        assert state_dir is not None
        site_config = _absolute(node_config, "site-config")
        federation_config = _absolute(node_config, "federation-config")
        index = node_config.get("site-index")
        if site_config is not None and (federation_config is not None or index is not None):
            raise NodeConfigError(f"{where}: give either site-config, or federation-config with site-index, not both")
        if site_config is None:
            if federation_config is None or index is None:
                raise NodeConfigError(
                    f"{where} must name the site's data: site-config=\"/abs/site.toml\", or "
                    f"federation-config=\"/abs/federation.toml\" site-index=N; got keys {sorted(node_config)}"
                )
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise NodeConfigError(f"{where}: site-index must be an integer >= 0, got {index!r}")
        return cls(state_dir=state_dir, site_config=site_config, federation_config=federation_config,
                   site_index=None if index is None else int(index))

    def load_site(self) -> SiteData:
        """This node's data (never sent anywhere)."""
        if self.site_config is not None:
            try:
                sites = importlib.import_module("fedfew_med.data.sites")
            except ModuleNotFoundError as exc:
                if exc.name != "fedfew_med.data.sites":
                    raise
                raise NodeConfigError(
                    f"--node-config site-config={str(self.site_config)!r} needs fedfew_med.data.sites.load_site, "
                    "which this installation of fedfew-med does not have; update it, or use "
                    "federation-config=... site-index=N for a synthetic site"
                ) from None
            site = sites.load_site(self.site_config)
            if not isinstance(site, SiteData):
                raise NodeConfigError(f"{self.site_config}: load_site returned {type(site).__name__}, expected SiteData")
            return site
        assert self.federation_config is not None and self.site_index is not None
        config = load_federation(self.federation_config)
        all_sites = build_sites(config.data, source=config.source)
        if self.site_index >= len(all_sites):
            raise NodeConfigError(
                f"--node-config site-index must be between 0 and {len(all_sites) - 1} "
                f"(the sites of {self.federation_config}), got {self.site_index}"
            )
        return all_sites[self.site_index]


def _absolute(node_config: Mapping[str, Any], key: str, *, required: bool = False) -> Path | None:
    value = node_config.get(key)
    if value is None or value == "":
        if required:
            raise NodeConfigError(f"--node-config must set {key}=\"/absolute/path\"")
        return None
    if not isinstance(value, str):
        raise NodeConfigError(f"--node-config {key} must be a quoted path, got {value!r}")
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise NodeConfigError(
            f"--node-config {key} must be an absolute path (the ClientApp does not run in your working directory), got {value!r}"
        )
    return path


def site_runtime(config: FederationConfig, data: SiteData, state: SiteState, *, dp_ready: bool = False) -> SiteRuntime:
    """The site half of the round, built by the constructors the in-process simulation uses.

    ``dp_ready`` (from the coordinator: some site of the federation trains with DP) builds the
    DP-ready network, as the simulation does for every site of such a federation.
    """
    prepare = dp_ready_preparer(config) if dp_ready else None
    algorithm, _ = make_algorithm(config, ModelFacts.of(data), prepare)
    runtime = local_runtimes(config, [data], algorithm, prepare=prepare)[data.name]
    runtime.state = state
    return runtime
