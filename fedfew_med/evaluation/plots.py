"""Plots for the clinician notebooks; matplotlib is imported here only, when a plot is drawn.

Every function returns a new ``matplotlib.figure.Figure`` made without pyplot (no global
figure state): a notebook shows it when it is a cell's last value (after
``%matplotlib inline``), a script saves it with ``fig.savefig(path)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedfew_med.evaluation.federation import OWN_MODEL, History, MethodMetrics, ModelUse, PrivacySpent
from fedfew_med.evaluation.predict import NewScan
from fedfew_med.evaluation.report import METRIC_LABELS, SiteReport

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Reports = SiteReport | Mapping[str, SiteReport]


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _as_mapping(reports: Reports) -> dict[str, SiteReport]:
    return {reports.method: reports} if isinstance(reports, SiteReport) else dict(reports)


def deployment(report: SiteReport) -> Figure:
    """The site's loss on each server model, the deployed one highlighted (or the reason, without a choice)."""
    fig = _figure(5, 2.8)
    ax = fig.add_subplot()
    d = report.deployed
    if d.scores:
        colors = ["tab:green" if k == d.model_index else "tab:gray" for k in range(len(d.scores))]
        ax.bar([f"model {k}" for k in range(len(d.scores))], d.scores, color=colors)
        ax.set_ylabel(f"loss on {d.selection_split} split")
        ax.set_title(f"{report.site}: lowest loss is deployed (green)", fontsize=10)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, d.reason, ha="center", va="center", wrap=True)
    return fig


def metrics_with_ci(reports: Reports, metrics: Sequence[str] | None = None) -> Figure:
    """Point estimate and CI of each metric, one marker per run."""
    reps = _as_mapping(reports)
    first = next(iter(reps.values()))
    names = list(metrics or first.metrics)
    fig = _figure(1.6 * len(names) + 2.5, 3.2)
    ax = fig.add_subplot()
    width = 0.7 / max(len(reps), 1)
    for i, (label, rep) in enumerate(reps.items()):
        x = np.arange(len(names)) + (i - (len(reps) - 1) / 2) * width
        est = [rep.metrics[m] for m in names]
        y = np.array([e.value for e in est])
        err = np.array([[e.value - e.low, e.high - e.value] for e in est]).T
        ax.errorbar(x, y, yerr=np.nan_to_num(err), fmt="o", capsize=3, label=label)
    ax.set_xticks(np.arange(len(names)), [METRIC_LABELS.get(n, n).split(" (")[0] for n in names])
    if not any(n.startswith("hd95") for n in names):
        ax.set_ylim(0, 1.05)
    ax.set_title(f"{first.site}: metrics with {round(next(iter(first.metrics.values())).level * 100)}% CIs", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def roc(reports: Reports, *, band: bool = True) -> Figure:
    """ROC curves of one or several runs at one site, with bootstrap band and operating point.

    Each curve (AUC in the legend) gets its pointwise percentile-bootstrap band (shaded; the
    report's resamples, see :meth:`SiteReport.roc_band`) when ``band``, and a marker where the
    model's own decision (its argmax: ``p > 0.5`` with two classes) puts it, with the intervals of
    sensitivity and specificity as error bars for two classes.
    """
    reps = _as_mapping(reports)
    fig = _figure(4.6, 4.4)
    ax = fig.add_subplot()
    level = 0.95
    for i, (label, rep) in enumerate(reps.items()):
        names = rep.labels
        for j, (c, (fpr, tpr)) in enumerate(rep.roc_curves().items()):
            color = f"C{(i * rep.num_classes + j) % 10}"
            suffix = "" if rep.num_classes == 2 else f" {names[c]} vs rest"
            ax.plot(fpr, tpr, color=color, label=f"{label}{suffix} (AUC {rep.metrics['auc'].value:.2f})")
            if band:
                b = rep.roc_band(c)
                level = b.level
                ax.fill_between(b.fpr, b.low, b.high, color=color, alpha=0.18, linewidth=0)
            x, y = rep.operating_point(c)
            if rep.num_classes == 2:
                sens, spec = rep.metrics["sensitivity"], rep.metrics["specificity"]
                xerr = np.nan_to_num([[x - (1 - spec.high)], [(1 - spec.low) - x]])
                yerr = np.nan_to_num([[y - sens.low], [sens.high - y]])
                ax.errorbar([x], [y], xerr=np.clip(xerr, 0, None), yerr=np.clip(yerr, 0, None), fmt="o", color=color,
                            markeredgecolor="black", capsize=3, zorder=3,
                            label=f"{label}: operating point p({names[c]}) > 0.5 (sens {y:.2f}, spec {1 - x:.2f})")
            else:
                ax.plot([x], [y], "o", color=color, markeredgecolor="black", zorder=3)
    ax.plot([0, 1], [0, 1], ls=":", color="gray")
    ax.set(xlabel="1 - specificity (false-positive rate)", ylabel="sensitivity (true-positive rate)", xlim=(0, 1), ylim=(0, 1.01))
    first = next(iter(reps.values()))
    positive = f" for {first.labels[1]!r}" if first.num_classes == 2 else " (one class against the rest)"
    shaded = f"; shaded: {round(level * 100)}% bootstrap band" if band else ""
    ax.set_title(f"ROC curve{positive} on the test split{shaded}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def confusion(report: SiteReport) -> Figure:
    """Confusion matrix with counts (rows: reference, columns: predicted)."""
    cm = report.confusion()
    names = report.labels
    fig = _figure(3.8, 3.4)
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="reference")
    ax.set_title(f"{report.site} ({report.method})", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def calibration(reports: Reports, n_bins: int = 5) -> Figure:
    """Reliability curves: predicted probability against observed frequency."""
    fig = _figure(4.2, 4)
    ax = fig.add_subplot()
    reps = _as_mapping(reports)
    for label, rep in reps.items():
        prob_true, prob_pred = rep.calibration(n_bins)
        ax.plot(prob_pred, prob_true, marker="o", label=label)
    ax.plot([0, 1], [0, 1], ls=":", color="gray", label="perfectly calibrated")
    first = next(iter(reps.values()))
    if first.num_classes == 2:
        xlabel, ylabel = f"predicted probability of {first.labels[1]!r}", f"observed frequency of {first.labels[1]!r}"
    else:
        xlabel, ylabel = "probability of the predicted class", "how often the predicted class is right"
    ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title("calibration on the test split", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def _show_image(ax: Axes, image: np.ndarray) -> None:
    ax.imshow(image[0] if image.shape[0] == 1 else np.moveaxis(image[:3], 0, -1), cmap="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def examples(report: SiteReport, n: int = 8) -> Figure:
    """Test images with reference and predicted label; errors titled in red (most confident errors first)."""
    if report.images is None:
        raise ValueError(f"site {report.site!r}: images are kept only for 2-D data")
    idx = report.example_indices(n)
    names = report.labels
    cols = min(4, max(len(idx), 1))
    rows = max(1, -(-len(idx) // cols))
    fig = _figure(2.2 * cols, 2.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, idx, strict=False):
        ax.axis("on")
        _show_image(ax, report.images[i])
        pred, true = int(report.predictions[i]), int(report.targets[i])
        ax.set_title(f"case {i}\ntrue {names[true]} / pred {names[pred]} ({report.probs[i, pred]:.2f})",
                     fontsize=8, color="black" if pred == true else "red")
    return fig


def segmentation_overlays(report: SiteReport, cases: Sequence[int] | np.ndarray | None = None, n: int = 6) -> Figure:
    """Images with the reference (green) and predicted (red) contours; default: the worst-Dice cases."""
    if report.images is None:
        raise ValueError(f"site {report.site!r}: images are kept only for 2-D data")
    idx = list(report.worst_cases(n) if cases is None else cases)
    cols = min(3, max(len(idx), 1))
    rows = max(1, -(-len(idx) // cols))
    fig = _figure(2.8 * cols, 3.0 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, idx, strict=False):
        ax.axis("on")
        _show_image(ax, report.images[i])
        ref, pred = report.targets[i] > 0, report.predictions[i] > 0
        if ref.any():
            ax.contour(ref, levels=[0.5], colors="lime", linewidths=2.0)
        if pred.any():
            ax.contour(pred, levels=[0.5], colors="red", linewidths=1.0)
        hd = report.per_case[report.hd95_key][i]
        hd_text = "-" if np.isnan(hd) else f"{hd:.1f} {report.hd95_unit}"
        ax.set_title(f"case {i}: Dice {report.per_case['dice'][i]:.2f}, HD95 {hd_text}", fontsize=8)
    fig.suptitle(f"{report.site}: reference (green) and prediction (red)", fontsize=10)
    return fig


def per_case(reports: Reports) -> Figure:
    """Distribution of per-case Dice and HD95 for one or several runs (box plots with the cases on top)."""
    reps = _as_mapping(reports)
    first = next(iter(reps.values()))
    mm = all("hd95_mm" in r.per_case for r in reps.values())  # one unit for every run, or pixels
    hd95, hd_unit = ("hd95_mm", " (mm)") if mm else ("hd95", " (pixels)")
    fig = _figure(8, 3.2)
    for j, (name, unit) in enumerate((("dice", ""), (hd95, hd_unit))):
        ax = fig.add_subplot(1, 2, j + 1)
        data = [r.per_case[name][np.isfinite(r.per_case[name])] for r in reps.values()]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(reps) + 1), list(reps), fontsize=8)
        for k, d in enumerate(data):
            jitter = np.linspace(-0.15, 0.15, len(d)) if len(d) > 1 else np.zeros(len(d))
            ax.scatter(k + 1 + jitter, d, s=8, alpha=0.5)
        ax.set_ylabel(f"per-case {name.removesuffix('_mm')}{unit}")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{first.site}: per-case results on the test split", fontsize=10)
    return fig


def model_use(use: ModelUse, title: str = "") -> Figure:
    """Heat map of the model each site deploys in each round."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    labels = {-2: "not recorded", OWN_MODEL: "own model"}
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    fixed = {-2: "#ffffff", OWN_MODEL: "#999999"}
    present = sorted(set(np.unique(use.models).tolist())) or [-2]
    colors = [fixed.get(c) or palette[c % len(palette)] for c in present]  # one colour per model, the same in every run
    shown = np.searchsorted(present, use.models)  # (S, R) index into ``present``
    norm = BoundaryNorm(np.arange(len(present) + 1) - 0.5, len(present))
    fig = _figure(max(5.0, 0.35 * len(use.rounds) + 3), 0.4 * len(use.sites) + 1.5)
    ax = fig.add_subplot()
    im = ax.imshow(shown, cmap=ListedColormap(colors), norm=norm, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(use.sites)), use.sites, fontsize=8)
    ax.set_yticks(np.arange(len(use.sites) + 1) - 0.5, minor=True)
    ax.grid(which="minor", axis="y", color="white", linewidth=2)
    ax.tick_params(which="minor", length=0)
    step = max(1, len(use.rounds) // 15)
    ax.set_xticks(range(0, len(use.rounds), step), [str(r) for r in use.rounds[::step]], fontsize=8)
    ax.set_xlabel("round")
    cbar = fig.colorbar(im, ax=ax, ticks=range(len(present)))
    cbar.ax.set_yticklabels([labels.get(c, f"model {c}") for c in present], fontsize=8)
    ax.set_title(title or "deployed model per site and round", fontsize=10)
    return fig


def metric_bars(mm: MethodMetrics) -> Figure:
    """Grouped bars: each site's deployed metric under every method, the worst site of each marked."""
    fig = _figure(max(6.0, 1.1 * len(mm.sites) + 2), 3.6)
    ax = fig.add_subplot()
    width = 0.8 / max(len(mm.methods), 1)
    x = np.arange(len(mm.sites))
    for i, label in enumerate(mm.methods):
        vals = mm.values[i]
        pos = x + (i - (len(mm.methods) - 1) / 2) * width
        ax.bar(pos, np.nan_to_num(vals), width, label=label)
        if np.isfinite(vals).any():
            w = int(np.nanargmin(vals))
            ax.annotate("worst", (pos[w], vals[w]), ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(x, mm.sites, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(mm.metric)
    if mm.metric != "hd95":
        ax.set_ylim(0, 1.15)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(len(mm.methods), 4), loc="upper left")
    ax.set_title(f"{mm.metric} of every site's deployed model, by method", fontsize=10)
    return fig


def histories(runs: Mapping[str, History]) -> Figure:
    """Mean (solid) and worst-site (dashed) metric over the rounds for every run."""
    fig = _figure(6, 3.4)
    ax = fig.add_subplot()
    for i, (label, h) in enumerate(runs.items()):
        color = f"C{i}"
        ax.plot(h.rounds, h.mean, color=color, label=f"{label}: mean")
        ax.plot(h.rounds, h.worst, color=color, ls="--", label=f"{label}: worst site")
    first = next(iter(runs.values()), None)
    ax.set(xlabel="round", ylabel=first.metric if first else "")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    ax.set_title("average and worst-served site over the rounds", fontsize=10)
    return fig


def privacy(spent: PrivacySpent, title: str = "") -> Figure:
    """Cumulative ε spent per site over the rounds."""
    fig = _figure(6, 3.4)
    ax = fig.add_subplot()
    for site, row in zip(spent.sites, spent.epsilon, strict=True):
        ok = np.isfinite(row)
        ax.plot(spent.rounds[ok], row[ok], marker=".", label=site)
    ax.set(xlabel="round", ylabel="ε spent (cumulative)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "privacy budget spent per site", fontsize=10)
    return fig


def new_scan(scan: NewScan) -> Figure:
    """A prediction on a new scan: the class probabilities, or the mask over the scan's middle slice."""
    fig = _figure(5, 3.2)
    ax = fig.add_subplot()
    row = scan.row
    if "mask" in row:  # segmentation: the source grid the mask was written on
        import nibabel as nib

        from fedfew_med.data.readers import ReaderSet, read_image

        image = np.asarray(read_image(scan.scan, ReaderSet()))[0]
        mask = np.asarray(nib.load(row["mask"]).dataobj)  # type: ignore[attr-defined]
        if image.ndim == 3:  # the middle slice along the last axis
            image, mask = image[..., image.shape[-1] // 2], mask[..., mask.shape[-1] // 2]
        _show_image(ax, image[None])
        if mask.any():
            ax.contour(mask, levels=[0.5], colors="red", linewidths=1.0)  # rows and columns as imshow draws them
        ax.set_title(f"{row['site']}: mask by {row['model']}", fontsize=9)
    else:
        probs = [float(row[f"p_{n}"]) for n in scan.class_names]
        ax.barh(range(len(probs)), probs, color=["C3" if n == row["predicted"] else "C0" for n in scan.class_names])
        ax.set_yticks(range(len(probs)), scan.class_names)
        ax.set(xlim=(0, 1), xlabel="probability")
        ax.set_title(f"{row['site']}: {row['predicted']} ({row['model']})", fontsize=9)
    return fig
