"""Metrics against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedfew_med.metrics import (
    auc_interval,
    classification_metrics,
    headline_metric,
    jain_index,
    prediction_checks,
    result_flags,
    segmentation_metrics,
    summarize,
)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1.0, 1.0, 1.0], 1.0),
        ([1.0, 0.0, 0.0, 0.0], 0.25),
        ([0.9, 0.6], (1.5**2) / (2 * (0.81 + 0.36))),
        ([0.5, float("nan"), 0.5], 1.0),
    ],
)
def test_jain_index(values, expected):
    assert jain_index(values) == pytest.approx(expected)


def test_classification_metrics_by_hand():
    targets = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    p1 = np.array([0.9, 0.8, 0.3, 0.6, 0.2, 0.1, 0.4, 0.05])
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(probs, targets)
    # predictions: 1 1 0 1 0 0 0 0 -> TP 2, FN 1, FP 1, TN 4
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    # AUC: fraction of (pos, neg) pairs ranked correctly: positives 0.9, 0.8, 0.3 vs negatives
    pairs = [(p, n) for p in (0.9, 0.8, 0.3) for n in (0.6, 0.2, 0.1, 0.4, 0.05)]
    assert m["auc"] == pytest.approx(sum(p > n for p, n in pairs) / len(pairs))


def test_single_class_targets_give_nan_auc():
    m = classification_metrics(np.array([[0.2, 0.8], [0.6, 0.4]]), np.array([1, 1]))
    assert math.isnan(m["auc"]) and math.isnan(m["specificity"]) and m["accuracy"] == 0.5


def test_dice_by_hand():
    pred = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    ref = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    pred[0, 0, 0:4, 0:4] = 1  # 16 px
    ref[0, 0, 2:6, 0:4] = 1  # 16 px, overlap 8
    # case 1: both empty -> counts as 1
    m = segmentation_metrics(pred, ref, num_classes=2)
    assert m["dice"] == pytest.approx((2 * 8 / 32 + 1.0) / 2)
    assert m["hd95"] == pytest.approx(2.0)  # edges two rows apart


def _dice(p: np.ndarray, r: np.ndarray) -> float:
    """Foreground Dice by hand; 1 when both masks are empty."""
    return 1.0 if not p.any() and not r.any() else 2 * (p & r).sum() / (p.sum() + r.sum())


def test_cases_of_different_sizes_are_scored_one_by_one():
    rng = np.random.default_rng(0)
    shapes = [(6, 7), (9, 5), (4, 4)]
    preds = [rng.random(s) > 0.6 for s in shapes]
    refs = [rng.random(s) > 0.5 for s in shapes]
    refs[2][:] = False
    preds[2][:] = False  # both empty: Dice 1, no HD
    m = segmentation_metrics([torch.from_numpy(p)[None].long() for p in preds],
                             [torch.from_numpy(r)[None].long() for r in refs], num_classes=2)
    assert m["dice"] == pytest.approx(np.mean([_dice(p, r) for p, r in zip(preds, refs, strict=True)]))
    one = [segmentation_metrics(torch.from_numpy(p)[None, None].long(), torch.from_numpy(r)[None, None].long(), 2)["hd95"]
           for p, r in zip(preds[:2], refs[:2], strict=True)]
    assert m["hd95"] == pytest.approx(np.mean(one))  # the mean over the cases where HD95 is defined
    same = [(6, 7)] * 2  # cases of one size: the list and the stacked batch agree
    stacked = segmentation_metrics(torch.from_numpy(np.stack([preds[0], preds[0]]))[:, None].long(),
                                   torch.from_numpy(np.stack([refs[0], refs[0]]))[:, None].long(), 2)
    listed = segmentation_metrics([torch.from_numpy(preds[0])[None].long()] * len(same),
                                  [torch.from_numpy(refs[0])[None].long()] * len(same), 2)
    assert stacked == pytest.approx(listed)


def test_summarize():
    s = summarize({"a": 0.9, "b": 0.6, "c": float("nan")})
    assert s["mean"] == pytest.approx(0.75) and s["worst"] == 0.6 and s["best"] == 0.9


def test_auc_interval_by_hand():
    # positives score 0.9, 0.8, 0.4 and negatives 0.7, 0.3, 0.2: 8 of 9 pairs ordered, A = 8/9.
    # Hanley & McNeil: Q1 = A/(2-A) = 0.8, Q2 = 2A²/(1+A) = 128/153,
    # SE² = (A(1-A) + 2(Q1-A²) + 2(Q2-A²)) / 9 = (0.098765 + 0.019753 + 0.092956) / 9, SE = 0.153288
    scores = np.array([0.9, 0.8, 0.4, 0.7, 0.3, 0.2])
    probs = np.stack([1 - scores, scores], axis=1)
    targets = np.array([1, 1, 1, 0, 0, 0])
    low, high = auc_interval(probs, targets)
    assert classification_metrics(probs, targets)["auc"] == pytest.approx(8 / 9)
    assert low == pytest.approx(8 / 9 - 1.959964 * 0.153288, abs=1e-5)
    assert high == 1.0  # 8/9 + 0.30 is clipped
    assert all(math.isnan(v) for v in auc_interval(probs, np.ones(6, dtype=int)))  # one class: no interval
    assert all(math.isnan(v) for v in auc_interval(np.full((4, 3), 1 / 3), np.array([0, 1, 2, 0])))


@pytest.mark.parametrize(
    ("scores", "targets", "expected"),
    [
        # ranks perfectly (AUC 1) yet calls every record negative: accuracy 0.8, balanced accuracy 0.5
        ([0.1, 0.2, 0.3, 0.4, 0.45] * 2, [0, 0, 0, 0, 1, 0, 0, 0, 0, 1], ["predicts a single class"]),
        # the majority class whatever it sees, with scores no better than chance
        ([0.1, 0.3, 0.2, 0.4, 0.1, 0.3, 0.2, 0.4], [1, 0, 0, 0, 0, 1, 0, 1], ["predicts a single class", "includes 0.5"]),
        # perfect ranking on 40 records: nothing to flag
        (list(np.linspace(0.01, 0.99, 40)), [0] * 20 + [1] * 20, []),
        # a coin: both classes predicted, AUC near 0.5
        ([0.2, 0.8, 0.3, 0.7, 0.6, 0.4, 0.9, 0.1], [0, 0, 1, 1, 0, 1, 1, 0], ["includes 0.5"]),
    ],
)
def test_result_flags(scores, targets, expected):
    scores, targets = np.asarray(scores), np.asarray(targets)
    probs = np.stack([1 - scores, scores], axis=1)
    flags = result_flags({**classification_metrics(probs, targets), **prediction_checks(probs, targets)})
    assert len(flags) == len(expected) and all(want in got for want, got in zip(expected, flags, strict=True)), flags


@pytest.mark.parametrize(
    ("task", "chosen", "expected"),
    [
        ("classification", "", "accuracy"),
        ("tabular", "balanced_accuracy", "balanced_accuracy"),
        ("segmentation", "", "dice"),
        ("segmentation", "hd95", "lower-is-better"),
        ("classification", "dice", "must be one of accuracy, balanced_accuracy, auc, sensitivity, specificity"),
    ],
)
def test_headline_metric(task, chosen, expected):
    if expected in ("accuracy", "balanced_accuracy", "dice"):
        assert headline_metric(task, chosen) == expected
    else:
        with pytest.raises(ValueError, match=expected):
            headline_metric(task, chosen)
