"""benchmarks/quality.py protocol 2: equal configuration budgets, the paired bootstrap, the comparison row."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality_data  # noqa: E402
import quality_grid  # noqa: E402
import quality_report  # noqa: E402
import quality_runs  # noqa: E402
import quality_scores  # noqa: E402

from fedfew_med.config import load_federation  # noqa: E402


def _run(seed: int, per_site: dict[str, float]) -> dict:
    return {"seed": seed, "per_site": per_site, "worst": min(per_site.values()), "mean": float(np.mean(list(per_site.values())))}


def test_constant_difference_has_a_point_interval() -> None:
    a = [_run(s, {"x": 0.9, "y": 0.8}) for s in range(3)]
    b = [_run(s, {"x": 0.85, "y": 0.75}) for s in range(3)]
    got = quality_report.paired_bootstrap(a, b, draws=2000)
    assert got["mean"] == pytest.approx(0.05) and got["mean_ci"] == pytest.approx([0.05, 0.05])
    assert got["worst"] == pytest.approx(0.05) and got["worst_ci"] == pytest.approx([0.05, 0.05])


def test_site_resampling_by_hand() -> None:
    """One seed, two sites with differences 0 and 1: a draw's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4,
    so the 2.5 % and 97.5 % quantiles are 0 and 1, and about half the draws are 0.5."""
    got = quality_report.paired_bootstrap([_run(0, {"x": 1.0, "y": 1.0})], [_run(0, {"x": 1.0, "y": 0.0})], draws=20000)
    assert got["mean"] == 0.5 and got["mean_ci"] == [0.0, 1.0]


def test_pairs_are_matched_by_seed_not_by_order() -> None:
    a = [_run(s, {"x": 0.5 + 0.1 * s, "y": 0.4}) for s in range(3)]
    b = [_run(s, {"x": 0.5 + 0.1 * s, "y": 0.4}) for s in range(3)]
    got = quality_report.paired_bootstrap(a, list(reversed(b)))
    assert got["mean"] == 0.0 and got["mean_ci"] == [0.0, 0.0]  # unpaired (by order) it would not be 0


def test_every_method_gets_the_same_budget() -> None:
    config = load_federation(ROOT / "site_configs" / "demo_federation.toml")
    dataset = quality_data.Dataset("demo", config, [object()] * 6, "demo")  # type: ignore[list-item]
    grid = quality_grid.method_grid(dataset, quick=False)
    counts: dict[str, int] = {}
    for c in grid:
        counts[c.method] = counts.get(c.method, 0) + 1
    assert set(counts) == {"fedfew K=3", "fedfew_ft K=3", "fedfew reference K=3", "local", "fedavg", "fedprox", "ifca K=3",
                           "ditto", "fedavg_ft"}
    assert set(counts.values()) == {quality_grid.BUDGET}
    assert len({c.overrides for c in grid}) == len(grid)  # no configuration twice
    reference = [c for c in grid if c.method == "fedfew reference K=3"]
    assert all("preset = \"reference\"" in c.overrides[1] for c in reference)


def test_comparison_flags_a_match_only_when_both_intervals_reach_zero() -> None:
    fedfew = {"mean": 0.8, "per_seed": [_run(s, {"x": 0.8, "y": 0.7}) for s in range(3)]}
    better_mean_worse_worst = {"mean": 0.79, "per_seed": [_run(s, {"x": 0.88, "y": 0.7 + 0.001 * (s + 1)}) for s in range(3)]}
    comp = quality_report.comparisons({"fedfew K=3": fedfew, "ditto": better_mean_worse_worst, "fedavg": better_mean_worse_worst})
    assert comp["best_baseline"] in {"ditto", "fedavg"}
    assert comp["fedfew K=3"]["vs_best"]["worst_ci"][1] < 0 and not comp["fedfew K=3"]["matches"]
    assert comp["fedfew K=3"]["within_1pt_of_fedavg"]


class _Site:
    def __init__(self, name: str) -> None:
        self.name = name

    def size(self, split: str) -> int:
        return {"train": 10, "val": 2, "test": 3}[split]


def test_the_run_cache_key_follows_the_resolved_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """A preset whose values change must not reuse runs made under the old values; other methods keep their keys."""
    from fedfew_med.algorithms import fedfew

    config = load_federation(ROOT / "site_configs" / "demo_federation.toml")
    dataset = quality_data.Dataset("demo", config, [_Site("a"), _Site("b")], "demo")  # type: ignore[list-item]
    fedavg = dataset.with_overrides(["algorithm.name='fedavg'", "algorithm.params={}"])
    before = quality_runs.cache_key(dataset, config), quality_runs.cache_key(dataset, fedavg)
    assert quality_runs.cache_key(dataset, config) == before[0]  # stable
    monkeypatch.setitem(fedfew.PRESETS, "default", {**fedfew.PRESETS["default"], "site_weights": "uniform"})
    assert quality_runs.cache_key(dataset, config) != before[0]
    assert quality_runs.cache_key(dataset, fedavg) == before[1]


def test_the_run_cache_key_ignores_the_device_but_not_the_arithmetic() -> None:
    """Keys made before [training] device / precision / one_pass existed stay valid: the defaults add nothing,
    the device (where a run computed) is left out, and a precision or one pass that changes the numbers is in."""
    config = load_federation(ROOT / "site_configs" / "demo_federation.toml")
    dataset = quality_data.Dataset("demo", config, [_Site("a"), _Site("b")], "demo")  # type: ignore[list-item]
    key = quality_runs.cache_key(dataset, config)
    assert quality_runs.cache_key(dataset, dataset.with_overrides(["training.device='cpu'"])) == key
    assert quality_runs.cache_key(dataset, dataset.with_overrides(["training.precision='32'", "training.one_pass=false"])) == key
    assert quality_runs.cache_key(dataset, dataset.with_overrides(["training.precision='bf16'"])) != key
    assert quality_runs.cache_key(dataset, dataset.with_overrides(["training.one_pass=true"])) != key


def test_a_recorded_command_leaves_out_where_files_are() -> None:
    argv = ["--dataset", "segmentation", "--data-dir", "/work/x/data", "--cache-dir=/c", "--rounds", "20", "--out", "/o",
            "--rows", "reference + re-seeding"]
    assert quality_report.recorded_command("quality.py", argv) == \
        "`python benchmarks/quality.py --dataset segmentation --rounds 20 --rows 'reference + re-seeding'`"


def test_fedfew_ft_searches_fedfew_s_own_knob_with_one_fine_tune_epoch() -> None:
    """fedfew_ft's 4 configurations are the FedFew row's (μ × lr), each deployed after one fine-tune epoch; at the
    preset's own μ the overrides are the earlier grid's (epochs knob, μ implicit), so cached runs stay valid."""
    config = load_federation(ROOT / "site_configs" / "demo_federation.toml")
    dataset = quality_data.Dataset("demo", config, [object()] * 6, "demo")  # type: ignore[list-item]
    grid = quality_grid.method_grid(dataset, quick=False)
    ft = [c for c in grid if c.method == "fedfew_ft K=3"]
    fedfew = [c for c in grid if c.method == "fedfew K=3"]
    assert [c.setting for c in ft] == [c.setting for c in fedfew]  # mu=0.1, lr=0.05; mu=0.1, lr=0.1; mu=0.3, ...
    assert ft[0].overrides == ("algorithm.name='fedfew_ft'", "algorithm.params={k = 3, finetune_epochs = 1}", "training.lr=0.05")
    assert ft[2].overrides[1] == "algorithm.params={k = 3, finetune_epochs = 1, mu = 0.3}"
    resolved = [dataset.with_overrides(c.overrides) for c in ft]
    assert [quality_runs.algorithm_options(c)["mu"] for c in resolved] == [0.1, 0.1, 0.3, 0.3]


def _result(rows: dict[str, float], *, rounds: int = 40) -> dict:
    methods = {name: {"mean": v, "run_seconds": 10.0, "cached_runs": 0, "per_seed": [_run(s, {"x": v, "y": v - 0.1}) for s in range(3)]}
               for name, v in rows.items()}
    return {"rounds": rounds, "seeds": [0, 1, 2], "methods": methods, "machine": "m",
            "rounds_check": {"rounds": rounds, "gain": 0.001, "threshold": 0.01, "flat": True},
            "comparison": quality_report.comparisons(methods) if "fedavg" in methods else {}}


def test_merging_a_rerun_row_replaces_it_in_place_and_recomputes_the_comparison() -> None:
    res = _result({"fedfew K=3": 0.80, "fedfew_ft K=3": 0.70, "fedavg": 0.85, "ditto": 0.82})
    assert not res["comparison"]["fedfew_ft K=3"]["within_1pt_of_fedavg"]
    new = _result({"fedfew_ft K=3": 0.90})["methods"]
    new["fedfew_ft K=3"]["cached_runs"] = 3
    got = quality_report.merge_rows(res, new, rounds=40, seeds=[0, 1, 2], where="f.json", update={"command": "c", "machine": "n"})
    assert list(got["methods"]) == ["fedfew K=3", "fedfew_ft K=3", "fedavg", "ditto"]  # the replaced row keeps its place
    assert got["methods"]["fedfew_ft K=3"]["mean"] == 0.90 and got["methods"]["fedavg"] is res["methods"]["fedavg"]
    assert got["comparison"]["fedfew_ft K=3"]["within_1pt_of_fedavg"]
    assert got["comparison"]["fedfew_ft K=3"]["vs_best"]["mean"] == pytest.approx(0.90 - 0.85)
    assert got["run_seconds_total"] == 40.0 and got["cached_runs"] == 3
    assert got["rounds_check"] is res["rounds_check"] and got["machine"] == "m"
    assert got["updates"] == [{"command": "c", "machine": "n", "methods": ["fedfew_ft K=3"]}]
    assert "Rerun later and merged into this grid: fedfew_ft K=3 (c; n)." in quality_report.to_markdown(
        {**got, "description": "d", "command": "c0", "metric": "accuracy", "wall_seconds": 1.0,
         "methods": {n: {**r, "selected": "s", "mean_std_over_seeds": 0.0, "worst": 0.0, "jain": 1.0, "bytes_per_round": 0,
                         "seconds_per_run": 1.0, "grid": {}} for n, r in got["methods"].items()}})
    assert "updates" not in res  # the input is left as it was


@pytest.mark.parametrize(("rounds", "seeds"), [(80, [0, 1, 2]), (40, [0, 1])])
def test_merging_rows_of_other_rounds_or_seeds_is_refused(rounds: int, seeds: list[int]) -> None:
    res = _result({"fedfew K=3": 0.80, "fedavg": 0.85})
    with pytest.raises(SystemExit, match=r"f\.json: its grid ran at 40 rounds on seeds \[0, 1, 2\]"):
        quality_report.merge_rows(res, {}, rounds=rounds, seeds=seeds, where="f.json", update={})


def test_skipped_site_replies_are_counted_from_the_rounds_failures_and_shown() -> None:
    records = [{"round": 0, "failures": {}}, {"round": 1, "failures": {"a": "ValueError: update norm", "b": "x"}},
               {"round": 2}, {"round": 3, "failures": {"a": "ValueError"}}]
    assert quality_scores.diagnostics(records, {})["skipped"] == 3
    runs = [{"diagnostics": {"skipped": 3}}, {"diagnostics": {"skipped": 0}}]
    assert quality_scores.skipped_replies(runs) == 3
    assert quality_scores.skipped_replies([*runs, {"diagnostics": {"in_use": 3}}]) is None  # a run cached before the count
    row = {"selected": "s", "mean": 0.8, "mean_std_over_seeds": 0.0, "worst": 0.7, "jain": 1.0, "bytes_per_round": 0,
           "seconds_per_run": 1.0, "grid": {"lr=0.1": {"test_mean": 0.8, "val_mean": 0.8, "worst": 0.7, "skipped": 4},
                                           "lr=0.05": {"test_mean": 0.8, "val_mean": 0.7, "worst": 0.7, "skipped": 0},
                                           "lr=0.2": {"test_mean": 0.8, "val_mean": 0.7, "worst": 0.7}}}
    md = quality_report.to_markdown({"description": "d", "command": "c", "seeds": [0], "rounds": 2, "metric": "accuracy", "machine": "m",
                              "wall_seconds": 1.0, "methods": {"fedavg": row}})
    assert "lr=0.1 0.800 / 0.800 / 0.700 (4 site replies skipped); lr=0.05 0.800 / 0.700 / 0.700; lr=0.2 0.800" in md


def test_a_grid_s_pace_counts_made_runs_only_and_estimates_the_rest_from_their_mean_time() -> None:
    pace = quality_runs.Pace(4, lanes=2)
    assert pace.step({"cached": True, "seconds": 50.0}) is None  # a cached run is neither counted nor timed
    assert pace.step({"seconds": 1200.0}) == "1/4 runs made, about 30 min left at this pace"  # 1200 s × 3 left ÷ 2 lanes
    assert pace.step({"seconds": 1200.0}) == "2/4 runs made, about 20 min left at this pace"
    assert pace.step({"seconds": 7800.0}) == "3/4 runs made, about 28 min left at this pace"  # mean 3400 s × 1 ÷ 2 = 1700 s
    assert pace.step({"seconds": 1.0}) == "4/4 runs made"


@pytest.mark.parametrize(("seconds", "text"), [(0, "0 s"), (59.4, "59 s"), (60, "1 min"), (3569, "59 min"), (3600, "1 h 00 min"),
                                               (29_000, "8 h 03 min")])
def test_durations_read_as_seconds_minutes_or_hours(seconds: float, text: str) -> None:
    assert quality_runs.duration(seconds) == text


def test_without_a_baseline_row_there_is_nothing_to_compare() -> None:
    fedfew = {"mean": 0.8, "per_seed": [_run(s, {"x": 0.8, "y": 0.7}) for s in range(3)]}
    assert quality_report.comparisons({"fedfew K=3": fedfew, "fedfew_ft K=3": fedfew}) == {}  # --methods fedfew fedfew_ft


def test_deployment_twins_pair_each_fine_tuning_row_with_the_run_that_trains_as_it_does() -> None:
    config = load_federation(ROOT / "site_configs" / "demo_federation.toml")
    grid = quality_grid.method_grid(quality_data.Dataset("demo", config, [object()] * 6, "demo"), quick=False)  # type: ignore[list-item]
    twins = quality_grid.deployment_twins(grid)
    lr = config.training.lr
    got = {(b.method, b.setting): sorted(t.setting for t in ts) for b, ts in twins.items()}
    assert got == {
        **{("fedfew K=3", f"mu={m}, lr={lr * s:g}"): [f"mu={m}, lr={lr * s:g}"] for m in (0.1, 0.3) for s in (1, 2)},
        **{("fedavg", f"lr={lr * s:g}"): [f"finetune_epochs={e}, lr={lr * s:g}" for e in (1, 5)] for s in (1, 2)},
    }
    assert all(t.method == {"fedfew K=3": "fedfew_ft K=3", "fedavg": "fedavg_ft"}[b.method] for b, ts in twins.items() for t in ts)


TWIN_CASES = {
    "fedfew_ft from FedFew": ("fedfew K=3", "fedfew", {"k": 2, "mu": 0.1}, "fedfew_ft K=3", "fedfew_ft", [{"finetune_epochs": 1}]),
    "FedAvg + FT from FedAvg": ("fedavg", "fedavg", {}, "fedavg_ft", "fedavg_ft", [{"finetune_epochs": 1}, {"finetune_epochs": 2}]),
}


@pytest.mark.parametrize("case", list(TWIN_CASES))
def test_a_twin_made_from_another_row_s_training_equals_its_own_run(tmp_path: Path, case: str) -> None:
    """One training for several rows: a twin's result, made from the base run's final checkpoint, is the one its own run gives."""
    from fedfew_med.config import federation_from_dict
    from fedfew_med.data import build_sites

    from .conftest import tiny_dict

    base_row, base_name, params, twin_row, twin_name, extras = TWIN_CASES[case]
    config = federation_from_dict(tiny_dict(run={"rounds": 3}, data={"params": {"num_sites": 3, "image_size": 16, "train_min": 40,
                                                                                "train_max": 48, "test_per_site": 12, "seed": 2}}))
    dataset = quality_data.Dataset("tiny", config, build_sites(config.data), "tiny")
    base_cfg = quality_grid.Config(base_row, "lr=0.05", (*quality_grid.algorithm_overrides(base_name, **params), "training.lr=0.05"))
    twin_cfgs = [quality_grid.Config(twin_row, "lr=0.05" if twin_name == "fedfew_ft" else f"{extra}, lr=0.05",  # as the grids label them
                                     (*quality_grid.algorithm_overrides(twin_name, **{**params, **extra}), "training.lr=0.05"))
                 for extra in extras]
    assert quality_grid.deployment_twins([base_cfg, *twin_cfgs]) == {base_cfg: twin_cfgs}
    rows = quality_runs.run_grid(dataset, [base_cfg, *twin_cfgs], [0], lambda line: None, tmp_path / "shared")
    (base,) = rows[base_row]["per_seed"]
    assert rows[twin_row]["shared_training_runs"] == len(twin_cfgs)
    own = list(quality_runs.run_many(dataset, [(c, 0) for c in twin_cfgs], tmp_path / "alone"))
    derived = list(quality_runs.run_many(dataset, [(c, 0) for c in twin_cfgs], tmp_path / "shared"))  # from the cache
    drop = ("seconds", "cached", "training_of")
    key = quality_runs.cache_key(dataset, quality_runs.run_config(dataset, base_cfg, 0))
    for d, o in zip(derived, own, strict=True):
        assert d["cached"] and d["training_of"] == key and "training_of" not in o and not o.get("cached")
        assert {k: v for k, v in d.items() if k not in drop} == {k: v for k, v in o.items() if k not in drop}
        assert d["per_site"] != base["per_site"] or d["val_per_site"] != base["val_per_site"]  # fine-tuning did deploy
    if len(twin_cfgs) == 1:  # one twin configuration: it is the row, whose run time counts the training once
        assert rows[twin_row]["run_seconds"] == pytest.approx(rows[twin_row]["per_seed"][0]["seconds"] - base["seconds"])
    md = quality_report.to_markdown({"description": "d", "command": "c", "seeds": [0], "rounds": 3, "metric": "accuracy", "machine": "m",
                                     "wall_seconds": 1.0, "methods": rows})
    assert f"Made from another row's training: {twin_row} ({len(twin_cfgs)} run" in md


def test_a_twin_that_cannot_be_made_from_the_training_runs_on_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A failed redeployment must not end an hours-long grid: it is logged and the twin trains itself."""
    from fedfew_med.config import federation_from_dict
    from fedfew_med.data import build_sites

    from .conftest import tiny_dict

    def broken(*args: object, **kwargs: object) -> dict:
        raise RuntimeError("checkpoint unreadable")

    monkeypatch.setattr(quality_runs, "redeploy", broken)
    config = federation_from_dict(tiny_dict(run={"rounds": 2}))
    dataset = quality_data.Dataset("tiny", config, build_sites(config.data), "tiny")
    base = quality_grid.Config("fedavg", "lr=0.05", (*quality_grid.algorithm_overrides("fedavg"), "training.lr=0.05"))
    twin = quality_grid.Config("fedavg_ft", "finetune_epochs=1, lr=0.05",
                               (*quality_grid.algorithm_overrides("fedavg_ft", finetune_epochs=1), "training.lr=0.05"))
    rows = quality_runs.run_grid(dataset, [base, twin], [0], lambda line: None, tmp_path / "c")
    (made,) = rows["fedavg_ft"]["per_seed"]
    assert "training_of" not in made and not made.get("cached") and rows["fedavg_ft"]["shared_training_runs"] == 0
    assert "fedavg_ft finetune_epochs=1, lr=0.05 seed 0: not made from fedavg's training (RuntimeError: checkpoint unreadable)" in caplog.text


def test_a_run_stopped_mid_way_resumes_at_its_last_round_with_the_uninterrupted_result(tmp_path: Path) -> None:
    from fedfew_med.config import federation_from_dict
    from fedfew_med.data import build_sites
    from fedfew_med.simulation import run

    from .conftest import tiny_dict

    config = federation_from_dict(tiny_dict(run={"rounds": 4}))
    dataset = quality_data.Dataset("tiny", config, build_sites(config.data), "tiny")
    cfg = quality_grid.Config("fedfew K=3", "mu=0.1", quality_grid.algorithm_overrides("fedfew", k=2, mu=0.1))
    whole, = quality_runs.run_many(dataset, [(cfg, 0)], tmp_path / "whole")
    cache = tmp_path / "stopped"
    key = quality_runs.cache_key(dataset, quality_runs.run_config(dataset, cfg, 0))
    run(quality_runs.run_config(dataset, cfg, 0), run_dir=cache / quality_runs.IN_PROGRESS / key, sites=dataset.sites,
        stop_after=2)  # what a grid killed after round 1 leaves
    resumed, = quality_runs.run_many(dataset, [(cfg, 0)], cache)
    assert resumed["resumed_after_round"] == 1 and "resumed_after_round" not in whole
    drop = ("seconds", "resumed_after_round")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in whole.items() if k not in drop}
    assert not (cache / quality_runs.IN_PROGRESS / key).exists() and (cache / f"{key}.json").is_file()  # folder gone, result kept
    assert not list((cache / quality_runs.IN_PROGRESS).glob(".*.lock"))
