"""benchmarks/headline.py: the README's headline table from result files (a hand-made results folder)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _row(mean: float, worst: float, selected: str) -> dict:
    return {"mean": mean, "mean_std_over_seeds": 0.01, "worst": worst, "selected": selected, "grid": {selected: {}, "other": {}}}


def test_headline_compares_fedfew_k3_with_the_best_baseline_of_full_runs_only(tmp_path: Path) -> None:
    full = {"description": "Data A", "metric": "accuracy", "seeds": [0, 1, 2],
            "methods": {"fedfew K=3": _row(0.80, 0.70, "mu=0.01"), "fedfew K=1": _row(0.99, 0.99, "mu=1"),
                        "fedavg": _row(0.85, 0.75, "lr=0.02"), "local": _row(0.60, 0.40, "lr=0.01"),
                        "ablation: fedfew K=3, mu=0.01, lr grid": _row(0.95, 0.9, "lr=0.02")}}
    (tmp_path / "quality_a.json").write_text(json.dumps(full))
    partial = {**full, "description": "Data B", "methods": {"fedfew K=3": _row(0.9, 0.8, "mu=1"), "fedavg": _row(0.5, 0.4, "lr=1")}}
    (tmp_path / "quality_b.json").write_text(json.dumps(partial))  # two methods: not a comparison, left out
    (tmp_path / "quality_c_quick.json").write_text(json.dumps({**full, "description": "Data C"}))  # smoke run: left out
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "headline.py"), "--results", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| Data")]
    # the best baseline is FedAvg (neither another FedFew K nor the ablation row), and FedFew does not win
    assert rows == ["| Data A | accuracy | 0.800 ± 0.010 / 0.700 (mu=0.01) | fedavg: 0.850 ± 0.010 / 0.750 (lr=0.02) | no | 3 | 10 |"]
    assert (tmp_path / "headline.md").read_text() == out
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- headline:begin (benchmarks/headline.py --readme) -->\nold\n<!-- headline:end -->\nrest\n")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "headline.py"), "--results", str(tmp_path), "--readme", str(readme)],
                   capture_output=True, text=True, check=True)
    text = readme.read_text()
    assert text.startswith("intro\n<!-- headline:begin") and text.endswith("<!-- headline:end -->\nrest\n")
    assert out in text and "\nold\n" not in text


def test_protocol_2_results_get_the_interval_table(tmp_path: Path) -> None:
    def runs(values: list[float]) -> list[dict]:
        return [{"seed": s, "per_site": {"x": v, "y": v - 0.1}, "worst": v - 0.1, "mean": v - 0.05} for s, v in enumerate(values)]

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality_report

    methods = {"fedfew K=3": {**_row(0.80, 0.70, "mu=0.1"), "per_seed": runs([0.85, 0.85, 0.85])},
               "fedfew_ft K=3": {**_row(0.82, 0.72, "finetune_epochs=5"), "per_seed": runs([0.87, 0.87, 0.87])},
               "fedfew reference K=3": {**_row(0.60, 0.40, "mu=0.01"), "per_seed": runs([0.6, 0.6, 0.6])},
               "fedavg": {**_row(0.81, 0.71, "lr=0.02"), "per_seed": runs([0.86, 0.86, 0.86])}}
    res = {"description": "Data P", "metric": "accuracy", "seeds": [0, 1, 2], "protocol": 2, "methods": methods,
           "comparison": quality_report.comparisons(methods)}
    (tmp_path / "quality_p.json").write_text(json.dumps(res))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "headline.py"), "--results", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("| Data P"))
    # fedfew_ft is the better FedFew row: +0.010 over FedAvg on every seed and site, so a point interval, a match;
    # the default is 0.010 below on every seed (no match) but within 1 point of FedAvg: each row gets its verdicts
    assert "fedavg: 0.810 ± 0.010 / 0.710" in row
    assert "fedfew_ft: +0.010 [+0.010, +0.010] / +0.010 [+0.010, +0.010] | no / yes | yes / yes | 3 | not checked |" in row


def test_per_site_table_sorts_sites_by_the_better_fedfew_rows_gap(tmp_path: Path) -> None:
    """benchmarks/per_site.py on a hand-made result: per-site means over seeds, gaps computed by hand."""
    def method(mean: float, per_seed_sites: list[dict[str, float]]) -> dict:
        return {"mean": mean, "per_seed": [{"per_site": s} for s in per_seed_sites]}

    methods = {"fedfew K=3": method(0.70, [{"a": 0.9, "b": 0.5}, {"a": 0.7, "b": 0.5}]),       # a 0.8, b 0.5
               "fedfew_ft K=3": method(0.75, [{"a": 0.9, "b": 0.6}, {"a": 0.9, "b": 0.6}]),    # a 0.9, b 0.6: the better row
               "ditto": method(0.80, [{"a": 0.85, "b": 0.75}, {"a": 0.85, "b": 0.75}]),
               "fedavg": method(0.60, [{"a": 0.6, "b": 0.6}, {"a": 0.6, "b": 0.6}])}
    res = {"description": "Data S", "metric": "accuracy", "seeds": [0, 1], "rounds": 5, "protocol": 2,
           "methods": methods, "comparison": {"best_baseline": "ditto"}}
    (tmp_path / "quality_s.json").write_text(json.dumps(res))
    (tmp_path / "quality_s_quick.json").write_text(json.dumps({**res, "description": "Smoke"}))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "per_site.py"), "--results", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert "Smoke" not in out and (tmp_path / "per_site.md").read_text() == out
    rows = [line for line in out.splitlines() if line.startswith("| a ") or line.startswith("| b ")]
    # b first (gap 0.6 - 0.75 = -0.15), then a (0.9 - 0.85 = +0.05); no local column (no such method)
    assert rows == ["| b | 0.500 | 0.600 | 0.750 | 0.600 | -0.150 |", "| a | 0.800 | 0.900 | 0.850 | 0.600 | +0.050 |"]
    assert "fedfew_ft is more than 0.02 below ditto on 1 of 2 sites (b; 100 % of its summed per-site shortfall) and more than 0.02 above on 1." in out
