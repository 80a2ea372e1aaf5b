"""benchmarks/finetune_effect.py: fedfew_ft paired with FedFew at the same configuration, against a hand computation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import finetune_effect  # noqa: E402
import quality_data  # noqa: E402
import quality_grid  # noqa: E402

from fedfew_med.config import load_federation  # noqa: E402

DIAG = {"alpha_max": 0.4, "in_use": 3, "spread": 1.0, "reseeded": 0}


def _run(seed: int, per_site: dict[str, float], val: float, diagnostics: dict = DIAG) -> dict:
    return {"seed": seed, "per_site": per_site, "worst": min(per_site.values()), "mean": sum(per_site.values()) / len(per_site),
            "val_mean": val, "diagnostics": diagnostics}


def test_every_fedfew_ft_configuration_is_the_twin_of_fedfew_s_same_setting() -> None:
    config = load_federation(ROOT / "site_configs" / "demo_federation.toml")
    grid = quality_grid.method_grid(quality_data.Dataset("demo", config, [object()] * 6, "demo"), quick=False)  # type: ignore[list-item]
    pairs = list(quality_grid.finetune_twins(grid).items())
    assert len(pairs) == quality_grid.BUDGET
    assert all(a.method == "fedfew K=3" and b.method == "fedfew_ft K=3" and a.setting == b.setting for a, b in pairs)


@pytest.mark.parametrize(("tuned_sites", "tuned_diag", "mean", "up", "down", "same"), [
    ({"x": 0.9, "y": 0.7}, DIAG, 0.05, 1, 0, True),            # site x +0.1 in every seed, y level: mean +0.05
    ({"x": 0.8, "y": 0.6}, DIAG, -0.05, 0, 1, True),           # y −0.1
    ({"x": 0.8, "y": 0.7}, {**DIAG, "reseeded": 1}, 0.0, 0, 0, False),  # other models trained: flagged
])
def test_the_effect_by_hand(tuned_sites: dict, tuned_diag: dict, mean: float, up: int, down: int, same: bool) -> None:
    base = [_run(s, {"x": 0.8, "y": 0.7}, 0.75) for s in range(3)]
    tuned = [_run(s, tuned_sites, 0.76, tuned_diag) for s in range(3)]
    got = finetune_effect.effect(base, tuned)
    lo, hi = got["test"]["mean_ci"]
    site_diffs = [tuned_sites[s] - 0.8 if s == "x" else tuned_sites[s] - 0.7 for s in tuned_sites]
    assert got["test"]["mean"] == pytest.approx(mean) and min(site_diffs) - 1e-12 <= lo <= mean <= hi <= max(site_diffs) + 1e-12
    assert got["val"] == pytest.approx(0.01)
    assert (got["up"], got["down"], got["sites"]) == (3 * up, 3 * down, 6)
    assert got["same_models"] is same


@pytest.mark.parametrize(("a", "b", "same"), [
    (DIAG, DIAG, True),
    ({**DIAG, "skipped": 2}, DIAG, True),                  # cached before "skipped" was kept: compared on the rest
    ({**DIAG, "skipped": 2}, {**DIAG, "skipped": 1}, False),
    ({**DIAG, "spread": 1.1}, DIAG, False),
])
def test_same_training_compares_the_keys_both_runs_have(a: dict, b: dict, same: bool) -> None:
    assert finetune_effect.same_training(a, b) is same
