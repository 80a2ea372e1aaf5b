"""Metrics against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedfew_med.metrics import classification_metrics, jain_index, segmentation_metrics, summarize


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


def test_summarize():
    s = summarize({"a": 0.9, "b": 0.6, "c": float("nan")})
    assert s["mean"] == pytest.approx(0.75) and s["worst"] == 0.6 and s["best"] == 0.9
