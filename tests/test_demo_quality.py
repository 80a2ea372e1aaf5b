"""The demo federation shows what FedFew is for: K = 3 beats K = 1 (and FedAvg) on the same seeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedfew_med.config import load_federation
from fedfew_med.simulation import run

DEMO = Path(__file__).resolve().parents[1] / "site_configs" / "demo_federation.toml"


@pytest.mark.slow
def test_k3_beats_k1_and_fedavg_on_the_demo(tmp_path):
    k3 = run(load_federation(DEMO), run_dir=tmp_path / "k3").summary["summary"]
    k1 = run(load_federation(DEMO, ["algorithm.params.k=1"]), run_dir=tmp_path / "k1").summary["summary"]
    fedavg = run(load_federation(DEMO, ["algorithm.name=fedavg", "algorithm.params={}"]), run_dir=tmp_path / "avg").summary["summary"]
    assert k3["mean"] > k1["mean"] + 0.05
    assert k3["worst"] > k1["worst"]
    assert k3["mean"] > fedavg["mean"] + 0.05
