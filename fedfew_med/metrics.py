"""Evaluation metrics, from scikit-learn and MONAI, plus the fairness summary.

Classification metrics take class probabilities (N, C) and integer targets (N,);
segmentation metrics take predicted and reference masks (N, 1, *spatial), or one mask per case.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot
from sklearn import metrics as skm

PRIMARY = {"classification": "accuracy", "tabular": "accuracy", "segmentation": "dice"}

# What ``[run].metric`` may name per task: the metrics every site reports, higher is better
# (mean, worst site and Jain's index assume it; HD95 is lower-is-better and cannot head a table).
HEADLINE = {
    "classification": ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity"),
    "tabular": ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity"),
    "segmentation": ("dice",),
}
Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def headline_metric(task: str, chosen: str = "") -> str:
    """The metric a run's tables lead with: ``chosen`` (``[run].metric``), or the task's default.

    Raises
    ------
    ValueError
        When ``chosen`` is not a higher-is-better metric the task's sites report.
    """
    if not chosen:
        return PRIMARY[task]
    if chosen not in HEADLINE[task]:
        why = " (HD95 is lower-is-better: mean and worst site would invert)" if chosen == "hd95" else ""
        raise ValueError(f"metric must be one of {', '.join(HEADLINE[task])} for a {task} task{why}, got {chosen!r}")
    return chosen


def classification_metrics(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, AUC (one-vs-rest if C > 2), sensitivity and specificity.

    Sensitivity and specificity are for class 1 against the rest. AUC is NaN when the
    targets hold a single class.
    """
    pred = probs.argmax(axis=1)
    out = {
        "accuracy": float(skm.accuracy_score(targets, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(targets, pred)) if len(set(targets.tolist())) > 1 else float("nan"),
    }
    classes = probs.shape[1]
    try:
        if classes == 2:
            out["auc"] = float(skm.roc_auc_score(targets, probs[:, 1]))
        else:
            out["auc"] = float(skm.roc_auc_score(targets, probs, multi_class="ovr", labels=list(range(classes))))
    except ValueError:  # one class only in targets
        out["auc"] = float("nan")
    positive, negative = targets == 1, targets != 1
    out["sensitivity"] = float((pred[positive] == 1).mean()) if positive.any() else float("nan")
    out["specificity"] = float((pred[negative] != 1).mean()) if negative.any() else float("nan")
    return out


def auc_interval(probs: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """95 % interval of a two-class AUC by Hanley & McNeil (1982), clipped to [0, 1].

    SE² = [A(1−A) + (n₁−1)(Q₁−A²) + (n₀−1)(Q₂−A²)] / (n₁ n₀) with Q₁ = A/(2−A), Q₂ = 2A²/(1+A):
    closed-form, so the end-of-run table needs no resampling. NaN for more than two classes
    (the macro one-vs-rest AUC has no such formula) or when a class is missing.
    """
    if probs.shape[1] != 2:
        return float("nan"), float("nan")
    n1 = int((targets == 1).sum())
    n0 = len(targets) - n1
    if n1 == 0 or n0 == 0:
        return float("nan"), float("nan")
    a = float(skm.roc_auc_score(targets, probs[:, 1]))
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt(max(a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a), 0.0) / (n1 * n0))
    return max(a - Z95 * se, 0.0), min(a + Z95 * se, 1.0)


def prediction_checks(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """What the end-of-run table needs to flag a useless classifier: the AUC interval and the classes predicted.

    ``classes_predicted`` counts the distinct argmax classes over the test split (1: the model
    answers one class whatever it sees, however high its accuracy).
    """
    low, high = auc_interval(probs, targets)
    return {"auc_low": low, "auc_high": high, "classes_predicted": float(len(np.unique(probs.argmax(axis=1))))}


def result_flags(metrics: Mapping[str, float]) -> list[str]:
    """Plain warnings about a site's classification metrics; empty when nothing is suspicious.

    A model that predicts a single class, or whose AUC interval holds 0.5 (it cannot be told
    apart from chance on this test split), is flagged whatever its accuracy.
    """
    flags = []
    predicted = metrics.get("classes_predicted")
    if predicted is not None and predicted <= 1:
        balanced = metrics.get("balanced_accuracy", float("nan"))
        extra = f" (balanced accuracy {balanced:.2f})" if balanced == balanced else ""
        flags.append(f"predicts a single class for every test record{extra}")
    low, high, auc = metrics.get("auc_low"), metrics.get("auc_high"), metrics.get("auc")
    if low is not None and high is not None and auc is not None and low <= 0.5 <= high:
        flags.append(f"AUC {auc:.2f} (95% CI {low:.2f}-{high:.2f}) includes 0.5: not distinguishable from chance")
    return flags


def segmentation_metrics(pred: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor | Sequence[torch.Tensor],
                         num_classes: int, spacing: Sequence[float] | None = None) -> dict[str, float]:
    """Mean foreground Dice and 95% Hausdorff distance (MONAI), over cases with a reference object.

    ``pred`` and ``target`` are (N, 1, *spatial) masks, or sequences of (1, *spatial_i) masks
    (cases of different sizes: whole volumes put back together from their patches), scored one
    by one and averaged as if stacked. Cases where both masks are empty count as Dice 1
    (correctly found nothing). HD95 is in voxels, or in mm when ``spacing`` (mm per spatial
    axis, shared by the cases) is given; it is the mean over the (case, class) pairs where both
    masks hold the class.
    """
    if isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor):
        dice, hd = _case_scores(pred, target, num_classes, spacing)
    else:
        pairs = [_case_scores(p[None], t[None], num_classes, spacing) for p, t in zip(pred, target, strict=True)]
        dice, hd = torch.cat([d for d, _ in pairs]), torch.cat([h for _, h in pairs])
    defined = ~torch.isnan(hd)
    hd95 = float(hd[defined].mean()) if defined.any() else float("nan")
    return {"dice": float(torch.nanmean(dice)), "hd95": hd95}


def _case_scores(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                 spacing: Sequence[float] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and HD95 per case and foreground class, both (N, C-1); HD95 NaN where either mask lacks the class."""
    p = one_hot(pred.long(), num_classes)
    t = one_hot(target.long(), num_classes)
    dice = compute_dice(p, t, include_background=False, ignore_empty=False)  # (N, C-1)
    both_empty = (p[:, 1:].sum(dim=tuple(range(2, p.ndim))) == 0) & (t[:, 1:].sum(dim=tuple(range(2, t.ndim))) == 0)
    dice = torch.where(both_empty, torch.ones_like(dice), dice)
    has_ref = t[:, 1:].flatten(2).sum(-1) > 0
    has_pred = p[:, 1:].flatten(2).sum(-1) > 0
    hd_cases = has_ref & has_pred
    hd = torch.full(hd_cases.shape, float("nan"), dtype=torch.float64)
    rows = hd_cases.any(dim=1)  # HD is undefined where either mask is empty: leave those cases out
    if rows.any():
        d = compute_hausdorff_distance(p[rows], t[rows], include_background=False, percentile=95,
                                       spacing=None if spacing is None else [float(s) for s in spacing])
        hd[rows] = torch.where(hd_cases[rows], d.double(), hd[rows])
    return dice, hd


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index (Σ a)² / (n Σ a²): 1 when all equal, 1/n when one takes all."""
    a = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if a.size == 0 or not np.any(a):
        return float("nan")
    return float(a.sum() ** 2 / (a.size * np.square(a).sum()))


def summarize(per_site: dict[str, float]) -> dict[str, float]:
    """Mean, worst site, best site and Jain's index of one per-site metric."""
    vals = [v for v in per_site.values() if not math.isnan(v)]
    if not vals:
        return {"mean": float("nan"), "worst": float("nan"), "best": float("nan"), "jain": float("nan")}
    return {"mean": float(np.mean(vals)), "worst": float(min(vals)), "best": float(max(vals)), "jain": jain_index(vals)}
