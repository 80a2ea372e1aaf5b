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


def test_collapse_is_remarked(cls_runs, collapsed_dir):
    use = ev.model_use(ev.load_run(collapsed_dir))
    assert use.collapsed and use.remark().startswith("COLLAPSE: the 2 shared models collapsed into one")
    assert "collapsed into one (relative spread 0.001)" in use.remark()
    fedfew = ev.model_use(cls_runs["fedfew"])
    summary = cls_runs["fedfew"].summary["model_use"]
    assert fedfew.in_use == summary["in_use"] and fedfew.collapsed is summary["collapsed"] is False
    expected = f"COLLAPSE: all 3 sites deploy model {int(fedfew.models[0, -1])}" if summary["in_use"] == 1 else ""
    assert fedfew.remark().startswith(expected) and bool(fedfew.remark()) == bool(expected)
    assert ev.model_use(cls_runs["fedavg"]).remark() == "" and ev.model_use(cls_runs["local"]).remark() == ""


def test_every_site_deploying_one_model_is_remarked_without_a_collapse():
    models = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 0]])  # (3 sites, 3 rounds): all on model 0 at the end
    use = ev.ModelUse(np.arange(3), ["a", "b", "c"], models, num_models=3, note="", collapsed=False, in_use=1)
    assert use.remark() == ("COLLAPSE: all 3 sites deploy model 0; the other 2 shared model(s) serve no site, "
                            "so the run is in effect one shared model.")
    assert ev.ModelUse(np.arange(3), ["a", "b", "c"], models, num_models=3, in_use=2).remark() == ""


def test_site_privacy_of_a_dp_run_with_its_policy(png_dp_dir):
    run = ev.load_run(png_dp_dir)
    summary = json.loads((png_dp_dir / "summary.json").read_text())
    for site in run.sites:
        sp = ev.site_privacy(run, site)
        recorded = summary["privacy"][site]
        assert sp.dp and sp.epsilon == recorded["epsilon"] and sp.delta == recorded["delta"] == 1e-5
        assert sp.target_epsilon == 8.0 and sp.policy_epsilon == 8.0 and sp.policy_name == "fedfew-med example policy"
        text = sp.text()
        assert f"ε = {recorded['epsilon']:.3g} spent" in text and "δ = 1e-05" in text and "allows at most ε = 8" in text
    table = ev.privacy_table(run)
    assert table is not None and table.column("epsilon spent") == [summary["privacy"][s]["epsilon"] for s in run.sites]
    assert table.column("delta") == ["1e-05"] * 3 and table.column("policy limit (epsilon)") == [8.0] * 3


def test_site_privacy_says_plainly_when_there_is_none(cls_runs, seg_dp_dir):
    sp = ev.site_privacy(cls_runs["fedfew"], "")
    assert not sp.dp and sp.site == cls_runs["fedfew"].sites[0]
    assert "trained WITHOUT differential privacy; the run is not a DP run" in sp.text()
    assert ev.privacy_table(cls_runs["fedfew"]) is None
    fake = ev.load_run(seg_dp_dir)  # records with ε and δ only: no budget, no policy
    text = ev.site_privacy(fake, fake.sites[1]).text()
    assert "ε = 2 spent over the whole run at δ = 1e-05." in text and "no privacy policy file" in text
    with pytest.raises(ev.UnknownSiteError):
        ev.site_privacy(fake, "nowhere")


def test_warnings_are_the_runs_own(cls_runs, png_dp_dir):
    runs = {**cls_runs, "dp": ev.load_run(png_dp_dir)}
    table = ev.warnings_table(runs)
    want = [[label, site, flag] for label, r in runs.items()
            for site, entry in r.summary["per_site"].items() for flag in entry["flags"]]
    assert [list(row) for row in table.rows] == want
    assert want, "the tiny runs should flag at least one site (noise images cannot be told apart)"
