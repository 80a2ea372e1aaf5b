"""load_run / site_report / compare on tiny runs: the same deployment and metrics as the run itself."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from fedfew_med import evaluation as ev
from fedfew_med.metrics import classification_metrics, prediction_checks


def _summary(run: ev.Run) -> dict:
    return json.loads((run.run_dir / "summary.json").read_text())


def test_load_run_reads_the_run_directory(cls_runs, cls_dirs):
    run = cls_runs["fedfew"]
    records = [json.loads(line) for line in (cls_dirs["fedfew"] / "metrics.jsonl").read_text().splitlines()]
    assert run.records == records and run.round == records[-1]["round"] == 3
    assert run.summary == _summary(run)
    assert run.sites == sorted(records[-1]["assignments"]) and run.num_models == 2 and len(run.server_models) == 2
    assert run.label == "fedfew (K=2)" and run.task == "classification" and run.metric == "accuracy"
    assert cls_runs["local"].label == "local" and cls_runs["local"].num_models == 0
    assert "site_report" not in repr(run) and "fedfew (K=2)" in repr(run)


@pytest.mark.parametrize("method", ["fedfew", "fedavg", "local"])
def test_site_report_reproduces_the_runs_own_evaluation(cls_runs, method):
    run = cls_runs[method]
    summary = _summary(run)
    for site in run.sites:
        rep = run.site_report(site, n_resamples=200)
        recorded = summary["per_site"][site]
        assert rep.deployed.model_index == recorded["model"]
        for name, value in recorded["metrics"].items():  # the metrics, and the checks behind the warnings
            got = rep.metrics[name].value if name in rep.metrics else rep.checks[name]
            assert got == pytest.approx(value, abs=1e-12, nan_ok=True), (site, name)
        assert list(rep.flags) == recorded["flags"]
        assert rep.probs.shape == (20, 2) and rep.targets.shape == (20,) and rep.images.shape == (20, 1, 16, 16)
        assert classification_metrics(rep.probs, rep.targets)["accuracy"] == rep.metrics["accuracy"].value
        assert rep.checks == prediction_checks(rep.probs, rep.targets)
        assert rep.labels == ["class 0", "class 1"]  # the synthetic federation names no classes


def test_deployment_explains_the_choice(cls_runs):
    fedfew = cls_runs["fedfew"].site_report(cls_runs["fedfew"].sites[0], n_resamples=200).deployed
    assert len(fedfew.scores) == 2 and fedfew.selection_split == "train"
    assert fedfew.model_index == int(np.argmin(fedfew.scores)) and f"server model {fedfew.model_index}" in fedfew.reason
    assert fedfew.table().column("") == ["deployed" if k == fedfew.model_index else "" for k in range(2)]
    fedavg = cls_runs["fedavg"].site_report(cls_runs["fedavg"].sites[0], n_resamples=200).deployed
    assert fedavg.scores == () and "single shared model" in fedavg.reason
    local = cls_runs["local"].site_report(cls_runs["local"].sites[0], n_resamples=200).deployed
    assert local.model_index is None and local.slot == "local" and "only on this site's data" in local.reason


def test_confidence_intervals_contain_the_estimate_and_are_reproducible(cls_runs):
    run = cls_runs["fedfew"]
    site = run.sites[1]
    rep = run.site_report(site, n_resamples=200, seed=4)
    for name, est in rep.metrics.items():
        if not math.isnan(est.low):
            assert est.low <= est.value <= est.high, name
            assert est.level == 0.95 and est.n_resamples == 200 and 0 < est.n_valid <= 200
    again = run.site_report(site, n_resamples=200, seed=4)
    assert again is rep  # kept on the run
    fresh = ev.load_run(run.run_dir).site_report(site, n_resamples=200, seed=4)
    assert fresh.metrics == rep.metrics
    # the interval is the percentile bootstrap of the documented resampling
    idx = np.random.default_rng(4).integers(0, 20, size=(200, 20))
    acc = [(rep.predictions[i] == rep.targets[i]).mean() for i in idx]
    assert (rep.metrics["accuracy"].low, rep.metrics["accuracy"].high) == pytest.approx(tuple(np.percentile(acc, [2.5, 97.5])))


def test_ppv_npv_and_the_operating_point_by_hand(cls_runs):
    rep = cls_runs["fedfew"].site_report(cls_runs["fedfew"].sites[0], n_resamples=200)
    called, positive = rep.predictions == 1, rep.targets == 1
    tp, fp = int((called & positive).sum()), int((called & ~positive).sum())
    tn, fn = int((~called & ~positive).sum()), int((~called & positive).sum())
    assert rep.metrics["ppv"].value == pytest.approx(tp / (tp + fp) if tp + fp else math.nan, nan_ok=True)
    assert rep.metrics["npv"].value == pytest.approx(tn / (tn + fn) if tn + fn else math.nan, nan_ok=True)
    fpr, tpr = rep.operating_point()
    assert (fpr, tpr) == pytest.approx((1 - rep.metrics["specificity"].value, rep.metrics["sensitivity"].value))
    assert tpr == pytest.approx(tp / (tp + fn)) and fpr == pytest.approx(fp / (fp + tn))
    assert "p(class 1) > 0.5" in rep.operating_point_text() and "PPV" in rep.operating_point_text()
    band = rep.roc_band()
    assert band.n_resamples == 200 and band.fpr[0] == 0 and band.fpr[-1] == 1
    again = ev.roc_band(rep.probs[:, 1], rep.targets == 1, n_resamples=200, seed=rep.seed)
    assert np.array_equal(band.low, again.low, equal_nan=True)  # the report's own resamples
    names = [str(r[0]) for r in rep.metrics_table().rows]
    assert names[-2:] == ["PPV (positive predictive value)", "NPV (negative predictive value)"]


def test_label_names_come_from_the_site_files(png_dp_dir):
    run = ev.load_run(png_dp_dir)
    assert run.class_names() == ("no_tumor", "tumor")  # sitekit's [labels].names
    rep = run.site_report(run.resolve_site(""), n_resamples=50)
    assert rep.site == "site0" and rep.labels == ["no_tumor", "tumor"]
    assert "p(tumor) > 0.5" in rep.operating_point_text()
    assert any("'tumor' as positive" in note for note in rep.metrics_table().notes)
    summary = json.loads((png_dp_dir / "summary.json").read_text())
    for site in run.sites:
        flags = run.site_report(site, n_resamples=50).flags
        assert list(flags) == summary["per_site"][site]["flags"]


def test_the_default_site_is_the_runs_first_and_unknown_sites_are_named(cls_runs):
    run = cls_runs["fedfew"]
    assert run.resolve_site("") == run.resolve_site(None) == run.sites[0]
    assert run.resolve_site(run.sites[2]) == run.sites[2]
    with pytest.raises(ev.UnknownSiteError, match=r"has no site 'site07-noisy'; its sites are site00-bright, site01-dark, site02-noisy \(an empty"):
        run.resolve_site("site07-noisy")


def test_classification_curves(cls_runs):
    rep = cls_runs["fedfew"].site_report(cls_runs["fedfew"].sites[0], n_resamples=200)
    (fpr, tpr), = rep.roc_curves().values()
    assert fpr[0] == 0 and tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)
    cm = rep.confusion()
    assert cm.sum() == 20 and np.trace(cm) / 20 == pytest.approx(rep.metrics["accuracy"].value)
    prob_true, prob_pred = rep.calibration(5)
    assert len(prob_true) == len(prob_pred) and np.all((prob_pred >= 0) & (prob_pred <= 1))
    ex = rep.example_indices(6)
    assert len(ex) == min(6, 20) and len(set(ex.tolist())) == len(ex)
    wrong = rep.predictions[ex] != rep.targets[ex]
    assert not np.any(np.diff(wrong.astype(int)) > 0)  # errors first
    assert "accuracy" in str(rep.metrics_table()) and "<table>" in rep.metrics_table()._repr_html_()
    with pytest.raises(ValueError, match="segmentation task"):
        rep.case_table()


def test_segmentation_report(seg_run):
    summary = _summary(seg_run)
    site = seg_run.sites[0]
    rep = seg_run.site_report(site, n_resamples=200)
    assert rep.is_segmentation and rep.primary == "dice"
    assert rep.deployed.model_index == summary["per_site"][site]["model"]
    assert rep.metrics["dice"].value == pytest.approx(summary["per_site"][site]["metrics"]["dice"], abs=1e-12)
    assert rep.metrics["hd95"].value == pytest.approx(summary["per_site"][site]["metrics"]["hd95"], abs=1e-9, nan_ok=True)
    assert rep.probs.shape == (20, 2, 16, 16) and rep.targets.shape == (20, 16, 16) and rep.images.shape == (20, 1, 16, 16)
    assert rep.per_case["dice"].shape == (20,) and rep.per_case["dice"].mean() == pytest.approx(rep.metrics["dice"].value)
    assert "hd95_mm" not in rep.metrics and rep.hd95_key == "hd95" and rep.hd95_unit == "px"  # synthetic: no mm
    assert "pixels" in rep.hd95_note and "HD95 (pixels)" in str(rep.metrics_table())
    est = rep.metrics["dice"]
    assert est.low <= est.value <= est.high
    worst = rep.worst_cases(3)
    assert rep.targets[worst].reshape(len(worst), -1).any(axis=1).all()
    assert list(rep.per_case["dice"][worst]) == sorted(rep.per_case["dice"][worst])
    assert rep.case_table(worst).column("case") == worst.tolist()
    with pytest.raises(ValueError, match="classification task"):
        rep.roc_curves()


def test_compare_lists_every_run_with_the_same_resamples(cls_runs):
    site = cls_runs["fedfew"].sites[2]
    table = ev.compare({"FedFew": cls_runs["fedfew"], "FedAvg": cls_runs["fedavg"], "Local": cls_runs["local"]}, site, n_resamples=200)
    assert table.column("run") == ["FedFew", "FedAvg", "Local"]
    assert table.column("deployed model")[2] == "own" and table.column("deployed model")[1] == "0"
    for label, method in (("FedFew", "fedfew"), ("FedAvg", "fedavg"), ("Local", "local")):
        row = table.records()[table.column("run").index(label)]
        assert row["accuracy"] == cls_runs[method].site_report(site, n_resamples=200).metrics["accuracy"]
    assert site in str(table)


def test_compare_refuses_runs_on_different_data(cls_runs, seg_run):
    with pytest.raises(ValueError, match="different data"):
        ev.compare({"a": cls_runs["fedfew"], "b": seg_run}, seg_run.sites[0])


def test_load_runs_skips_missing_directories(cls_dirs, tmp_path):
    runs = ev.load_runs({"FedAvg": cls_dirs["fedavg"], "missing": tmp_path / "nope"})
    assert list(runs) == ["FedAvg"]
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        ev.load_runs({"missing": tmp_path / "nope"}, skip_missing=False)


def test_baseline_runs_keep_only_runs_on_the_same_data(cls_runs, cls_dirs, seg_run, tmp_path):
    kept, skipped = ev.baseline_runs(seg_run, {"FedAvg": cls_dirs["fedavg"], "missing": tmp_path / "nope"})
    assert kept == {}
    assert skipped == {
        "FedAvg": f"{cls_dirs['fedavg']} trained on other data ({', '.join(cls_runs['fedavg'].sites)}) than this run "
                  f"({', '.join(seg_run.sites)}): its test cases are not this run's",
        "missing": f"no run at {tmp_path / 'nope'} (no config.json)",
    }
    kept, skipped = ev.baseline_runs(cls_runs["fedfew"], {"FedAvg": cls_dirs["fedavg"], "Local": cls_dirs["local"]})
    assert list(kept) == ["FedAvg", "Local"] and skipped == {}
    ev.compare({"this run": cls_runs["fedfew"], **kept}, cls_runs["fedfew"].sites[0])  # comparable: no error


def test_errors_name_the_problem(cls_runs, cls_dirs, tmp_path):
    with pytest.raises(ev.UnknownSiteError, match="no site 'site99'; its sites are site00"):
        cls_runs["fedfew"].site_report("site99")
    with pytest.raises(ev.UnknownSiteError, match="no site ''"):
        cls_runs["fedfew"].site_report("")
    broken = tmp_path / "no_ckpt"
    broken.mkdir()
    shutil.copy(cls_dirs["fedfew"] / "config.json", broken / "config.json")
    with pytest.raises(FileNotFoundError, match="no completed round"):
        ev.load_run(broken)
    other = tmp_path / "other_config"
    shutil.copytree(cls_dirs["fedfew"], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["run"]["seed"] += 1
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="different config"):
        ev.load_run(other)


def test_an_interrupted_run_is_evaluated_at_its_checkpoint(cls_dirs, tmp_path):
    from fedfew_med.config import federation_from_dict
    from fedfew_med.simulation import run as simulate

    config = federation_from_dict(json.loads((cls_dirs["fedfew"] / "config.json").read_text()))
    simulate(config, run_dir=tmp_path / "r", stop_after=2)
    with (tmp_path / "r" / "metrics.jsonl").open("a") as fh:
        fh.write('{"round": 2, "torn')  # killed while writing round 2
    run = ev.load_run(tmp_path / "r")
    assert run.round == 1 and [r["round"] for r in run.records] == [0, 1]
    summary = _summary(run)
    site = run.sites[0]
    assert run.site_report(site, n_resamples=50).metrics["accuracy"].value == summary["per_site"][site]["metric"]


def test_hd95_in_mm_on_nifti_sites(nifti_seg_dir):
    import torch

    from fedfew_med.evaluation.stats import per_case_segmentation

    run = ev.load_run(nifti_seg_dir)
    summary = _summary(run)
    rep = run.site_report(run.sites[0], n_resamples=50)
    assert rep.hd95_key == "hd95_mm" and rep.hd95_unit == "mm" and "1.88 x 1.88 x 3 mm" in rep.hd95_note
    # (10, 10, 6) voxels of 1.5 x 1.5 x 2 mm resized to (8, 8, 4): 1.875 x 1.875 x 3 mm, by hand
    spacing = np.tile([10 * 1.5 / 8, 10 * 1.5 / 8, 6 * 2.0 / 4], (len(rep.targets), 1))
    pred = torch.from_numpy(rep.predictions[:, None])
    want = per_case_segmentation(pred, torch.from_numpy(rep.targets[:, None]), 2, spacing=spacing)
    assert np.isfinite(want["hd95_mm"]).any(), "the tiny run should predict some foreground"
    np.testing.assert_allclose(rep.per_case["hd95_mm"], want["hd95_mm"], equal_nan=True)
    assert rep.metrics["hd95"].value == pytest.approx(summary["per_site"][rep.site]["metrics"]["hd95"], nan_ok=True)
    finite = np.isfinite(want["hd95_mm"])
    assert rep.metrics["hd95_mm"].value == pytest.approx(want["hd95_mm"][finite].mean() if finite.any() else math.nan, nan_ok=True)
    assert "HD95 (mm)" in str(rep.metrics_table()) and "hd95 (mm)" in rep.case_table().columns
