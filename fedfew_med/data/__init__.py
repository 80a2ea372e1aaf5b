"""Site data: the :class:`SiteData` contract and the sources that fill it.

``[data] name`` in a federation file picks the source:

- ``synthetic``: the generated federation of ``fedfew_med.data.synthetic`` (options in ``[data.params]``);
- ``sites``: one TOML file per site (``[data.params] files = [...]``, relative to the federation
  file), each loaded and validated by :func:`fedfew_med.data.sites.load_site`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedfew_med.config import ConfigError, NamedConfig, build_dataclass, require
from fedfew_med.data.base import Progress, SiteData, Split
from fedfew_med.data.synthetic import SyntheticOptions, make_synthetic_federation

__all__ = ["Progress", "SiteData", "SitesOptions", "Split", "SyntheticOptions", "build_sites", "make_synthetic_federation"]

SOURCES = ("synthetic", "sites")


@dataclass(frozen=True)
class SitesOptions:
    """``[data.params]`` of a federation made of site files."""

    files: tuple[str, ...]

    def __post_init__(self) -> None:
        require(len(self.files) >= 1, "files", "list at least one site file", list(self.files))


def build_sites(data: NamedConfig, *, source: str = "<memory>", progress: Progress | None = None) -> list[SiteData]:
    """Build the federation's sites from the ``[data]`` section (``name`` picks the source).

    Relative site-file paths are taken from the folder of ``source`` (the federation file);
    :func:`fedfew_med.config.load_federation` already stores them as absolute paths.
    """
    if data.name == "synthetic":
        options = build_dataclass(SyntheticOptions, data.params, where=f"{source}: [data.params]")
        return make_synthetic_federation(options)
    if data.name == "sites":
        from fedfew_med.data.sites import load_sites  # MONAI readers: only when real data is asked for

        sites = build_dataclass(SitesOptions, data.params, where=f"{source}: [data.params]")
        base = Path(source).parent if source != "<memory>" else Path(".")
        return load_sites(list(sites.files), base, progress)
    raise ConfigError(f"{source}: [data].name must be one of {', '.join(SOURCES)}, got {data.name!r}")
