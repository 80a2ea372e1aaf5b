"""Federation-level views, checked against the records and an independent Jain's index."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedfew_med import evaluation as ev


def test_model_use_follows_the_recorded_assignments(cls_runs):
    run = cls_runs["fedfew"]
    use = ev.model_use(run)
    assert use.rounds.tolist() == [0, 1, 2, 3] and use.sites == run.sites and use.num_models == 2
    for j, rec in enumerate(run.records):
        assert [use.models[i, j] for i in range(len(run.sites))] == [rec["assignments"][s] for s in run.sites]
    assert use.switches() == {s: int(np.count_nonzero(np.diff(use.models[i]))) for i, s in enumerate(run.sites)}
    assert ev.model_use(cls_runs["local"]).models.tolist() == [[ev.OWN_MODEL] * 4] * 3
    assert use.table().column("model in the last round") == [f"model {k}" for k in use.models[:, -1]]


def test_metric_by_method_and_fairness(cls_runs):
    runs = {"FedFew": cls_runs["fedfew"], "FedAvg": cls_runs["fedavg"], "Local": cls_runs["local"]}
    mm = ev.metric_by_method(runs)
    assert mm.metric == "accuracy" and mm.methods == list(runs) and mm.values.shape == (3, 3)
    for i, run in enumerate(runs.values()):
        summary = json.loads((run.run_dir / "summary.json").read_text())
        assert mm.values[i].tolist() == [summary["per_site"][s]["metric"] for s in mm.sites]
    table = ev.fairness(runs)
    for i, row in enumerate(table.records()):
        a = mm.values[i]
        assert row["mean accuracy"] == pytest.approx(a.mean())
        assert row["worst site value"] == a.min() and row["worst site"] == mm.sites[int(np.argmin(a))]
        assert row["Jain's index"] == pytest.approx(a.sum() ** 2 / (len(a) * (a**2).sum()))
    auc = ev.metric_by_method(runs, "auc")
    assert auc.metric == "auc" and auc.table().columns[1:] == list(runs)


def test_metric_by_method_refuses_mixed_tasks(cls_runs, seg_run):
    with pytest.raises(ValueError, match="mix tasks"):
        ev.metric_by_method({"a": cls_runs["fedfew"], "b": seg_run})


def test_history_matches_the_record_summaries(cls_runs):
    run = cls_runs["fedavg"]
    h = ev.history(run)
    assert h.rounds.tolist() == [0, 1, 2, 3] and h.per_site.shape == (3, 4)
    assert h.mean.tolist() == pytest.approx([r["summary"]["mean"] for r in run.records])
    assert h.worst.tolist() == pytest.approx([r["summary"]["worst"] for r in run.records])
    assert h.jain.tolist() == pytest.approx([r["summary"]["jain"] for r in run.records])


def test_privacy_is_none_without_dp_records(cls_runs, seg_run):
    assert ev.privacy_spent(cls_runs["fedfew"]) is None
    assert ev.privacy_by_run({"a": cls_runs["fedfew"], "b": seg_run}) == {}


def test_privacy_spent_reads_per_site_epsilon(seg_dp_dir):
    run = ev.load_run(seg_dp_dir)
    spent = ev.privacy_spent(run)
    assert spent is not None and spent.epsilon.shape == (3, 4)
    assert spent.final() == {s: 0.25 * 4 * (i + 1) for i, s in enumerate(run.sites)}
    assert list(ev.privacy_by_run({"dp": run})) == ["dp"]
    assert spent.table().column("epsilon spent") == list(spent.final().values())


def test_privacy_accepts_site_info_and_ignores_missing_sites(seg_dp_dir):
    run = ev.load_run(seg_dp_dir)
    site = run.sites[0]
    for rec in run.records:
        rec.pop("privacy")
        rec["site_info"] = {site: {"privacy": {"epsilon": float(rec["round"])}}}
    spent = ev.privacy_spent(run)
    assert spent is not None and spent.epsilon[0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert np.isnan(spent.epsilon[1:]).all() and np.isnan(spent.final()[run.sites[1]])
