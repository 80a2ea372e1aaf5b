"""Bootstrap intervals and the vectorised metrics, against plain loops over the library metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

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
        want = classification_metrics(probs[row], targets[row])
        for name, value in want.items():
            np.testing.assert_allclose(got[name][b], value, rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=f"{name}, row {b}")


def test_classification_bootstrap_matches_a_hand_rolled_loop():
    rng = np.random.default_rng(7)
    n, seed, b = 25, 11, 300
    probs = _random_probs(rng, n, 2)
    targets = (rng.random(n) < 0.3).astype(int)  # few positives: some resamples have no AUC
    point = classification_metrics(probs, targets)
    got = stats.bootstrap(stats.classification_statistic(probs, targets), point, n, n_resamples=b, seed=seed)
    want = _hand_rolled(lambda i: classification_metrics(probs[i], targets[i]), n, n_resamples=b, seed=seed)
    for name, (low, high) in want.items():
        assert got[name].low == pytest.approx(low, abs=1e-12) and got[name].high == pytest.approx(high, abs=1e-12), name
        assert got[name].value == point[name] and got[name].n_resamples == b


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
