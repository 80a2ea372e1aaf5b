"""FedFew's weights α, w, c and objective g against an independent float64 numpy reference.

The reference below is written from shared/docs/fedfew-algorithm.md §1 (A = λL, S_i = Σ_k e^{-A_ik/μ},
g = μ log Σ_i S_i^{-1}, w = softmax_k(-A/μ), α = softmax_i(-log S_i)); it never calls the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedfew_med.algorithms.fedfew_math import (
    annealed_mu,
    fedfew_weights,
    objective_gradient,
    site_assignment,
    smooth_objective,
)


def lse(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    """log Σ exp(x), shifted by the max (no scipy)."""
    m = np.max(x, axis=axis, keepdims=True)
    out = m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))
    return np.squeeze(out, axis=axis) if axis is not None else out.reshape(())


def reference(L: np.ndarray, lam: np.ndarray, mu: float) -> dict[str, np.ndarray | float]:
    A = lam[:, None] * L
    z = -A / mu
    log_s = lse(z, axis=1)
    log_w = z - log_s[:, None]
    log_alpha = -log_s - lse(-log_s)
    alpha, w = np.exp(log_alpha), np.exp(log_w)
    return {
        "alpha": alpha,
        "w": w,
        "c": (alpha[:, None] * w).sum(axis=0),
        "g": float(mu * lse(-log_s)),
        "grad": lam[:, None] * alpha[:, None] * w,
        "H_alpha": float(-(alpha * log_alpha).sum()),
        "H_w": -(w * log_w).sum(axis=1),
    }


def case(seed: int, m: int, k: int, lam_kind: str = "random") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    L = rng.uniform(0.05, 3.0, size=(m, k))
    lam = rng.uniform(0.1, 1.0, size=m) if lam_kind == "random" else np.ones(m)
    return L, lam / lam.sum()


CASES = [(seed, m, k, mu) for seed, (m, k) in enumerate([(3, 2), (5, 3), (1, 4), (6, 1), (10, 10)])
         for mu in (1e-3, 1e-2, 0.3, 5.0)]


@pytest.mark.parametrize(("seed", "m", "k", "mu"), CASES)
def test_weights_match_numpy_reference(seed: int, m: int, k: int, mu: float) -> None:
    L, lam = case(seed, m, k)
    ref = reference(L, lam, mu)
    got = fedfew_weights(torch.tensor(L), torch.tensor(lam), mu)
    np.testing.assert_allclose(got.alpha.numpy(), ref["alpha"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.w.numpy(), ref["w"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.c.numpy(), ref["c"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.step_weights.numpy(), ref["alpha"][:, None] * ref["w"], rtol=1e-9, atol=1e-12)
    assert got.objective == pytest.approx(ref["g"], rel=1e-10, abs=1e-12)
    assert got.alpha_entropy == pytest.approx(ref["H_alpha"], rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(got.w_entropy.numpy(), ref["H_w"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(objective_gradient(torch.tensor(L), torch.tensor(lam), mu).numpy(),
                               ref["grad"], rtol=1e-9, atol=1e-12)
    assert float(smooth_objective(torch.tensor(L), torch.tensor(lam), mu)) == pytest.approx(ref["g"], rel=1e-10)


@pytest.mark.parametrize(("L", "lam", "mu"), [
    ([[1.0, 2.0], [0.5, 0.7], [3.0, 0.1]], [0.2, 0.3, 0.5], 0.5),
    ([[0.3], [0.9]], [0.5, 0.5], 1.0),
    ([[1.0, 1.0, 1.0]], [1.0], 2.0),
])
def test_objective_direct_formula_by_hand(L: list, lam: list, mu: float) -> None:
    """g = μ log Σ_i 1/S_i and α_i ∝ 1/S_i straight from the definition (no log-space tricks; μ is moderate)."""
    L, lam = np.array(L), np.array(lam)
    S = np.exp(-lam[:, None] * L / mu).sum(axis=1)
    got = fedfew_weights(torch.tensor(L), torch.tensor(lam), mu)
    assert got.objective == pytest.approx(mu * math.log((1 / S).sum()), rel=1e-12)
    np.testing.assert_allclose(got.alpha.numpy(), (1 / S) / (1 / S).sum(), rtol=1e-12)


@pytest.mark.parametrize(("seed", "m", "k", "mu"), CASES)
def test_weights_sum_to_one_and_objective_bounds(seed: int, m: int, k: int, mu: float) -> None:
    L, lam = case(seed + 100, m, k)
    got = fedfew_weights(torch.tensor(L), torch.tensor(lam), mu)
    np.testing.assert_allclose(got.w.sum(dim=1).numpy(), np.ones(m), rtol=1e-12)
    assert float(got.alpha.sum()) == pytest.approx(1.0, rel=1e-12)
    assert float(got.step_weights.sum()) == pytest.approx(1.0, rel=1e-12)
    assert float(got.c.sum()) == pytest.approx(1.0, rel=1e-12)
    maxmin = float(np.max(np.min(lam[:, None] * L, axis=1)))
    assert maxmin - mu * math.log(k) - 1e-12 <= got.objective <= maxmin + mu * math.log(m) + 1e-12


@pytest.mark.parametrize("losses", [[0.1, 1.0, 5.0], [2.0, 2.5, 0.01, 9.0]])
def test_k1_large_mu_is_uniform_average(losses: list) -> None:
    L = np.array(losses)[:, None]
    lam = np.full(len(losses), 1 / len(losses))
    got = fedfew_weights(torch.tensor(L), torch.tensor(lam), 1e6)
    np.testing.assert_allclose(got.alpha.numpy(), lam, rtol=1e-5)
    np.testing.assert_allclose(got.w.numpy(), np.ones_like(L))


@pytest.mark.parametrize("mu", [0.01, 0.1, 1.0])
def test_k1_finite_mu_is_not_fedavg(mu: float) -> None:
    """With one model α_i ∝ exp(A_i/μ): the worse-served site weighs more (smoothed minimax)."""
    L = np.array([[0.2], [1.0], [3.0]])
    lam = np.full(3, 1 / 3)
    got = fedfew_weights(torch.tensor(L), torch.tensor(lam), mu).alpha.numpy()
    expected = np.exp(lam * L[:, 0] / mu - lse(lam * L[:, 0] / mu))
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert not np.allclose(got, lam, atol=1e-3)
    assert np.all(np.diff(got) > 0)


@pytest.mark.parametrize(("L", "lam", "worst"), [
    ([[1.0, 2.0], [3.0, 0.5], [0.2, 0.9]], [1 / 3] * 3, 0),  # min_k A = 1/3, 1/6, 1/15
    ([[1.0, 2.0], [3.0, 0.5], [0.2, 0.9]], [0.1, 0.8, 0.1], 1),  # min_k A = 0.1, 0.4, 0.02
    ([[0.5, 0.4, 0.6], [0.7, 0.9, 0.8], [0.1, 0.2, 0.05]], [0.3, 0.4, 0.3], 1),
])
def test_small_mu_gives_hard_assignment_and_worst_site(L: list, lam: list, worst: int) -> None:
    L, lam = np.array(L), np.array(lam)
    got = fedfew_weights(torch.tensor(L), torch.tensor(lam), 1e-4)
    np.testing.assert_allclose(got.w.numpy(), np.eye(L.shape[1])[np.argmin(L, axis=1)], atol=1e-12)
    np.testing.assert_allclose(got.alpha.numpy(), np.eye(L.shape[0])[worst], atol=1e-12)
    assert got.objective == pytest.approx(np.max(np.min(lam[:, None] * L, axis=1)), abs=1e-3)


@pytest.mark.parametrize("mu", [1e-4, 1e-2, 1.0, 10.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weights_finite_for_extreme_losses(mu: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    L = 10 ** rng.uniform(-6, 3, size=(8, 4))
    L[0, 0], L[-1, -1] = 1e-6, 1e3
    lam = rng.uniform(0.1, 1, 8)
    lam /= lam.sum()
    got = fedfew_weights(torch.tensor(L), torch.tensor(lam), mu)
    for t in (got.log_alpha, got.log_w, got.alpha, got.w, got.c, got.step_weights, got.w_entropy):
        assert torch.isfinite(t).all()
    assert math.isfinite(got.objective) and math.isfinite(got.alpha_entropy)
    assert float(got.alpha.sum()) == pytest.approx(1.0, rel=1e-9)
    np.testing.assert_allclose(got.w.sum(dim=1).numpy(), 1.0, rtol=1e-9)
    ref = reference(L, lam, mu)
    np.testing.assert_allclose(got.alpha.numpy(), ref["alpha"], rtol=1e-8, atol=1e-300)
    np.testing.assert_allclose(got.w.numpy(), ref["w"], rtol=1e-8, atol=1e-300)


@pytest.mark.parametrize(("seed", "m", "k", "mu"), [(0, 3, 2, 0.05), (1, 4, 3, 0.5), (2, 2, 5, 2.0), (3, 5, 1, 0.1)])
def test_gradient_matches_central_differences(seed: int, m: int, k: int, mu: float) -> None:
    L, lam = case(seed, m, k)
    analytic = objective_gradient(torch.tensor(L), torch.tensor(lam), mu).numpy()
    numeric = np.zeros_like(L)
    h = 1e-6
    for i in range(m):
        for j in range(k):
            up, down = L.copy(), L.copy()
            up[i, j] += h
            down[i, j] -= h
            g_up = float(smooth_objective(torch.tensor(up), torch.tensor(lam), mu))
            g_down = float(smooth_objective(torch.tensor(down), torch.tensor(lam), mu))
            numeric[i, j] = (g_up - g_down) / (2 * h)
            assert reference(up, lam, mu)["g"] == pytest.approx(g_up, rel=1e-12)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(analytic, reference(L, lam, mu)["grad"], rtol=1e-9)


@pytest.mark.parametrize(("seed", "m", "k", "mu"), [(5, 3, 2, 0.01), (6, 6, 3, 1.0), (7, 2, 2, 10.0)])
def test_gradient_matches_autograd(seed: int, m: int, k: int, mu: float) -> None:
    L, lam = case(seed, m, k)
    losses = torch.tensor(L, requires_grad=True)
    smooth_objective(losses, torch.tensor(lam), mu).backward()
    np.testing.assert_allclose(losses.grad.numpy(), reference(L, lam, mu)["grad"], rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(objective_gradient(torch.tensor(L), torch.tensor(lam), mu).numpy(),
                               losses.grad.numpy(), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize(("losses", "lam", "mu"), [
    ([1.0, 2.0, 0.5], 0.4, 0.1),
    ([3.0], 1.0, 0.01),
    ([0.2, 0.2], 0.5, 1.0),
    ([1e3, 1e-6, 5.0], 0.25, 1e-4),
])
def test_site_assignment_is_row_softmax(losses: list, lam: float, mu: float) -> None:
    z = -lam * np.array(losses) / mu
    expected = np.exp(z - lse(z))
    got = site_assignment(torch.tensor(losses, dtype=torch.float64), lam, mu)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize(("start", "end", "r", "n", "expected"), [
    (0.1, None, 3, 10, 0.1),
    (0.1, 0.001, 0, 10, 0.1),
    (0.1, 0.001, 9, 10, 0.001),
    (0.1, 0.001, 5, 11, 0.01),  # halfway on a log scale
    (1.0, 0.01, 1, 3, 0.1),
    (0.5, 0.05, 0, 1, 0.5),  # a single round keeps the start value
    (0.01, 1.0, 2, 5, 0.1),  # annealing upward works too
])
def test_annealed_mu_geometric(start: float, end: float | None, r: int, n: int, expected: float) -> None:
    assert annealed_mu(start, end, r, n) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("losses", "lam", "mu"), [
    (np.ones(3), np.ones(3) / 3, 0.1),  # 1-D
    (np.ones((2, 2, 2)), np.ones(2) / 2, 0.1),  # 3-D
    (np.ones((3, 2)), np.ones(2) / 2, 0.1),  # λ of the wrong length
    (np.ones((3, 2)), np.ones((3, 1)) / 3, 0.1),  # λ of the wrong rank
    (np.ones((3, 2)), np.ones(3) / 3, 0.0),
    (np.ones((3, 2)), np.ones(3) / 3, -0.5),
    (np.ones((3, 2)), np.ones(3) / 3, float("nan")),
    (np.ones((3, 2)), np.ones(3) / 3, float("inf")),
    (np.array([[1.0, float("nan")], [1.0, 1.0]]), np.ones(2) / 2, 0.1),
    (np.array([[1.0, float("inf")], [1.0, 1.0]]), np.ones(2) / 2, 0.1),
])
def test_invalid_inputs_raise(losses: np.ndarray, lam: np.ndarray, mu: float) -> None:
    with pytest.raises(ValueError):
        fedfew_weights(torch.tensor(losses), torch.tensor(lam), mu)
