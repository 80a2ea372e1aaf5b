"""Tiny runs made once per test session: classification (FedFew, FedAvg, Local), segmentation (FedFew),
and a DP run on PNG site files whose label map names the classes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedfew_med import evaluation as ev
from fedfew_med.config import federation_from_dict
from fedfew_med.simulation import run as simulate
from tests.conftest import tiny_dict
from tests.data import sitekit

POLICY = Path(__file__).resolve().parents[2] / "privacy" / "policy.toml"

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


@pytest.fixture(scope="session")
def collapsed_dir(cls_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the FedFew classification run whose summary says its K models collapsed into one."""
    out = tmp_path_factory.mktemp("eval_collapsed") / "fedfew"
    shutil.copytree(cls_dirs["fedfew"], out)
    summary = json.loads((out / "summary.json").read_text())
    summary["model_use"].update(collapsed=True, spread=0.001,
                                note="sites use 1 of 2 models, and the 2 models collapsed into one (relative spread 0.001)")
    (out / "summary.json").write_text(json.dumps(summary))
    return out


def png_sites(root: Path, n_sites: int = 3, n: int = 40) -> list[str]:
    """Site files of ``n_sites`` PNG sites (noise images) whose ``[labels].names`` are ``no_tumor`` and ``tumor``."""
    return [str(sitekit.png_site(root / f"site{i}", n=n + 4 * i, site={"name": f"site{i}", "task": "classification"}))
            for i in range(n_sites)]


@pytest.fixture(scope="session")
def png_dp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DP FedFew run (K = 2, ε = 8, 2 rounds) on PNG site files, started under ``privacy/policy.toml``."""
    root = tmp_path_factory.mktemp("eval_png_dp")
    config = tiny_dict(run={"rounds": 2}, data={"name": "sites", "params": {"files": png_sites(root / "data")}})
    config["privacy"] = {"epsilon": 8.0, "delta": 1e-5}
    run_dir = _simulate(config, root / "dp")
    shutil.copyfile(POLICY, run_dir / "policy.toml")  # as `simulate --policy` keeps it
    return run_dir


@pytest.fixture(scope="session")
def nifti_seg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FedAvg segmentation run (1 round, small 3-D U-Net) on two NIfTI sites of 1.5 x 1.5 x 2 mm voxels."""
    root = tmp_path_factory.mktemp("eval_nifti_seg")
    files = [str(sitekit.nifti_seg_site(root / f"site{i}", n=10, site={"name": f"site{i}", "task": "segmentation"}))
             for i in range(2)]
    config = segmentation_dict()
    config.update(run={"name": "nifti", "seed": 3, "rounds": 1}, algorithm={"name": "fedavg", "params": {}},
                  data={"name": "sites", "params": {"files": files}})
    return _simulate(config, root / "fedavg")
