"""Bootstrap intervals and the vectorised metrics, against plain loops over the library metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_score, roc_curve

from fedfew_med.evaluation import stats
from fedfew_med.evaluation.stats import Estimate
from fedfew_med.metrics import classification_metrics, segmentation_metrics


def _random_probs(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    p = rng.random((n, c))
    return p / p.sum(axis=1, keepdims=True)


def _hand_rolled(values_of, n: int, *, n_resamples: int, seed: int, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """The textbook percentile bootstrap: a loop, one metric call per resample, NaN resamples dropped."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    samples: dict[str, list[float]] = {}
    for row in idx:
        for name, v in values_of(row).items():
            samples.setdefault(name, []).append(v)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    out = {}
    for name, vals in samples.items():
        finite = np.asarray([v for v in vals if not math.isnan(v)])
        out[name] = tuple(np.percentile(finite, q)) if finite.size else (math.nan, math.nan)
    return out


@pytest.mark.parametrize("classes", [2, 3])
def test_vectorised_classification_metrics_match_the_library(classes):
    rng = np.random.default_rng(classes)
    n = 30
    probs = _random_probs(rng, n, classes)
    probs[1:5] = probs[0]  # ties in the scores
    targets = rng.integers(0, classes, n)
    statistic = stats.classification_statistic(probs, targets)
    idx = np.vstack([np.arange(n), rng.integers(0, n, size=(40, n)),
                     np.flatnonzero(targets == 0)[np.zeros(n, dtype=int)]])  # identity, random, one class only
    got = statistic(idx)
    for b, row in enumerate(idx):
        want = {**classification_metrics(probs[row], targets[row]), **stats.predictive_values(probs[row], targets[row])}
        for name, value in want.items():
            np.testing.assert_allclose(got[name][b], value, rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=f"{name}, row {b}")


def test_classification_bootstrap_matches_a_hand_rolled_loop():
    rng = np.random.default_rng(7)
    n, seed, b = 25, 11, 300
    probs = _random_probs(rng, n, 2)
    targets = (rng.random(n) < 0.3).astype(int)  # few positives: some resamples have no AUC
    point = {**classification_metrics(probs, targets), **stats.predictive_values(probs, targets)}
    got = stats.bootstrap(stats.classification_statistic(probs, targets), point, n, n_resamples=b, seed=seed)
    want = _hand_rolled(lambda i: {**classification_metrics(probs[i], targets[i]), **stats.predictive_values(probs[i], targets[i])},
                        n, n_resamples=b, seed=seed)
    assert {"ppv", "npv"} <= set(want)
    for name, (low, high) in want.items():
        assert got[name].low == pytest.approx(low, abs=1e-12) and got[name].high == pytest.approx(high, abs=1e-12), name
        assert got[name].value == point[name] and got[name].n_resamples == b


def test_predictive_values_by_hand_and_against_scikit_learn():
    # called positive (argmax 1): cases 0-3, of which 0, 1, 2 are class 1 -> PPV 3/4
    # called negative: cases 4-8, of which 4, 5 are class 1 (missed) -> NPV 3/5
    probs = np.array([[0.1, 0.9]] * 4 + [[0.8, 0.2]] * 5)
    targets = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0])
    assert stats.predictive_values(probs, targets) == {"ppv": 0.75, "npv": 0.6}
    rng = np.random.default_rng(3)
    for classes in (2, 3):
        probs = _random_probs(rng, 40, classes)
        targets = rng.integers(0, classes, 40)
        called = probs.argmax(axis=1) == 1
        got = stats.predictive_values(probs, targets)
        assert got["ppv"] == pytest.approx(precision_score(targets == 1, called))
        assert got["npv"] == pytest.approx(precision_score(targets != 1, ~called))
    nothing_called = stats.predictive_values(np.array([[0.9, 0.1], [0.7, 0.3]]), np.array([0, 1]))
    assert math.isnan(nothing_called["ppv"]) and nothing_called["npv"] == 0.5


def test_roc_band_reads_the_curve_on_a_grid_by_hand():
    # scores 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.6 (neg): points (0,0) (0,.5) (.5,.5) (.5,1) (1,1)
    scores, positive = np.array([0.9, 0.8, 0.7, 0.6]), np.array([True, False, True, False])
    band = stats.roc_band(scores, positive, n_resamples=20, grid_size=5)
    assert band.fpr.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert band.tpr.tolist() == [0.5, 0.5, 1.0, 1.0, 1.0]  # a vertical stretch reads as its top
    # a tie between a positive and a negative is a diagonal: (0,0) -> (1,1) for all-equal scores
    flat = stats.roc_band(np.full(4, 0.5), positive, n_resamples=5, grid_size=5)
    assert flat.tpr.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_roc_band_matches_a_loop_over_scikit_learn_curves():
    rng = np.random.default_rng(5)
    n, b, seed = 30, 150, 9
    positive = rng.random(n) < 0.4
    scores = np.round(rng.random(n) + 0.4 * positive, 1)  # rounded: many ties
    band = stats.roc_band(scores, positive, n_resamples=b, seed=seed, grid_size=21)
    grid = np.linspace(0, 1, 21)

    def curve(i: np.ndarray) -> np.ndarray:  # the vertical averaging of scikit-learn's example
        fpr, tpr, _ = roc_curve(positive[i], scores[i], drop_intermediate=False)
        return np.interp(grid, fpr, tpr)

    np.testing.assert_allclose(band.tpr, curve(np.arange(n)), atol=1e-12)
    idx = np.random.default_rng(seed).integers(0, n, size=(b, n))
    curves = np.array([curve(i) for i in idx if positive[i].any() and not positive[i].all()])
    assert band.n_valid == len(curves) and band.n_resamples == b and band.level == 0.95
    np.testing.assert_allclose(band.low, np.percentile(curves, 2.5, axis=0), atol=1e-12)
    np.testing.assert_allclose(band.high, np.percentile(curves, 97.5, axis=0), atol=1e-12)
    assert np.all(np.diff(band.tpr) >= 0) and band.tpr[-1] == 1.0


def test_hd95_in_mm_by_hand():
    # one-pixel objects: the Hausdorff distance is the distance between the two pixels
    target = torch.zeros(3, 1, 8, 8, dtype=torch.long)
    pred = torch.zeros(3, 1, 8, 8, dtype=torch.long)
    target[:, 0, 2, 3] = 1
    pred[0, 0, 5, 3] = 1  # 3 rows away
    pred[1, 0, 2, 4] = 1  # 1 column away
    pred[2, 0, 5, 4] = 1  # both
    spacing = np.array([[0.5, 3.0], [0.5, 3.0], [2.0, 1.0]])  # (rows, columns) mm per case
    per_case = stats.per_case_segmentation(pred, target, 2, spacing=spacing)
    np.testing.assert_allclose(per_case["hd95"], [3.0, 1.0, math.hypot(3, 1)], rtol=1e-6)  # pixels, unchanged
    np.testing.assert_allclose(per_case["hd95_mm"], [1.5, 3.0, math.hypot(6.0, 1.0)], rtol=1e-6)
    assert "hd95_mm" not in stats.per_case_segmentation(pred, target, 2)
    with pytest.raises(ValueError, match=r"spacing must be \(cases, spatial axes\) = \(3, 2\)"):
        stats.per_case_segmentation(pred, target, 2, spacing=np.ones((3, 3)))


def test_per_case_segmentation_means_are_the_library_metrics():
    g = torch.Generator().manual_seed(0)
    target = torch.zeros(6, 1, 12, 12, dtype=torch.long)
    target[:4, :, 3:8, 3:8] = 1  # cases 4 and 5 have no reference object
    pred = (torch.rand(6, 1, 12, 12, generator=g) > 0.6).long() * target
    pred[1] = 0  # missed entirely: Dice 0, HD undefined
    pred[5] = 0  # correctly empty: Dice 1
    pred[4, :, 0:2, 0:2] = 1  # false positive on an empty case: Dice 0, HD undefined
    per_case = stats.per_case_segmentation(pred, target, 2)
    lib = segmentation_metrics(pred, target, 2)
    assert per_case["dice"][5] == 1.0 and per_case["dice"][1] == 0.0 and per_case["dice"][4] == 0.0
    assert np.isnan(per_case["hd95"][[1, 4, 5]]).all() and np.isfinite(per_case["hd95"][[0, 2, 3]]).all()
    assert per_case["dice"].mean() == pytest.approx(lib["dice"], abs=1e-6)
    assert np.nanmean(per_case["hd95"]) == pytest.approx(lib["hd95"], abs=1e-5)


def test_segmentation_bootstrap_matches_a_hand_rolled_loop():
    g = torch.Generator().manual_seed(1)
    target = torch.zeros(10, 1, 12, 12, dtype=torch.long)
    target[:7, :, 2:9, 3:9] = 1
    pred = torch.roll(target, shifts=1, dims=-1) * (torch.rand(10, 1, 12, 12, generator=g) > 0.2).long()
    per_case = stats.per_case_segmentation(pred, target, 2)
    point = segmentation_metrics(pred, target, 2)
    got = stats.bootstrap(stats.mean_statistic(per_case), point, 10, n_resamples=60, seed=5)
    want = _hand_rolled(lambda i: segmentation_metrics(pred[i], target[i], 2), 10, n_resamples=60, seed=5)
    for name, (low, high) in want.items():
        assert got[name].low == pytest.approx(low, abs=1e-5) and got[name].high == pytest.approx(high, abs=1e-5), name


def test_interval_edge_cases():
    assert stats.percentile_interval(np.array([np.nan, np.nan])) == (pytest.approx(math.nan, nan_ok=True),) * 2 + (0,)
    assert stats.percentile_interval(np.array([1.0, np.nan, 3.0]), 0.5) == (1.5, 2.5, 2)
    with pytest.raises(ValueError, match="level must be between 0 and 1, got 95"):
        stats.percentile_interval(np.array([1.0]), 95)
    with pytest.raises(ValueError, match="at least one case"):
        stats.bootstrap_indices(0)
    idx = stats.bootstrap_indices(5, n_resamples=3, seed=2)
    assert idx.shape == (3, 5) and np.array_equal(idx, np.random.default_rng(2).integers(0, 5, size=(3, 5)))


def test_estimate_text():
    assert str(Estimate(0.9, 0.8, 0.95)) == "0.900 [0.800, 0.950]"
    assert str(Estimate(0.9, math.nan, math.nan)) == "0.900"
    assert str(Estimate(math.nan, math.nan, math.nan)) == "n/a"
