"""The membership-inference metrics against sklearn and hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from fedfew_med.audit import (
    attack,
    clopper_pearson,
    epsilon_lower_bound,
    per_record_losses,
    roc_auc,
    tpr_at_fpr,
)


def _sk_tpr_at_fpr(members, nonmembers, fpr):
    scores = np.concatenate([-members, -nonmembers])
    labels = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
    f, t, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(t[f <= fpr + 1e-12].max())


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_tpr_equal_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    members = np.round(rng.exponential(0.5, 300), 1)  # rounding makes many ties
    nonmembers = np.round(rng.exponential(0.8, 250), 1)
    labels = np.concatenate([np.ones(300), np.zeros(250)])
    assert roc_auc(-members, -nonmembers) == pytest.approx(roc_auc_score(labels, np.concatenate([-members, -nonmembers])), abs=1e-12)
    for fpr in (0.0, 0.001, 0.01, 0.1, 0.5):
        assert tpr_at_fpr(-members, -nonmembers, fpr) == pytest.approx(_sk_tpr_at_fpr(members, nonmembers, fpr), abs=1e-12)


def test_a_hand_computed_attack():
    members = np.array([0.1, 0.2, 0.5])
    nonmembers = np.array([0.3, 0.4, 0.6, 0.7])
    # member-below-non-member pairs: 0.1 and 0.2 beat all 4, 0.5 beats 0.6 and 0.7: 10 of 12
    result = attack(members, nonmembers, delta=1e-5, n_resamples=50)
    assert result.auc == pytest.approx(10 / 12)
    # no false positive allowed among 4 non-members: threshold below 0.3 catches 2 of 3 members
    assert result.tpr[0.01][0] == pytest.approx(2 / 3) and result.tpr[0.001][0] == pytest.approx(2 / 3)
    lo, hi = result.auc_ci
    assert 0 <= lo <= result.auc <= hi <= 1
    assert (result.members, result.nonmembers) == (3, 4)


def test_clopper_pearson_closed_forms():
    assert clopper_pearson(0, 10, 0.95) == (0.0, pytest.approx(1 - 0.025 ** (1 / 10)))
    assert clopper_pearson(10, 10, 0.95) == (pytest.approx(0.025 ** (1 / 10)), 1.0)
    lo, hi = clopper_pearson(5, 10, 0.95)
    assert (lo, hi) == (pytest.approx(0.187086, abs=1e-6), pytest.approx(0.812914, abs=1e-6))  # the textbook interval


def test_epsilon_lower_bound_of_a_perfect_attack_by_hand():
    n = 1000
    bound = epsilon_lower_bound(np.zeros(n), -np.ones(n), delta=1e-5, level=0.95)
    # 2 distinct scores x 2 sides = 4 tests; each one-sided bound at 0.05 / 4
    tail = 0.05 / 4
    lo, hi = tail ** (1 / n), 1 - tail ** (1 / n)
    assert bound.thresholds == 4
    assert bound.epsilon == pytest.approx(math.log((lo - 1e-5) / hi), rel=1e-9)


def test_no_evidence_without_a_difference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=400)
    bound = epsilon_lower_bound(x[:200], x[200:], delta=1e-5)
    assert bound.epsilon < 0.5


def test_per_record_losses_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.25, 0.75]])
    assert per_record_losses(probs, torch.tensor([0, 0])) == pytest.approx([-math.log(0.9), -math.log(0.25)])
    seg = torch.tensor([[[[0.5, 0.2]], [[0.5, 0.8]]]])  # (1, 2 classes, 1, 2)
    target = torch.tensor([[[[0, 1]]]])
    assert per_record_losses(seg, target) == pytest.approx([(-math.log(0.5) - math.log(0.8)) / 2])
