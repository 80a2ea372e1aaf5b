"""FedFew's server step on tiny parameter dicts, expected values computed by hand in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfew_med.algorithms import RoundInfo, SiteReply
from fedfew_med.algorithms.fedfew import FedFew, FedFewOptions

SITES = ("a", "b", "c")
N = {"a": 10, "b": 30, "c": 60}
BASE = [{"w": np.array([1.0, -1.0]), "b": np.array(0.5)}, {"w": np.array([0.0, 2.0]), "b": np.array(-1.0)}]
# θ_k^(i) returned by each site for each model (site -> model -> params)
RETURNED = {
    "a": {0: {"w": [1.5, -1.0], "b": 0.0}, 1: {"w": [0.5, 2.5], "b": -2.0}},
    "b": {0: {"w": [0.0, 0.0], "b": 1.5}, 1: {"w": [-1.0, 2.0], "b": 0.0}},
    "c": {0: {"w": [2.0, -3.0], "b": 0.5}, 1: {"w": [0.0, 1.0], "b": -0.5}},
}
LOSSES = {"a": (0.9, 0.2), "b": (0.4, 1.1), "c": (0.7, 0.6)}


def to_torch(p: dict) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(np.asarray(v), dtype=torch.float32) for k, v in p.items()}


def lse(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    out = m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))
    return np.squeeze(out, axis=axis) if axis is not None else out.reshape(())


def ref_weights(L: np.ndarray, lam: np.ndarray, mu: float) -> tuple[np.ndarray, np.ndarray]:
    z = -lam[:, None] * L / mu
    log_s = lse(z, axis=1)
    return np.exp(-log_s - lse(-log_s)), np.exp(z - log_s[:, None])


def info_for(mu: float, sites: tuple[str, ...] = SITES) -> RoundInfo:
    total = sum(N[s] for s in sites)
    return RoundInfo(round=0, num_rounds=1, participants=sites, site_weight={s: N[s] / total for s in sites},
                     extras={"mu": mu})


def replies_for(keep: dict[str, tuple[int, ...]] | None = None, losses: dict | None = None) -> dict[str, SiteReply]:
    keep = keep or {s: (0, 1) for s in SITES}
    losses = losses or LOSSES
    return {s: SiteReply(num_samples=N[s], losses=losses[s], models={k: to_torch(RETURNED[s][k]) for k in keep[s]})
            for s in keep}


def expected_models(lam: np.ndarray, mu: float, keep: dict, lr: float = 1.0, losses: dict | None = None) -> list:
    losses = losses or LOSSES
    sites = list(keep)
    alpha, w = ref_weights(np.array([losses[s] for s in sites]), lam, mu)
    out = []
    for k, base in enumerate(BASE):
        new = {}
        for name, value in base.items():
            step = sum(alpha[i] * w[i, k] * (np.asarray(RETURNED[s][k][name]) - value)
                       for i, s in enumerate(sites) if k in keep[s])
            new[name] = value + lr * step
        out.append(new)
    return out


def assert_models(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert set(g) == set(e)
        for name in e:
            assert g[name].dtype == torch.float32 and tuple(g[name].shape) == np.shape(e[name])
            np.testing.assert_allclose(g[name].numpy(), e[name], rtol=1e-6, atol=1e-6)


FULL = {s: (0, 1) for s in SITES}
SPARSE = {"a": (1,), "b": (0, 1), "c": (0,)}


@pytest.mark.parametrize("mu", [0.01, 0.1, 1.0, 100.0])
@pytest.mark.parametrize(("site_weights", "lam"), [("samples", np.array([0.1, 0.3, 0.6])), ("uniform", np.ones(3) / 3)])
@pytest.mark.parametrize("keep", [FULL, SPARSE], ids=["full", "sparse"])
@pytest.mark.parametrize("lr", [1.0, 0.5, 2.0])
def test_server_step_matches_hand_computation(mu: float, site_weights: str, lam: np.ndarray, keep: dict,
                                              lr: float) -> None:
    algo = FedFew(FedFewOptions(preset="reference", k=2, mu=0.5, site_weights=site_weights, server_lr=lr))  # μ comes from extras
    models = [to_torch(m) for m in BASE]
    step = algo.aggregate(info_for(mu), models, replies_for(keep))
    assert_models(step.models, expected_models(lam, mu, keep, lr))
    alpha, w = ref_weights(np.array([LOSSES[s] for s in SITES]), lam, mu)
    log = step.log
    assert log["sites"] == list(SITES) and log["mu"] == mu
    np.testing.assert_allclose(log["losses"], [LOSSES[s] for s in SITES])
    np.testing.assert_allclose(log["alpha"], alpha, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(log["w"], w, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(log["c"], (alpha[:, None] * w).sum(axis=0), rtol=1e-9, atol=1e-15)
    assert sum(log["c"]) == pytest.approx(1.0)
    assert log["alpha_entropy"] == pytest.approx(-(alpha * np.log(alpha)).sum(), rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(log["w_entropy"], -(w * np.log(w)).sum(axis=1), rtol=1e-9, atol=1e-12)
    assert log["soft_assignment"] == [0 if row[0] >= row[1] else 1 for row in w]
    for m, base in zip(models, BASE, strict=True):  # inputs are not modified in place
        np.testing.assert_array_equal(m["w"].numpy(), base["w"])


def test_equal_losses_uniform_weights_by_hand() -> None:
    """All L equal, λ = 1/3: α_i = 1/3, w_ik = 1/2, so θ_k ← θ_k + (1/6) Σ_i Δ_ik."""
    same = {s: (0.5, 0.5) for s in SITES}
    step = FedFew(FedFewOptions(preset="reference", k=2, site_weights="uniform")).aggregate(
        info_for(0.01), [to_torch(m) for m in BASE], replies_for(losses=same))
    w0 = np.array([1.0, -1.0]) + (np.array([0.5, 0.0]) + np.array([-1.0, 1.0]) + np.array([1.0, -2.0])) / 6
    b1 = -1.0 + (-1.0 + 1.0 + 0.5) / 6
    np.testing.assert_allclose(step.models[0]["w"].numpy(), w0, rtol=1e-6)
    np.testing.assert_allclose(step.models[1]["b"].numpy(), b1, rtol=1e-6)
    np.testing.assert_allclose(step.log["alpha"], [1 / 3] * 3)
    np.testing.assert_allclose(step.log["w"], [[0.5, 0.5]] * 3)


def test_site_returning_nothing_for_a_model_leaves_its_delta_zero() -> None:
    """Only site a returns model 0: θ_0 moves by α_a w_a0 Δ_a0 alone, even though c_0 counts all sites."""
    keep = {"a": (0, 1), "b": (1,), "c": (1,)}
    step = FedFew(FedFewOptions(preset="reference", k=2)).aggregate(info_for(0.1), [to_torch(m) for m in BASE], replies_for(keep))
    alpha, w = ref_weights(np.array([LOSSES[s] for s in SITES]), np.array([0.1, 0.3, 0.6]), 0.1)
    np.testing.assert_allclose(step.models[0]["w"].numpy(), [1.0 + alpha[0] * w[0, 0] * 0.5, -1.0], rtol=1e-6)
    assert step.log["c"][0] > alpha[0] * w[0, 0] + 1e-3


def test_a_missing_reply_does_not_renormalise_lambda() -> None:
    """λ is fixed by the broadcast (n_i / N over the participants a, b, c); a site that fails keeps
    its share, so the others' λ stay 0.3 and 0.6 (the temperature they trained under)."""
    keep = {"b": (0, 1), "c": (0, 1)}
    step = FedFew(FedFewOptions(preset="reference", k=2)).aggregate(info_for(0.1), [to_torch(m) for m in BASE], replies_for(keep))
    assert_models(step.models, expected_models(np.array([0.3, 0.6]), 0.1, keep))


def test_no_replies_keeps_models() -> None:
    models = [to_torch(m) for m in BASE]
    step = FedFew(FedFewOptions(preset="reference", k=2)).aggregate(info_for(0.1), models, {})
    assert_models(step.models, BASE)
