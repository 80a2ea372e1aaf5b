"""Tiny federations of site files for the predict / export tests: named sites, a short FedFew run."""

from __future__ import annotations

import json
from pathlib import Path

from fedfew_med.config import load_federation
from fedfew_med.simulation import run as simulate


def named(site: Path, name: str) -> Path:
    """Rename a sitekit site file's ``[site].name`` (sitekit writes every site as ``site0``)."""
    site.write_text(site.read_text().replace('name = "site0"', f'name = "{name}"'))
    return site


def federation(tmp_path: Path, files: list[Path], model: str, rounds: int = 2) -> Path:
    """Run FedFew K = 2 on ``files`` with the ``[model]`` lines ``model``; the run directory."""
    fed = tmp_path / "federation.toml"
    fed.write_text(
        f"[run]\nrounds = {rounds}\n[algorithm]\nname = \"fedfew\"\nparams = {{k = 2}}\n[training]\nbatch_size = 4\n"
        f"[model]\n{model}\n[data]\nname = \"sites\"\nparams = {{files = {json.dumps([str(f) for f in files])}}}\n"
    )
    run_dir = tmp_path / "run"
    simulate(load_federation(fed), run_dir=run_dir)
    return run_dir
