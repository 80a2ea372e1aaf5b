"""Every plot draws and saves on tiny runs (readability is checked by eye, not here)."""

from __future__ import annotations

import pytest

from fedfew_med import evaluation as ev

plots = pytest.importorskip("fedfew_med.evaluation.plots")
pytest.importorskip("matplotlib")


def _save(fig, path):
    fig.savefig(path, dpi=40)
    assert path.stat().st_size > 1000


def test_site_plots(cls_runs, seg_run, tmp_path):
    site = cls_runs["fedfew"].sites[0]
    reports = ev.site_reports(cls_runs, site, n_resamples=100)
    rep = reports["fedfew"]
    for name, fig in {
        "deploy": plots.deployment(rep), "deploy_none": plots.deployment(reports["local"]),
        "ci": plots.metrics_with_ci(reports), "roc": plots.roc(reports), "confusion": plots.confusion(rep),
        "calibration": plots.calibration(reports), "examples": plots.examples(rep, n=5),
    }.items():
        _save(fig, tmp_path / f"{name}.png")
    roc = plots.roc(rep)
    ax = roc.axes[0]
    assert len(ax.collections) >= 1  # the shaded bootstrap band (and the operating point's error bars)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("operating point p(class 1) > 0.5" in t for t in legend) and "bootstrap band" in ax.get_title()
    seg = seg_run.site_report(seg_run.sites[0], n_resamples=100)
    _save(plots.segmentation_overlays(seg, n=4), tmp_path / "overlays.png")
    _save(plots.per_case({"a": seg, "b": seg}), tmp_path / "per_case.png")
    _save(plots.metrics_with_ci(seg), tmp_path / "seg_ci.png")


def test_label_names_on_the_plots(png_dp_dir):
    run = ev.load_run(png_dp_dir)
    rep = run.site_report(run.sites[0], n_resamples=50)
    ticks = [t.get_text() for t in plots.confusion(rep).axes[0].get_xticklabels()]
    assert ticks == ["no_tumor", "tumor"]
    assert "'tumor'" in plots.roc(rep).axes[0].get_title()
    titles = [ax.get_title() for ax in plots.examples(rep, n=4).axes if ax.get_title()]
    assert titles and all("true no_tumor" in t or "true tumor" in t for t in titles)


def test_federation_plots(cls_runs, seg_dp_dir, tmp_path):
    _save(plots.model_use(ev.model_use(cls_runs["fedfew"])), tmp_path / "use.png")
    _save(plots.model_use(ev.model_use(cls_runs["local"])), tmp_path / "use_local.png")
    _save(plots.metric_bars(ev.metric_by_method(cls_runs)), tmp_path / "bars.png")
    _save(plots.histories({k: ev.history(r) for k, r in cls_runs.items()}), tmp_path / "hist.png")
    spent = ev.privacy_spent(ev.load_run(seg_dp_dir))
    assert spent is not None
    _save(plots.privacy(spent), tmp_path / "privacy.png")
