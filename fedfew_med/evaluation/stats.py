"""Point estimates with percentile-bootstrap confidence intervals, over a site's test cases.

The bootstrap resamples *test cases* with replacement. With ``n`` cases, ``B``
resamples and seed ``s`` the resampled indices are exactly

    rng = numpy.random.default_rng(s)
    indices = rng.integers(0, n, size=(B, n))      # (B resamples, n cases)

and the interval at level ``L`` is the ``(1-L)/2`` and ``(1+L)/2`` quantiles
(``numpy.quantile``, linear interpolation) of the metric over the resamples where it is
defined (a resample with one class only has no AUC; resamples with NaN are left out
and counted in :attr:`Estimate.n_valid`). No global RNG is touched.

Classification metrics are recomputed on every resample with vectorised numpy versions
of :func:`fedfew_med.metrics.classification_metrics` (same definitions; the test suite
checks both against each other and against a plain loop), plus the predictive values
of :func:`predictive_values` (PPV, NPV), which only the evaluation layer reports.
Segmentation metrics are means of per-case values, so the bootstrap resamples the
per-case Dice and HD95. :func:`roc_band` draws the same resampled cases (same seed) for a
pointwise band around the ROC curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot
from scipy.stats import rankdata

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A metric's point estimate and its bootstrap confidence interval.

    Attributes
    ----------
    value
        The metric on the whole test split (NaN when undefined).
    low, high
        Percentile-bootstrap interval bounds (NaN when no resample defines the metric).
    level
        Confidence level of the interval, e.g. 0.95.
    n_valid
        Resamples on which the metric was defined (out of ``n_resamples``).
    n_resamples
        Resamples drawn.
    """

    value: float
    low: float
    high: float
    level: float = DEFAULT_LEVEL
    n_valid: int = 0
    n_resamples: int = 0

    def __str__(self) -> str:
        if math.isnan(self.value):
            return "n/a"
        if math.isnan(self.low):
            return f"{self.value:.3f}"
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


Statistic = Callable[[np.ndarray], Mapping[str, np.ndarray]]
"""Maps an index matrix (B, n) to each metric's value on every resample, as (B,) arrays."""


def bootstrap_indices(n: int, *, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Resampled case indices, shape (n_resamples, n), from ``numpy.random.default_rng(seed)``."""
    if n < 1:
        raise ValueError(f"the bootstrap needs at least one case, got n={n}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def percentile_interval(samples: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float, int]:
    """Percentile interval of the finite ``samples`` at ``level``, and how many were finite."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan"), 0
    low, high = np.quantile(finite, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high), int(finite.size)


def bootstrap(
    statistic: Statistic,
    point: Mapping[str, float],
    n: int,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = DEFAULT_SEED,
) -> dict[str, Estimate]:
    """Percentile-bootstrap intervals of every metric ``statistic`` returns.

    Parameters
    ----------
    statistic
        ``statistic(indices)`` with ``indices`` of shape (B, n) returns each metric on each resample.
    point
        The point estimates, by metric name (metrics missing here are not reported).
    n
        Number of test cases.
    n_resamples, level, seed
        Resamples, confidence level and the seed of the index generator (see the module docstring).
    """
    samples = statistic(bootstrap_indices(n, n_resamples=n_resamples, seed=seed))
    out = {}
    for name, value in point.items():
        low, high, valid = percentile_interval(np.asarray(samples[name], dtype=np.float64), level)
        out[name] = Estimate(float(value), low, high, level, valid, n_resamples)
    return out


# ---------------------------------------------------------------- classification
def predictive_values(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Positive and negative predictive value of the argmax prediction, class 1 against the rest.

    As sensitivity and specificity in :func:`fedfew_med.metrics.classification_metrics`: a case
    is positive when its reference class is 1, and called positive when the argmax is 1.

    Returns
    -------
    dict
        ``ppv`` = TP / (TP + FP) (NaN when nothing is called positive) and
        ``npv`` = TN / (TN + FN) (NaN when nothing is called negative).
    """
    targets = np.asarray(targets)
    called = np.asarray(probs).argmax(axis=1) == 1
    positive = targets == 1
    n_called, n_cleared = int(called.sum()), int((~called).sum())
    return {
        "ppv": float((called & positive).sum() / n_called) if n_called else float("nan"),
        "npv": float((~called & ~positive).sum() / n_cleared) if n_cleared else float("nan"),
    }


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den is 0."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast_shapes(num.shape, den.shape), np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _auc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Mann-Whitney ROC AUC per row (ties count one half), NaN where a row has one class only.

    scores, positive: (B, n) float and bool.
    """
    ranks = rankdata(scores, axis=1)  # average ranks of ties, as the trapezoidal ROC area counts them
    n_pos = positive.sum(axis=1).astype(np.float64)
    n_neg = positive.shape[1] - n_pos
    u = (ranks * positive).sum(axis=1) - n_pos * (n_pos + 1) / 2.0
    return _safe_ratio(u, n_pos * n_neg)


def classification_statistic(probs: np.ndarray, targets: np.ndarray) -> Statistic:
    """The metrics of :func:`fedfew_med.metrics.classification_metrics` and :func:`predictive_values`, vectorised over resamples.

    Parameters
    ----------
    probs
        (N, C) class probabilities.
    targets
        (N,) integer classes.
    """
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets).astype(np.int64)
    num_classes = probs.shape[1]
    pred = probs.argmax(axis=1)
    correct = pred == targets

    def statistic(idx: np.ndarray) -> dict[str, np.ndarray]:
        t, ok = targets[idx], correct[idx]  # (B, n)
        recalls = []
        present = np.zeros(len(idx), dtype=np.int64)
        for c in range(num_classes):
            is_c = t == c
            n_c = is_c.sum(axis=1)
            present += n_c > 0
            recalls.append(_safe_ratio((ok & is_c).sum(axis=1), n_c))
        rec = np.stack(recalls, axis=1)  # (B, C)
        balanced = np.where(present > 1, _safe_ratio(np.nansum(rec, axis=1), present), np.nan)
        if num_classes == 2:
            auc = _auc(probs[idx, 1], t == 1)
        else:  # one-vs-rest, macro average; undefined when a class is missing
            auc = np.mean(np.stack([_auc(probs[idx, c], t == c) for c in range(num_classes)], axis=1), axis=1)
        positive = t == 1
        negative = ~positive
        called = pred[idx] == 1
        return {
            "accuracy": ok.mean(axis=1),
            "balanced_accuracy": balanced,
            "auc": auc,
            "sensitivity": _safe_ratio((positive & called).sum(axis=1), positive.sum(axis=1)),
            "specificity": _safe_ratio((negative & ~called).sum(axis=1), negative.sum(axis=1)),
            "ppv": _safe_ratio((positive & called).sum(axis=1), called.sum(axis=1)),
            "npv": _safe_ratio((negative & ~called).sum(axis=1), (~called).sum(axis=1)),
        }

    return statistic


@dataclass(frozen=True)
class RocBand:
    """An ROC curve on a fixed false-positive-rate grid with a pointwise bootstrap band.

    Attributes
    ----------
    fpr
        (G,) the grid, from 0 to 1.
    tpr
        (G,) the curve of the whole test split at the grid.
    low, high
        (G,) pointwise percentile interval of the resampled curves (vertical averaging); NaN
        when no resample has both classes.
    level
        Confidence level, e.g. 0.95.
    n_valid
        Resamples with both classes (the others have no ROC curve), out of ``n_resamples``.
    n_resamples
        Resamples drawn.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    low: np.ndarray
    high: np.ndarray
    level: float
    n_valid: int
    n_resamples: int


def _tpr_on_grid(fpr: np.ndarray, tpr: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The ROC curve through the points (fpr, tpr) (fpr non-decreasing), read at ``grid``.

    Linear between points; on a vertical stretch (several points at one fpr) the highest tpr,
    i.e. the curve as far as it gets at that false-positive rate.
    """
    j = np.searchsorted(fpr, grid, side="right") - 1  # the last point at or left of each grid value
    nxt = np.minimum(j + 1, len(fpr) - 1)
    x0, x1 = fpr[j], fpr[nxt]
    step = np.where(x1 > x0, (grid - x0) / np.where(x1 > x0, x1 - x0, 1.0), 0.0)
    return tpr[j] + step * (tpr[nxt] - tpr[j])


def _roc_on_grid(scores: np.ndarray, positive: np.ndarray, counts: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """ROC curves of weighted case sets read at ``grid``: (B, G), NaN rows where a class is absent.

    scores, positive: (n,); counts: (B, n) how often each case is in each set.
    """
    order = np.argsort(-scores, kind="stable")
    s, pos, w = scores[order], positive[order], counts[:, order]
    ends = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last case of each group of tied scores
    tp = np.cumsum(w * pos, axis=1)[:, ends]  # (B, T) true positives at each threshold, highest first
    fp = np.cumsum(w * ~pos, axis=1)[:, ends]
    n_pos, n_neg = tp[:, -1], fp[:, -1]
    out = np.full((len(counts), len(grid)), np.nan)
    for b in np.flatnonzero((n_pos > 0) & (n_neg > 0)):
        fpr = np.r_[0.0, fp[b] / n_neg[b]]
        tpr = np.r_[0.0, tp[b] / n_pos[b]]
        out[b] = _tpr_on_grid(fpr, tpr, grid)
    return out


def roc_band(
    scores: np.ndarray,
    positive: np.ndarray,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = DEFAULT_SEED,
    grid_size: int = 101,
) -> RocBand:
    """The ROC curve of ``scores`` for ``positive`` with a pointwise percentile-bootstrap band.

    Each resample (the indices of :func:`bootstrap_indices`, so the same cases as the metrics'
    intervals with the same seed) gives an ROC curve; every curve is read at ``grid_size``
    false-positive rates from 0 to 1 (vertical averaging, Fawcett 2006) and the band is the
    ``(1-level)/2`` and ``(1+level)/2`` quantiles at each rate. Resamples with one class only
    have no curve and are left out (counted in :attr:`RocBand.n_valid`).

    Parameters
    ----------
    scores
        (N,) the score of the positive class (e.g. its probability).
    positive
        (N,) bool, the reference.
    n_resamples, level, seed
        As :func:`bootstrap`.
    grid_size
        Points of the false-positive-rate grid.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    grid = np.linspace(0.0, 1.0, grid_size)
    idx = bootstrap_indices(len(scores), n_resamples=n_resamples, seed=seed)
    counts = np.zeros(idx.shape)  # (B, n): how often each case was drawn
    np.add.at(counts, (np.arange(len(idx))[:, None], idx), 1.0)
    curves = _roc_on_grid(scores, positive, counts, grid)
    valid = curves[np.isfinite(curves).all(axis=1)]
    point = _roc_on_grid(scores, positive, np.ones((1, len(scores))), grid)[0]
    if len(valid):
        low, high = np.quantile(valid, [(1.0 - level) / 2.0, (1.0 + level) / 2.0], axis=0)
    else:
        low = high = np.full(grid_size, np.nan)
    return RocBand(grid, point, low, high, level, len(valid), n_resamples)


# ---------------------------------------------------------------- segmentation
def per_case_segmentation(pred: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor | Sequence[torch.Tensor],
                          num_classes: int, spacing: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-case foreground Dice and 95% Hausdorff distance, as in ``segmentation_metrics``.

    Parameters
    ----------
    pred, target
        (N, 1, *spatial) integer masks, or sequences of (1, *spatial_i) masks (cases of
        different sizes), scored one by one.
    num_classes
        Classes including background.
    spacing
        (N, D) voxel size of each case's grid (one value per spatial axis, e.g. mm), or None.

    Returns
    -------
    dict
        ``dice``: (N,) mean over foreground classes; a case where both masks are empty counts 1.
        ``hd95``: (N,) in pixels (voxels), mean over the foreground classes present in both masks;
        NaN where none is. For a binary task the means of these arrays (``hd95`` ignoring NaN)
        equal :func:`fedfew_med.metrics.segmentation_metrics`.
        ``hd95_mm``: (N,) the same distance in the units of ``spacing`` (MONAI's
        ``compute_hausdorff_distance(..., spacing=...)``), only when ``spacing`` is given.
    """
    if not (isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor)):
        cases = list(zip(pred, target, strict=True))
        if spacing is not None and len(spacing) != len(cases):
            raise ValueError(f"spacing must have one row per case ({len(cases)}), got {len(spacing)}")
        parts = [per_case_segmentation(p[None], t[None], num_classes, None if spacing is None else spacing[i:i + 1])
                 for i, (p, t) in enumerate(cases)]
        return {k: np.concatenate([q[k] for q in parts]) for k in parts[0]} if parts else {"dice": np.zeros(0), "hd95": np.zeros(0)}
    p = one_hot(pred.long(), num_classes)
    t = one_hot(target.long(), num_classes)
    dice = compute_dice(p, t, include_background=False, ignore_empty=False)  # (N, C-1)
    p_any = p[:, 1:].flatten(2).sum(-1) > 0
    t_any = t[:, 1:].flatten(2).sum(-1) > 0
    dice = torch.where(~p_any & ~t_any, torch.ones_like(dice), dice)
    both = p_any & t_any  # HD is undefined where either mask is empty
    out = {"dice": dice.double().mean(dim=1).numpy(), "hd95": _hd95(p, t, both, None)}
    if spacing is not None:
        spacing = np.asarray(spacing, dtype=np.float64)
        if spacing.shape != (len(pred), pred.ndim - 2):
            raise ValueError(f"spacing must be (cases, spatial axes) = {(len(pred), pred.ndim - 2)}, got {spacing.shape}")
        out["hd95_mm"] = _hd95(p, t, both, spacing)
    return out


def _hd95(p: torch.Tensor, t: torch.Tensor, both: torch.Tensor, spacing: np.ndarray | None) -> np.ndarray:
    """Per-case HD95 of one-hot masks, mean over the classes ``both`` marks; (N,), NaN where none."""
    hd = torch.full(both.shape, float("nan"), dtype=torch.float64)
    rows = both.any(dim=1)
    if rows.any():
        kept = None if spacing is None else [list(map(float, s)) for s in spacing[rows.numpy()]]
        d = compute_hausdorff_distance(p[rows], t[rows], include_background=False, percentile=95, spacing=kept)
        hd[rows] = torch.where(both[rows], d.to(hd.dtype), torch.full_like(d, float("nan"), dtype=hd.dtype))
    hd_np = hd.numpy()
    valid = np.isfinite(hd_np)
    return _safe_ratio(np.where(valid, hd_np, 0.0).sum(axis=1), valid.sum(axis=1))


def mean_statistic(per_case: Mapping[str, np.ndarray]) -> Statistic:
    """Mean of each per-case array over the resampled cases, ignoring NaN cases (NaN if all are)."""

    def statistic(idx: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for name, values in per_case.items():
            v = np.asarray(values, dtype=np.float64)[idx]
            ok = np.isfinite(v)
            out[name] = _safe_ratio(np.where(ok, v, 0.0).sum(axis=1), ok.sum(axis=1))
        return out

    return statistic
