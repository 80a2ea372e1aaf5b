"""Site data: the :class:`SiteData` contract and the sources that fill it."""

from fedfew_med.config import ConfigError, NamedConfig, build_dataclass
from fedfew_med.data.base import SiteData, Split
from fedfew_med.data.synthetic import SyntheticOptions, make_synthetic_federation

__all__ = ["SiteData", "Split", "SyntheticOptions", "build_sites", "make_synthetic_federation"]


def build_sites(data: NamedConfig, *, source: str = "<memory>") -> list[SiteData]:
    """Build the federation's sites from the ``[data]`` section (``name`` picks the source)."""
    if data.name == "synthetic":
        options = build_dataclass(SyntheticOptions, data.params, where=f"{source}: [data.params]")
        return make_synthetic_federation(options)
    raise ConfigError(f"{source}: [data].name must be one of synthetic, got {data.name!r}")
