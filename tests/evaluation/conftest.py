"""Tiny runs made once per test session: classification (FedFew, FedAvg, Local) and segmentation (FedFew)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedfew_med import evaluation as ev
from fedfew_med.config import federation_from_dict
from fedfew_med.simulation import run as simulate
from tests.conftest import tiny_dict

ALGORITHMS = {
    "fedfew": {"name": "fedfew", "params": {"k": 2, "mu": 0.01}},
    "fedavg": {"name": "fedavg", "params": {}},
    "local": {"name": "local", "params": {}},
}


def _simulate(config: dict, run_dir: Path) -> Path:
    simulate(federation_from_dict(config, source=f"{run_dir.name}.toml"), run_dir=run_dir)
    return run_dir


def segmentation_dict() -> dict:
    """The tiny config as a segmentation task with a small U-Net."""
    d = tiny_dict(model={"name": "unet", "params": {"channels": [4, 8], "strides": [2]}})
    d["data"]["params"]["task"] = "segmentation"
    return d


@pytest.fixture(scope="session")
def cls_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run directories of the tiny classification federation by method."""
    root = tmp_path_factory.mktemp("eval_cls")
    return {name: _simulate(tiny_dict(algorithm=alg), root / name) for name, alg in ALGORITHMS.items()}


@pytest.fixture(scope="session")
def seg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run directory of the tiny segmentation federation (FedFew, K = 2)."""
    return _simulate(segmentation_dict(), tmp_path_factory.mktemp("eval_seg") / "fedfew")


@pytest.fixture(scope="session")
def seg_dp_dir(seg_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the segmentation run whose records carry a per-site ``privacy`` entry, as DP runs will."""
    out = tmp_path_factory.mktemp("eval_seg_dp") / "fedfew_dp"
    shutil.copytree(seg_dir, out)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for rec in records:
        rec["privacy"] = {s: {"epsilon": 0.25 * (rec["round"] + 1) * (i + 1), "delta": 1e-5}
                          for i, s in enumerate(sorted(rec["metrics"]))}
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


@pytest.fixture(scope="session")
def cls_runs(cls_dirs: dict[str, Path]) -> dict[str, ev.Run]:
    return {name: ev.load_run(d) for name, d in cls_dirs.items()}


@pytest.fixture(scope="session")
def seg_run(seg_dir: Path) -> ev.Run:
    return ev.load_run(seg_dir)
