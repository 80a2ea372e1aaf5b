"""Smoke tests: every benchmark script's quick mode runs end to end on a tiny configuration.

Each script runs in a subprocess (as a user would run it) and must write its JSON, Markdown and
PNG. Marked slow (``make test-slow``); together they take about two to three minutes on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.datasets.test_fashion_mnist import write_idx

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_script(name: str, *args: str, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_quality_quick_on_demo(tmp_path: Path) -> None:
    args = ("--dataset", "demo", "--quick", "--ks", "3", "--rounds", "1", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache"))
    run_script("quality.py", *args)
    res = json.loads((tmp_path / "quality_demo_quick.json").read_text())
    assert res["cached_runs"] == 0  # a fresh cache: every run was made (fedfew_ft's from FedFew's training)
    assert res["methods"]["fedfew_ft K=3"]["shared_training_runs"] == 1
    run_script("quality.py", *args)  # again: every run comes from the cache, with the same figures
    again = json.loads((tmp_path / "quality_demo_quick.json").read_text())
    assert again["cached_runs"] == sum(len(row["per_seed"]) * len(row["grid"]) for row in res["methods"].values())
    assert {m: r["mean"] for m, r in again["methods"].items()} == {m: r["mean"] for m, r in res["methods"].items()}
    side_by_side = tmp_path / "jobs2"  # a fresh cache, two runs at a time: every run made again, the same figures
    run_script("quality.py", *args[:-4], "--out", str(side_by_side), "--cache-dir", str(side_by_side / "cache"), "--jobs", "2")
    two = json.loads((side_by_side / "quality_demo_quick.json").read_text())
    assert two["cached_runs"] == 0
    assert {m: (r["mean"], r["worst"], r["val_mean"]) for m, r in two["methods"].items()} == \
        {m: (r["mean"], r["worst"], r["val_mean"]) for m, r in res["methods"].items()}
    assert set(res["methods"]) == {"fedfew K=3", "fedfew_ft K=3", "fedfew reference K=3", "local", "fedavg", "fedprox", "ifca K=3",
                                   "ditto", "fedavg_ft"}
    assert res["protocol"] == 2 and set(res["comparison"]) == {"best_baseline", "fedfew K=3", "fedfew_ft K=3"}
    for row in res["methods"].values():
        assert 0.0 <= row["mean"] <= 1.0 and row["worst"] <= row["mean"] and row["selected"] in row["grid"]
    assert res["methods"]["fedfew K=3"]["bytes_per_round"] > res["methods"]["fedavg"]["bytes_per_round"]
    assert (tmp_path / "quality_demo_quick.md").read_text().startswith("# Quality")
    assert (tmp_path / "quality_demo_quick.png").stat().st_size > 0


def test_quality_rounds_check_alone_settles_the_rounds_before_a_grid(tmp_path: Path) -> None:
    args = ("--dataset", "demo", "--quick", "--seeds", "0", "--rounds", "1", "--rounds-check", "--out", str(tmp_path),
            "--cache-dir", str(tmp_path / "cache"))
    first = run_script("quality.py", *args)
    line = next(x for x in first.splitlines() if x.startswith("rounds check:"))
    assert "FedAvg validation mean" in line and " at 1 rounds, " in line and " at 2: " in line
    assert not list(tmp_path.glob("quality_*"))  # nothing written but the cached runs
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 2  # FedAvg at R and 2R, one seed
    again = run_script("quality.py", *args)  # from the cache, the same figures
    assert next(x for x in again.splitlines() if x.startswith("rounds check:")) == line


def test_quality_quick_on_tiny_fashion_mnist(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 300), ("t10k", 100)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", rng.integers(0, 256, size=(n, 28, 28)), compress=False)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, compress=False)
    out = tmp_path / "out"
    run_script("quality.py", "--dataset", "fmnist-path2", "--quick", "--ks", "3", "--rounds", "1", "--fmnist-root", str(tmp_path),
               "--methods", "fedfew", "fedavg", "--out", str(out), "--no-cache")
    res = json.loads((out / "quality_fmnist-path2_quick.json").read_text())
    assert set(res["methods"]) == {"fedfew K=3", "fedavg"} and len(res["partition"]) == 20


def test_ablation_quick_on_demo(tmp_path: Path) -> None:
    args = ("--dataset", "demo", "--quick", "--rows", "reference", "default", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "c"))
    run_script("ablation.py", *args)
    res = json.loads((tmp_path / "ablation_demo_quick.json").read_text())
    assert list(res["rows"]) == ["reference", "default"]
    for row in res["rows"].values():
        assert len(row["per_seed"]) == 1 and 0 <= row["mean"] <= 1 and 1 <= row["in_use"] <= 3
    assert res["rows"]["reference"]["overrides"] != res["rows"]["default"]["overrides"]
    assert "| default |" in (tmp_path / "ablation_demo_quick.md").read_text()


def test_sparse_quick(tmp_path: Path) -> None:
    run_script("sparse.py", "--dataset", "demo", "--quick", "--rounds", "1", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "c"))
    res = json.loads((tmp_path / "sparse_demo_quick.json").read_text())
    rows = res["methods"]
    assert rows["fedfew top-1"]["bytes_per_round"] < rows["fedfew full"]["bytes_per_round"]
    assert (tmp_path / "sparse_demo_quick.png").stat().st_size > 0


def test_speed_quick(tmp_path: Path) -> None:
    run_script("speed.py", "--quick", "--sizes", "10", "20", "--out", str(tmp_path))
    res = json.loads((tmp_path / "speed_quick.json").read_text())
    assert res["overhead"]["ratio"] > 0 and 0 <= res["data_loading"]["share"] <= 1
    assert [r["sites"] for r in res["scaling"]] == [10, 20]
    assert res["k_models"]["ratio"] > 0 and res["k_models"]["one_pass_speedup"] > 0
    assert res["workers"]["speedup"] > 0 and res["cli"]["help_s"] > 0
    assert "FedFew K = 3 round / FedAvg round" in (tmp_path / "speed_quick.md").read_text()


def test_choose_loso_quick_on_demo(tmp_path: Path) -> None:
    args = ("--dataset", "demo", "--quick", "--threads", "1", "--out", str(tmp_path), "--work-dir", str(tmp_path / "w"))
    out = run_script("choose_loso.py", *args)
    res = json.loads((tmp_path / "choose_loso_demo_quick.json").read_text())
    assert [r["site"] for r in res["rows"]] == [f"site0{i}-{p}" for i, p in enumerate(["bright", "dark", "noisy"] * 2)]
    for r in res["rows"]:
        assert r["chosen"] == min(range(3), key=lambda k: r["losses"][k])  # the lowest loss on its own records
        assert r["regret"] == r["best_test"] - r["chosen_test"] >= 0 and r["best_test"] == max(r["test"])
    assert res["command"] == "`python benchmarks/choose_loso.py --dataset demo --quick --threads 1`"
    assert "Picked the best of the K" in out and (tmp_path / "choose_loso_demo_quick.md").is_file()


def test_one_pass_bound_quick(tmp_path: Path) -> None:
    out = run_script("one_pass_bound.py", "--quick", "--out", str(tmp_path))
    res = json.loads((tmp_path / "one_pass_bound_quick.json").read_text())
    assert res["max_output_difference"] < 1e-5  # the hand-written layouts do the copies' own arithmetic
    assert set(res["ratio_to_fedavg"]) == {"fedavg", "sequential", "vmap", "grouped", "grouped + fused"}
    assert res["ratio_to_fedavg"]["fedavg"] == 1.0 and all(v > 0 for v in res["step_ms"].values())
    assert "| vmap |" in out and (tmp_path / "one_pass_bound_quick.md").is_file()
