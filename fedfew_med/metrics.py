"""Evaluation metrics, from scikit-learn and MONAI, plus the fairness summary.

Classification metrics take class probabilities (N, C) and integer targets (N,);
segmentation metrics take predicted and reference masks (N, 1, *spatial).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot
from sklearn import metrics as skm

PRIMARY = {"classification": "accuracy", "tabular": "accuracy", "segmentation": "dice"}


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


def segmentation_metrics(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Mean foreground Dice and 95% Hausdorff distance (MONAI), over cases with a reference object.

    Cases where both masks are empty count as Dice 1 (correctly found nothing).
    """
    p = one_hot(pred.long(), num_classes)
    t = one_hot(target.long(), num_classes)
    dice = compute_dice(p, t, include_background=False, ignore_empty=False)  # (N, C-1)
    both_empty = (p[:, 1:].sum(dim=tuple(range(2, p.ndim))) == 0) & (t[:, 1:].sum(dim=tuple(range(2, t.ndim))) == 0)
    dice = torch.where(both_empty, torch.ones_like(dice), dice)
    has_ref = t[:, 1:].flatten(2).sum(-1) > 0
    has_pred = p[:, 1:].flatten(2).sum(-1) > 0
    hd_cases = has_ref & has_pred
    hd95 = float("nan")
    rows = hd_cases.any(dim=1)  # HD is undefined where either mask is empty: leave those cases out
    if rows.any():
        hd = compute_hausdorff_distance(p[rows], t[rows], include_background=False, percentile=95)
        hd95 = float(hd[hd_cases[rows]].mean())
    return {"dice": float(torch.nanmean(dice)), "hd95": hd95}


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
