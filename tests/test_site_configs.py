"""Every federation file shipped in site_configs/ loads, and the synthetic ones run one small round."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedfew_med.config import load_federation
from fedfew_med.simulation import run

CONFIGS = Path(__file__).resolve().parents[1] / "site_configs"
SHRINK = {  # the same federations, small enough for a unit test
    "demo_federation.toml": ["data.params.num_sites=2", "data.params.train_min=16", "data.params.train_max=16", "data.params.test_per_site=8"],
    "synthetic_segmentation.toml": ["data.params.num_sites=2", "data.params.train_min=8", "data.params.train_max=8", "data.params.test_per_site=4"],
}
EXPECTED = {  # file -> (algorithm, model, data source)
    "br35h_federation.toml": ("fedfew", "classifier", "sites"),
    "demo_federation.toml": ("fedfew", "classifier", "synthetic"),
    "synthetic_segmentation.toml": ("fedfew", "unet", "synthetic"),
    "volumes3d_federation.toml": ("fedfew", "unet", "sites"),
}


def test_every_shipped_federation_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.toml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_federation_loads(name):
    config = load_federation(CONFIGS / name)
    assert (config.algorithm.name, config.model.name, config.data.name) == EXPECTED[name]


def test_volumes3d_points_at_the_prepared_data():
    config = load_federation(CONFIGS / "volumes3d_federation.toml")
    root = CONFIGS.parent / "data" / "volumes3d"
    assert list(config.data.params["files"]) == [str((root / f"site{i}.toml").resolve()) for i in range(4)]


def test_br35h_demo_points_at_the_prepared_data():
    config = load_federation(CONFIGS / "br35h_federation.toml")
    root = CONFIGS.parent / "data" / "br35h"
    assert list(config.data.params["files"]) == [str((root / f"site{i}.toml").resolve()) for i in range(4)]


@pytest.mark.parametrize("name", sorted(SHRINK))
def test_synthetic_federation_runs_a_round(name, tmp_path):
    config = load_federation(CONFIGS / name, [*SHRINK[name], "run.rounds=1"])
    summary = run(config, run_dir=tmp_path / "run").summary
    expected_metric = "dice" if "segmentation" in name else "accuracy"
    assert summary["metric"] == expected_metric and summary["failures"] == {}
    assert len(summary["per_site"]) == 2
    assert 0.0 <= summary["summary"]["worst"] <= summary["summary"]["mean"] <= 1.0  # NaN fails every comparison
